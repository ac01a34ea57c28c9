"""Captions for image files, in batches, with optional attention heat-maps (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from capcli.data.images import load_image
from capcli.evaluate import generate


def caption_files(model, vocab, files: list[Path], device: torch.device, *, image_size: int,
                  resize: str = "squash", beam_size: int = 3, max_length: int = 50,
                  batch_size: int = 16, attention_dir: Path | None = None, amp_dtype=None,
                  block_ngrams: int = 0, sample: dict | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per file: ``file``, ``caption`` (None if unreadable), ``error``, ``attention_map``."""
    model.eval()
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays, ok = [], []
        for f in chunk:
            try:
                arrays.append(load_image(f, image_size, resize))
                ok.append(f)
            except Exception as exc:  # unreadable file: report it, caption the rest
                rows.append({"file": str(f), "caption": None, "error": f"{type(exc).__name__}: {exc}"})
        if arrays:
            images = torch.from_numpy(np.stack(arrays)).to(device)
            texts, result = generate(model, vocab, images, beam_size=beam_size, max_length=max_length,
                                     return_alphas=attention_dir is not None, amp_dtype=amp_dtype,
                                     block_ngrams=block_ngrams, sample=sample)
            for j, (f, text) in enumerate(zip(ok, texts)):
                row = {"file": str(f), "caption": text, "error": None}
                if attention_dir is not None:
                    attention_dir.mkdir(parents=True, exist_ok=True)
                    out = attention_dir / f"{f.stem}_attention.png"
                    words = [vocab.itos[t] for t in result.tokens[j]]
                    attention_figure(arrays[j], words, result.alphas[j].cpu().numpy()).save(out)
                    row["attention_map"] = str(out)
                rows.append(row)
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["file"]])
    return rows


def _heat_colors(weights: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a dark-blue -> red -> yellow ramp."""
    w = np.clip(weights, 0, 1)[..., None]
    low, mid, high = np.array([0, 0, 80.0]), np.array([220, 30, 30.0]), np.array([255, 240, 60.0])
    rgb = np.where(w < 0.5, low + (mid - low) * (w / 0.5), mid + (high - mid) * ((w - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def attention_figure(image: np.ndarray, words: list[str], alphas: np.ndarray, tile: int = 160) -> Image.Image:
    """The image, then one tile per word with its attention over the image, labelled.

    Args:
        image: uint8 (3, S, S); words: the caption's words; alphas: (T, P) with P a square grid.
    """
    base = Image.fromarray(image.transpose(1, 2, 0)).resize((tile, tile), Image.BICUBIC)
    p = alphas.shape[-1]
    g = int(round(p ** 0.5))
    tiles = [("<image>", base)]
    steps = list(words) + ["<end>"]
    for t, word in enumerate(steps[: alphas.shape[0]]):
        a = alphas[t]
        if g * g == p:
            grid = a.reshape(g, g)
            grid = (grid - grid.min()) / (grid.max() - grid.min() + 1e-8)
            heat = Image.fromarray((grid * 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
            colors = Image.fromarray(_heat_colors(np.asarray(heat) / 255.0))
            tiles.append((word, Image.blend(base, colors, 0.55)))
        else:  # not a square grid (token models): the image alone
            tiles.append((word, base))
    cols = min(6, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    label_h = 18
    canvas = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (word, im) in enumerate(tiles):
        x, y = (i % cols) * tile, (i // cols) * (tile + label_h)
        canvas.paste(im, (x, y + label_h))
        draw.text((x + 4, y + 3), word, fill="black")
    return canvas
