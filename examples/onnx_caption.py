"""Caption images with an ONNX model folder, using onnxruntime, NumPy and Pillow only: no PyTorch,
no capcli. It shows how any runtime drives the three graphs of `capcli export RUN DIR --format onnx`.

    pip install onnxruntime numpy pillow
    python examples/onnx_caption.py models/coco-onnx photo.jpg more/*.png

It decodes greedily (the likeliest word at each step) under the rules capcli's own decoding keeps
by default, read from the folder's config.json ("decoding"): <unk> is never emitted, a caption
never ends on a dangling word ("a", "the", "of", ...), no n-gram of block_ngrams words repeats, and
a caption stops at max_length words. So its captions are `capcli caption DIR IMAGE --beam 1`'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def load_image(path: str, size: int, resize: str) -> np.ndarray:
    """uint8 (3, size, size) RGB, as capcli prepares images: EXIF orientation applied, alpha laid
    over white, then squashed to a square (or, with resize "crop", shorter side to size and centre crop)."""
    with Image.open(path) as img:
        if img.format == "JPEG":  # decode at a reduced scale where the target is much smaller, as capcli does
            img.draft("RGB", (size * 2, size * 2))
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img)
        img = img.convert("RGB")
        if resize == "crop":
            img = ImageOps.fit(img, (size, size), Image.BICUBIC, centering=(0.5, 0.5))
        else:
            img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def repeats_ngram(words: list[int], n: int, vocab_size: int) -> np.ndarray:
    """(V,) bool: the words that would repeat an n-gram of ``words`` if they came next."""
    banned = np.zeros(vocab_size, dtype=bool)
    if n <= 0 or len(words) < n:
        return banned
    suffix = words[len(words) - (n - 1):] if n > 1 else []
    for i in range(len(words) - n + 1):
        if words[i:i + n - 1] == suffix:
            banned[words[i + n - 1]] = True
    return banned


def caption(folder: Path, paths: list[str]) -> list[str]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    graphs, prep, rules = config["onnx"]["graphs"], config["preprocessing"], config["decoding"]
    special = config["onnx"]["special_tokens"]
    start, end, pad, unk = special["start"], special["end"], special["pad"], special.get("unk")
    sessions = {name: ort.InferenceSession(str(folder / g["file"]), providers=["CPUExecutionProvider"])
                for name, g in graphs.items()}

    images = np.stack([load_image(p, prep["image_size"], prep["resize"]) for p in paths])
    (features,) = sessions["encoder"].run(None, {"images": images})
    h, c, proj = sessions["decoder_init"].run(None, {"features": features})

    banned = [pad, start] + ([unk] if unk is not None and not rules.get("allow_unk", False) else [])
    dangling = {vocab.index(w) for w in rules.get("dangling", []) if w in vocab}
    block, max_length = int(rules.get("block_ngrams", 0)), int(rules["max_length"])
    tokens = np.full(len(paths), start, dtype=np.int64)
    words: list[list[int]] = [[] for _ in paths]
    ended = np.zeros(len(paths), dtype=bool)
    for t in range(max_length + 1):
        logp, h, c, _ = sessions["decoder_step"].run(
            None, {"tokens": tokens, "h": h, "c": c, "features": features, "proj": proj})
        for i in range(len(paths)):
            if ended[i]:
                continue
            scores = logp[i].copy()
            if t == max_length:  # the limit: the caption ends here
                choice = end
            else:
                scores[banned] = -np.inf
                if words[i] and words[i][-1] in dangling:
                    scores[end] = -np.inf
                scores[repeats_ngram(words[i], block, len(vocab))] = -np.inf
                choice = int(np.argmax(scores))
            if choice == end:
                ended[i] = True
            else:
                words[i].append(choice)
            tokens[i] = choice
        if ended.all():
            break
    return [" ".join(vocab[w] for w in ws) for ws in words]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    folder, paths = Path(argv[0]), argv[1:]
    for path, text in zip(paths, caption(folder, paths)):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
