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
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from capcli.data.images import load_image
from capcli.errors import UserError, disk_space

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


def caption_batches(captioner, files: list[Path], *, beam_size: int = 3, max_length: int | None = None,
                    block_ngrams: int = 0, sample: dict | None = None, batch_size: int | None = None,
                    num_workers: int = 0, attention_dir: Path | None = None) -> Iterator[list[dict]]:
    """Rows for ``files``, a batch at a time, in input order (see the module doc); ``batch_size``
    defaults to the device's (:func:`capcli.evaluate.default_batch_size`)."""
    from capcli.evaluate import default_batch_size

    batch_size = batch_size or default_batch_size(captioner.device)
    loader = DataLoader(ImageFiles(files, captioner.image_size, captioner.resize), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=captioner.device.type == "cuda", generator=torch.Generator())
    model = captioner.model
    model.eval()
    with model.frozen_weights():
        yield from _caption_loader(captioner, loader, files, beam_size=beam_size, max_length=max_length,
                                   block_ngrams=block_ngrams, sample=sample, attention_dir=attention_dir)


def _caption_loader(captioner, loader, files, *, beam_size, max_length, block_ngrams, sample,
                    attention_dir) -> Iterator[list[dict]]:
    from capcli.evaluate import generate

    model, vocab = captioner.model, captioner.vocab
    for batch in loader:
        rows = {i: {"file": str(files[i]), "caption": None, "error": e} for i, e in zip(batch["index"], batch["error"])}
        if batch["images"] is not None:
            ok = [i for i, e in zip(batch["index"], batch["error"]) if e is None]
            with torch.inference_mode():
                texts, result = generate(model, vocab, batch["images"].to(captioner.device, non_blocking=True),
                                         beam_size=beam_size, max_length=max_length or captioner.max_length,
                                         return_alphas=attention_dir is not None, amp_dtype=captioner.amp_dtype,
                                         block_ngrams=block_ngrams, sample=sample)
            for j, (i, text) in enumerate(zip(ok, texts)):
                rows[i]["caption"] = text
                if attention_dir is not None:
                    attention_dir.mkdir(parents=True, exist_ok=True)
                    out = attention_dir / f"{files[i].stem}_attention.png"
                    words = [vocab.itos[t] for t in result.tokens[j]]
                    attention_figure(batch["images"][j].numpy(), words, result.alphas[j].float().cpu().numpy()).save(out)
                    rows[i]["attention_map"] = str(out)
        yield [rows[i] for i in batch["index"]]


class RowLog:
    """Rows appended to a JSONL file as they come (flushed per batch), read back on resume.

    A row torn by a kill (the last line, unfinished) is dropped on reading and cut from the file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def read(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # torn: everything after the last good line goes
                if not line.endswith(b"\n") or not isinstance(row, dict) or "file" not in row:
                    break
                rows[row["file"]] = row
                good += len(line)
        if good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return rows

    def append(self, rows: list[dict]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with disk_space(self.path, len(text.encode()) * 100, "the rows written so far are kept: free some "
                        "space, then rerun with --resume"):
            self._f.write(text)
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    suffix = path.suffix.lower()
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if suffix == ".jsonl":
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        elif suffix == ".json":
            json.dump(rows, f, indent=2, ensure_ascii=False)
        else:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)


def caption_files(captioner, files: list[Path], *, output: Path | None = None, resume: bool = False,
                  rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                  progress: Callable[[int, int], None] | None = None, **decode) -> list[dict] | None:
    """Caption ``files`` (rank ``rank`` of ``world`` takes every world-th remaining file), stream
    rows to ``output``'s stream file, and (rank 0, after ``barrier``) write ``output`` whole, in
    input order. Returns every row in input order on rank 0 (None on other ranks).

    ``resume`` skips files that already have a row; without it an existing output is an error.
    """
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--output {output}: use a .jsonl, .json or .csv file name")
    done: dict[str, dict] = {}
    if output is not None:
        if resume:
            done = read_done(output)
        elif output.exists() or (world == 1 and stream_path(output).exists()):
            raise UserError(f"{output} exists; --resume continues it, or remove it to start over")
    barrier()  # every rank has read what is done before any writes
    todo = [f for f in files if str(f) not in done]
    mine = todo[rank::world]
    log = RowLog(stream_path(output, rank if world > 1 else None)) if output is not None else None
    made: list[dict] = []
    count = len(files) - len(todo)
    if progress is not None:
        progress(count, len(files))
    try:
        for rows in caption_batches(captioner, mine, **decode):
            if log is not None:
                log.append(rows)
            if output is None:
                made.extend(rows)
            count += len(rows) * world
            if progress is not None:
                progress(min(count, len(files)), len(files))
    finally:
        if log is not None:
            log.close()
    barrier()  # every rank's part is complete
    if rank != 0:
        return None
    if output is None:
        return made
    done = read_done(output)
    rows = [done[str(f)] for f in files if str(f) in done]
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
