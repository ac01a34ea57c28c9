"""The one image preprocessing path: read, fix orientation and mode, resize to a square.

``prepare`` stores its output as uint8; ``caption`` calls the same function on new files, and the
encoder applies the backbone's mean/std to both, so training and inference see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("squash", "crop")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images -> RGB (alpha composited over white).

    16-bit grayscale (``I;16*``, or ``I`` holding values above 255) is scaled to 8 bits rather
    than clipped, as Pillow's own ``convert`` would do.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if img.mode != "I" or (arr.size and float(arr.max()) > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize(img: Image.Image, size: int, policy: str = "squash") -> Image.Image:
    """``squash``: stretch to size x size (a square, as the paper's code did); ``crop``: shorter
    side to size, centre crop."""
    if policy == "squash":
        return img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    if policy == "crop":
        return ImageOps.fit(img, (size, size), Image.BICUBIC, centering=(0.5, 0.5))
    raise ValueError(f"unknown resize policy {policy!r}; use one of {RESIZE_POLICIES}")


def prepare_image(img: Image.Image, size: int, policy: str = "squash") -> np.ndarray:
    """A PIL image -> uint8 array (3, size, size)."""
    img = ImageOps.exif_transpose(img) or img
    img = resize(to_rgb(img), size, policy)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_image(path: str | Path, size: int, policy: str = "squash") -> np.ndarray:
    """Read an image file fully (so truncation shows here) -> uint8 (3, size, size)."""
    with Image.open(path) as img:
        if getattr(img, "draft", None) is not None and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the target is much smaller: same result
            # class as a full decode + resize, several times faster on large photos.
            img.draft("RGB", (size * 2, size * 2))
        img.load()
        return prepare_image(img, size, policy)


def find_images(paths: list[str]) -> list[Path]:
    """Files, folders (recursively) and glob patterns -> sorted unique image files."""
    import glob

    found: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found.extend(f for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            found.extend(Path(f) for f in sorted(glob.glob(str(path), recursive=True))
                         if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    seen: set[Path] = set()
    unique = []
    for f in found:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique
