"""Captioning files at scale: images decoded in DataLoader workers while the model runs, rows
streamed to JSONL as they are made, a killed run resumed where it stopped, and the work split
across torchrun ranks. Attention heat-maps (Pillow only) on request.

Output: one row per input file, in input order: ``file``, ``caption`` (None when the file could
not be read), ``error``, and ``attention_map`` with ``--attention-maps``. Rows stream to a JSONL
file: the output itself (``.jsonl``), or ``OUT.partial.jsonl`` beside a ``.json``/``.csv`` output,
which is written whole at the end. A resumed run skips every file that already has a row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from capcli.data.images import load_image
from capcli.decode import DecodeOptions, default_batch_size, generate
from capcli.errors import UserError, disk_space
from capcli.runtime import Dist, barrier
from capcli.store.files import JsonlLog, atomic_open, read_jsonl

OUTPUT_SUFFIXES = (".jsonl", ".json", ".csv")
FIELDS = ["file", "caption", "error", "attention_map"]


class ImageFiles(Dataset):
    """Image files -> uint8 (3, S, S) through the one preprocessing path; unreadable files become an
    item with an ``error`` instead of stopping the run."""

    def __init__(self, files: list[Path], size: int, resize: str = "squash"):
        self.files, self.size, self.resize = files, size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"index": i, "image": torch.from_numpy(load_image(self.files[i], self.size, self.resize)),
                    "error": None}
        except Exception as exc:  # a corrupt, truncated or unreadable file: its row says why
            return {"index": i, "image": None, "error": f"{type(exc).__name__}: {exc}"}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if it["image"] is not None]
    return {"index": [it["index"] for it in items], "error": [it["error"] for it in items],
            "images": torch.stack([it["image"] for it in good]) if good else None}


def caption_batches(captioner, files: list[Path], options: DecodeOptions, *, batch_size: int | None = None,
                    num_workers: int = 0, attention_dir: Path | None = None,
                    generator: torch.Generator | None = None) -> Iterator[list[dict]]:
    """Rows for ``files``, a batch at a time, in input order (see the module doc), captioned by
    ``captioner`` (a :class:`capcli.api.Captioner`) with ``options`` (resolved: see
    :meth:`capcli.api.Captioner.decode_options`); ``batch_size`` defaults to the device's
    (:func:`capcli.decode.default_batch_size`). Sampling draws from ``generator`` (one per run)."""
    device = captioner.device
    loader = DataLoader(ImageFiles(files, captioner.image_size, captioner.resize),
                        batch_size=batch_size or default_batch_size(device), shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda", generator=torch.Generator())
    model, vocab = captioner.model, captioner.vocab
    model.eval()
    with model.derived_weights():
        for batch in loader:
            rows = {i: {"file": str(files[i]), "caption": None, "error": e} for i, e in zip(batch["index"], batch["error"])}
            if batch["images"] is not None:
                ok = [i for i, e in zip(batch["index"], batch["error"]) if e is None]
                texts, result = generate(model, vocab, batch["images"].to(device, non_blocking=True), options,
                                         return_alphas=attention_dir is not None, generator=generator)
                for j, (i, text) in enumerate(zip(ok, texts)):
                    rows[i]["caption"] = text
                    if attention_dir is not None:
                        attention_dir.mkdir(parents=True, exist_ok=True)
                        out = attention_dir / f"{files[i].stem}_attention.png"
                        words = [vocab.itos[t] for t in result.tokens[j]]
                        figure = attention_figure(batch["images"][j].numpy(), words,
                                                  result.alphas[j].float().cpu().numpy())
                        with disk_space(out, 3 * figure.width * figure.height, "free some space and rerun"):
                            figure.save(out)
                        rows[i]["attention_map"] = str(out)
            yield [rows[i] for i in batch["index"]]


class RowLog(JsonlLog):
    """Caption rows appended to a JSONL file as they come (flushed per batch), read back on resume
    (a row torn by a kill is dropped and cut from the file); a full disk is a one-line error that
    keeps the rows written so far."""

    def read(self) -> dict[str, dict]:
        return {row["file"]: row for row in read_jsonl(self.path, until=lambda row: "file" not in row)}

    def append(self, rows: list[dict]) -> None:
        with disk_space(self.path, lambda: 100 * _json_bytes(rows), "the rows written so far are kept: free some "
                        "space, then rerun with --resume"):
            super().append(rows)


def _json_bytes(rows: list[dict]) -> int:
    """About the bytes of ``rows`` as JSON: for a disk-full message only (called on the error)."""
    return sum(len(json.dumps(r, ensure_ascii=False)) + 8 for r in rows)


def stream_path(output: Path, rank: int | None = None) -> Path:
    """Where rows stream for ``output``: itself (.jsonl) or OUT.partial.jsonl; per rank under torchrun."""
    base = output if output.suffix.lower() == ".jsonl" and rank is None else output.with_name(output.name + ".partial.jsonl")
    return base if rank is None else output.with_name(f"{output.name}.rank{rank}.jsonl")


def read_done(output: Path) -> dict[str, dict]:
    """Rows already made for ``output``: its stream files (a single run's, every rank's) and, for a
    finished .jsonl output, the output itself."""
    done: dict[str, dict] = {}
    candidates = [stream_path(output), *sorted(output.parent.glob(f"{output.name}.rank*.jsonl"))]
    for path in dict.fromkeys(candidates):
        done.update(RowLog(path).read())
    if output.suffix.lower() != ".jsonl" and output.is_file():
        done.update({r["file"]: r for r in read_rows(output)})
    return done


def read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        return list(RowLog(path).read().values())
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "caption": r["caption"] if not r.get("error") else None} for r in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict]) -> None:
    """The whole output at once (atomically): .jsonl, .json or .csv."""
    suffix = path.suffix.lower()
    with atomic_open(path, newline="") as f:
        if suffix == ".jsonl":
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        elif suffix == ".json":
            json.dump(rows, f, indent=2, ensure_ascii=False)
        else:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def caption_files(captioner, files: list[Path], options: DecodeOptions, *, output: Path | None = None,
                  resume: bool = False, dist: Dist | None = None, progress: Callable[[int, int], None] | None = None,
                  batch_size: int | None = None, num_workers: int = 0,
                  attention_dir: Path | None = None) -> list[dict] | None:
    """Caption ``files`` (under torchrun, rank r of ``dist`` takes every world-th remaining file),
    stream rows to ``output``'s stream file, and (rank 0, once every rank is done) write
    ``output`` whole, in input order. Returns every row in input order on rank 0 (None on other
    ranks).

    ``resume`` skips files that already have a row; without it an existing output is an error.
    """
    d = dist or Dist()
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--output {output}: use a .jsonl, .json or .csv file name")
    done: dict[str, dict] = {}
    if output is not None:
        if resume:
            done = read_done(output)
        elif output.exists() or (d.world == 1 and stream_path(output).exists()):
            raise UserError(f"{output} exists; --resume continues it, or remove it to start over")
    barrier(d)  # every rank has read what is done before any writes
    todo = [f for f in files if str(f) not in done]
    mine = todo[d.rank::d.world]
    log = RowLog(stream_path(output, d.rank if d.world > 1 else None)) if output is not None else None
    made: list[dict] = []
    count = len(files) - len(todo)
    if progress is not None:
        progress(count, len(files))
    generator = options.generator(captioner.device, d.rank)  # one random source for the whole run
    batch_size = batch_size or default_batch_size(captioner.device)
    try:
        for rows in caption_batches(captioner, mine, options, batch_size=batch_size, num_workers=num_workers,
                                    attention_dir=attention_dir, generator=generator):
            if log is not None:
                log.append(rows)
            if output is None:
                made.extend(rows)
            count += len(rows) * d.world
            if progress is not None:
                progress(min(count, len(files)), len(files))
    finally:
        if log is not None:
            log.close()
    barrier(d)  # every rank's part is complete
    if not d.main:
        return None
    if output is None:
        return made
    done = read_done(output)
    rows = [done[str(f)] for f in files if str(f) in done]
    with disk_space(output, lambda: _json_bytes(rows),
                    "the rows made so far are kept: free some space, then rerun with --resume"):
        write_rows(output, rows)
    for part in {stream_path(output), *output.parent.glob(f"{output.name}.rank*.jsonl")}:
        if part != output and part.exists():
            part.unlink()
    return rows


def _heat_colors(weights: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a dark-blue -> red -> yellow ramp."""
    w = np.clip(weights, 0, 1)[..., None]
    low, mid, high = np.array([0, 0, 80.0]), np.array([220, 30, 30.0]), np.array([255, 240, 60.0])
    rgb = np.where(w < 0.5, low + (mid - low) * (w / 0.5), mid + (high - mid) * ((w - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def attention_overlay(base: Image.Image, weights: np.ndarray) -> Image.Image:
    """``base`` (an RGB image) with one word's attention over it as a heat map: ``weights`` is a
    square grid (g, g) or its flattened (g * g,) form, stretched to min-max and upsampled
    bilinearly. A grid that is not square (token models) gives ``base`` unchanged."""
    a = np.asarray(weights, dtype=np.float64)
    g = int(round(a.size ** 0.5))
    if g * g != a.size:
        return base.copy()
    grid = a.reshape(g, g)
    grid = (grid - grid.min()) / (grid.max() - grid.min() + 1e-8)
    heat = Image.fromarray((grid * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    colors = Image.fromarray(_heat_colors(np.asarray(heat) / 255.0))
    return Image.blend(base.convert("RGB"), colors, 0.55)


def attention_figure(image: np.ndarray, words: list[str], alphas: np.ndarray, tile: int = 160) -> Image.Image:
    """The image, then one tile per word with its attention over the image, labelled.

    Args:
        image: uint8 (3, S, S); words: the caption's words; alphas: (T, P) with P a square grid.
    """
    base = Image.fromarray(image.transpose(1, 2, 0)).resize((tile, tile), Image.BICUBIC)
    tiles = [("<image>", base)]
    steps = list(words) + ["<end>"]
    for t, word in enumerate(steps[: alphas.shape[0]]):
        tiles.append((word, attention_overlay(base, alphas[t])))
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
