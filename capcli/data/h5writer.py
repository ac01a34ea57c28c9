"""One split of a dataset dir as an HDF5 file, written in record order and resumable.

A split is written to ``{split}.h5.partial``, created with every chunk allocated up front (and never
filled: the file is sparse), so later writes touch raw data only and a killed process leaves a file
that opens. ``{split}.progress.json`` beside it records, after each flush, how many records were
consumed (in order), how many images were kept and which were skipped; a rerun reopens the partial
file and continues from there. :meth:`SplitWriter.finish` trims the file to the kept images, adds
ids, file names and every reference caption, and renames it to ``{split}.h5``; a run stopped
while it does so leaves the split to be redone (the progress file says ``finishing``).

A full disk. HDF5 cannot recover from metadata it failed to write: dropping any object of that
file then prints a traceback, and closing it crashes the process (HDF5 2.0). So raw data goes
straight to the file (no chunk cache: a write that fails does so in the call that made it, and
leaves nothing unwritten behind), and before each step that adds metadata (creating the file,
finishing it) the free space is checked. Should a metadata write still fail (another process took
the space meanwhile), the file is left open, every object of it kept, and the error holds it
(:func:`capcli.errors.hold_open`), for the command line to end the process without closing it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from capcli.data.records import Record
from capcli.data.vocab import Vocab
from capcli.errors import hold_open
from capcli.store.files import write_json

FLUSH_RECORDS = 512  # flush (and record progress) at least every this many records ...
FLUSH_SECONDS = 2.0  # ... or this many seconds, whichever comes first
NO_CHUNK_CACHE = {"rdcc_nbytes": 0}  # raw data written (or failed) in the call that writes it


def require_space(path: Path, nbytes: float) -> None:
    """An ENOSPC OSError for ``path`` unless its filesystem has ``nbytes`` free."""
    if shutil.disk_usage(path.parent).free < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def metadata_bytes(chunks: int) -> int:
    """Room for the HDF5 metadata of a file of ``chunks`` chunks allocated up front: mostly its
    chunk index, an entry a chunk, with a margin."""
    return (64 << 10) + 256 * chunks


def create_split_file(path: Path, fp: str, n: int, k: int, S: int, max_length: int) -> h5py.File:
    """A fresh partial file with every chunk allocated up front (and never filled: sparse), so
    later writes only touch raw data and a kill cannot leave the HDF5 metadata half-written."""
    L = max_length + 2
    rows = max(1, min(n * k, 65536 // L))
    require_space(path, metadata_bytes(n + math.ceil(n * k / rows) + 2 * math.ceil(n * k / 16384)))
    f = h5py.File(path, "w", **NO_CHUNK_CACHE)
    f.attrs.update({"captions_per_image": k, "max_length": max_length, "image_size": S,
                    "fingerprint": fp, "complete": False})

    def dataset(name, shape, dtype, chunks):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return f.create_dataset(name, shape, dtype=dtype, chunks=chunks, maxshape=(None,) + shape[1:],
                                dcpl=dcpl, fill_time="never")

    dataset("images", (n, 3, S, S), "uint8", (1, 3, S, S))
    dataset("captions", (n * k, L), "int32", (rows, L))
    dataset("caption_lengths", (n * k,), "int32", (min(n * k, 16384),))
    dataset("caption_image", (n * k,), "int32", (min(n * k, 16384),))
    f.flush()
    return f


def open_partial(out: Path, split: str, fp: str, n: int, k: int, S: int, max_length: int):
    """(file, records done, images kept, skipped so far), resuming when a matching partial exists."""
    tmp = out / f"{split}.h5.partial"
    prog = out / f"{split}.progress.json"
    if tmp.is_file() and prog.is_file():
        f = None
        try:
            p = json.loads(prog.read_text())
            if p.get("fingerprint") == fp and not p.get("finishing") and 0 <= p["kept"] <= p["processed"] <= n:
                f = h5py.File(tmp, "r+", **NO_CHUNK_CACHE)
                if (f.attrs.get("fingerprint") == fp and f["images"].shape[0] == n
                        and f["captions"].shape == (n * k, max_length + 2) and f["images"].shape[-1] == S):
                    return f, int(p["processed"]), int(p["kept"]), list(p["skipped"])
        except (OSError, KeyError, ValueError, TypeError):
            pass  # unreadable leftovers: start this split again
        if f is not None:
            f.close()
    prog.unlink(missing_ok=True)
    return create_split_file(tmp, fp, n, k, S, max_length), 0, 0, []


class SplitWriter:
    """Writes the ``n`` records of one split in order: :meth:`add` a kept image with its encoded
    captions, :meth:`skip` one that could not be read; both flush (data, then the progress file)
    every :data:`FLUSH_RECORDS` records or :data:`FLUSH_SECONDS`. :meth:`finish` completes the
    file. Reopens a matching partial file: ``start`` records are done already. Use as a context
    manager: after an error the file is closed with what was flushed, for a rerun to continue."""

    def __init__(self, out: Path, split: str, n: int, *, fingerprint: str, captions_per_image: int,
                 image_size: int, max_length: int):
        self.split, self.n, self.fp, self.k = split, n, fingerprint, captions_per_image
        self.path = out / f"{split}.h5"
        self.partial = out / f"{split}.h5.partial"
        self.progress_path = out / f"{split}.progress.json"
        self.file, self.processed, self.kept, self.skipped = open_partial(
            out, split, fingerprint, n, captions_per_image, image_size, max_length)
        self.start = self.processed
        f = self.file
        self.images, self.captions = f["images"], f["captions"]
        self.lengths, self.caption_image = f["caption_lengths"], f["caption_image"]
        self._objects: list = []  # what finishing the file opens: dropped only once it is closed
        self._stuck = False  # HDF5 failed to write what it holds: the file stays open (see close)
        # Images go to HDF5 in small blocks (one h5py call per block, not per image).
        S = image_size
        self._block = np.empty((max(1, min(32, (8 << 20) // (3 * S * S))), 3, S, S), dtype=np.uint8)
        self._in_block = 0
        self._rows: list[np.ndarray] = []  # caption rows of images rows_from .. kept - 1, not yet written
        self._lengths: list[np.ndarray] = []
        self._rows_from = self.kept
        self._since_flush = 0
        self._last_flush = time.perf_counter()

    def add(self, image: np.ndarray, caption_rows: np.ndarray, lengths: np.ndarray) -> None:
        """The next record: an image (3, S, S) kept, with its ``k`` caption rows and their lengths."""
        self._block[self._in_block] = image
        self._in_block += 1
        self._rows.append(caption_rows)
        self._lengths.append(lengths)
        self.kept += 1
        if self._in_block == len(self._block):
            self._write_block()
        self._advance()

    def skip(self, entry: dict) -> None:
        """The next record, skipped: ``entry`` says which and why (listed in ``skipped.json``)."""
        self.skipped.append(entry)
        self._advance()

    def _advance(self) -> None:
        self.processed += 1
        self._since_flush += 1
        if self._since_flush >= FLUSH_RECORDS or time.perf_counter() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def _write_block(self) -> None:
        if self._in_block:
            self.images[self.kept - self._in_block:self.kept] = self._block[:self._in_block]
            self._in_block = 0

    def flush(self) -> None:
        """Write what is buffered, then record the progress (so it never runs ahead of the data)."""
        self._write_block()
        if self._rows:
            lo, hi = self._rows_from * self.k, self.kept * self.k
            self.captions[lo:hi] = np.concatenate(self._rows)
            self.lengths[lo:hi] = np.concatenate(self._lengths)
            self.caption_image[lo:hi] = np.repeat(np.arange(self._rows_from, self.kept, dtype=np.int32), self.k)
        self._rows, self._lengths, self._rows_from = [], [], self.kept
        self.file.flush()  # raw data only: the metadata was written, complete, at creation
        self._save_progress()
        self._since_flush, self._last_flush = 0, time.perf_counter()

    def _save_progress(self, **extra) -> None:
        write_json(self.progress_path, {"fingerprint": self.fp, "processed": self.processed, "kept": self.kept,
                                        "skipped": self.skipped, **extra}, indent=1)

    def finish(self, records: list[Record], vocab: Vocab) -> tuple[dict, list[dict]]:
        """Complete the file (every record done and flushed) and rename it into place:
        (summary, skipped)."""
        gone = {e["index"] for e in self.skipped}
        kept = [r for i, r in enumerate(records) if i not in gone]
        require_space(self.partial, _finalize_bytes(kept))
        self._save_progress(finishing=True)  # from here on a stopped run leaves a file to redo, not to resume
        summary = _finalize(self.file, kept, self.kept, self.k, vocab, self._objects)
        self.close()
        os.replace(self.partial, self.path)
        self.progress_path.unlink(missing_ok=True)
        summary["skipped"] = len(self.skipped)
        return summary, [{key: v for key, v in e.items() if key != "index"} for e in self.skipped]

    def close(self) -> None:
        """Close the file. Should HDF5 fail to write what it holds (a full disk), the error is
        raised and the file left open, for good: closing it would crash the process (see the
        module doc)."""
        if self.file is None or self._stuck:
            return
        try:
            self.file.flush()
        except Exception:
            self._stuck = True
            raise
        self.file.close()
        self.file = None
        self._objects.clear()

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()  # what was flushed stays, for a rerun to continue
        except Exception:
            pass  # the error that got here says more
        if self._stuck:
            hold_open(exc, self)


def percentiles(values, qs=(50, 90, 99)) -> dict:
    arr = np.asarray(values)
    if arr.size == 0:
        return {f"p{q}": 0 for q in qs}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def _new_dataset(f: h5py.File, name: str, shape: tuple, dtype, objects: list) -> h5py.Dataset:
    if name in f:
        del f[name]
    ds = f.create_dataset(name, shape=shape, dtype=dtype)
    objects.append(ds)
    return ds


def _write_strings(ds: h5py.Dataset, strings: Iterable[str], batch: int = 8192) -> None:
    """UTF-8 strings into ``ds``, in batches (no whole-array copy in memory)."""
    buf: list[str] = []
    pos = 0
    for text in strings:
        buf.append(text)
        if len(buf) == batch:
            ds[pos:pos + batch] = np.asarray(buf, dtype=object)
            pos += batch
            buf = []
    if buf:
        ds[pos:pos + len(buf)] = np.asarray(buf, dtype=object)


def _finalize_bytes(kept: list[Record]) -> int:
    """About what :func:`_finalize` adds to the file (names and references in HDF5's heap, ids,
    offsets), with a margin."""
    strings = sum(len(r.file_name.encode()) + 48 for r in kept)
    strings += sum(len(c.encode()) + 48 for r in kept for c in r.captions)
    return int(1.5 * (strings + 16 * len(kept))) + (256 << 10)


def _finalize(f: h5py.File, kept: list[Record], m: int, k: int, vocab: Vocab, objects: list) -> dict:
    """Trim to the ``m`` kept images, add ids, names and every reference; summary statistics from
    the written captions (so a resumed run reports what an uninterrupted one would). Every HDF5
    object it opens goes to ``objects``, so that none is closed before the file (see the module doc)."""
    assert len(kept) == m, (len(kept), m)
    data = {name: f[name] for name in ("images", "captions", "caption_lengths", "caption_image")}
    objects.extend(data.values())
    data["images"].resize(m, axis=0)
    for name in ("captions", "caption_lengths", "caption_image"):
        data[name].resize(m * k, axis=0)
    text = h5py.string_dtype("utf-8")
    _new_dataset(f, "image_ids", (m,), np.int64, objects)[:] = np.asarray([r.image_id for r in kept], dtype=np.int64)
    _write_strings(_new_dataset(f, "file_names", (m,), text, objects), (r.file_name for r in kept))
    offsets = np.cumsum([0] + [len(r.captions) for r in kept]).astype(np.int64)
    _write_strings(_new_dataset(f, "references", (int(offsets[-1]),), text, objects),
                   (c for r in kept for c in r.captions))
    _new_dataset(f, "reference_offsets", offsets.shape, np.int64, objects)[:] = offsets
    lengths = data["caption_lengths"][:].astype(np.int64) - 2
    unk = 0
    for lo in range(0, m * k, 16384):
        unk += int(np.count_nonzero(data["captions"][lo:lo + 16384] == vocab.unk))
    f.attrs["complete"] = True
    return {
        "images": m,
        "captions": m * k,
        "references": int(offsets[-1]),
        "unk_share": round(unk / max(int(lengths.sum()), 1), 5),
        "caption_length": percentiles(lengths),
    }
