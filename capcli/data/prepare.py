"""Sources -> dataset dir: vocabulary from the training captions, one chunked HDF5 file per split.

Every source (synthetic scenes, COCO, Karpathy JSON, a folder + captions file) is turned into a
list of :class:`Record` and handed to :func:`write_dataset`, which decodes images in worker
processes, streams them into HDF5 and writes ``vocab.json`` and ``manifest.json`` last.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

import capcli
from capcli.data.images import load_image
from capcli.data.vocab import Vocab
from capcli.errors import UserError
from capcli.text import tokenize

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Record:
    """One image of a source: where its pixels come from and all its reference captions."""

    split: str
    image_id: int
    file_name: str
    captions: list[str]
    source: Any = None  # a file path for photo sources; a scene spec for synthetic scenes
    tokens: list[list[str]] = field(default_factory=list)


def load_file_image(source: Any, size: int, policy: str) -> np.ndarray:
    return load_image(source, size, policy)


def _load_one(loader: Callable, size: int, policy: str, item: tuple[int, Any]):
    i, source = item
    try:
        return i, loader(source, size, policy), None
    except Exception as exc:  # corrupt, truncated, missing, unreadable: skipped, with the reason
        return i, None, f"{type(exc).__name__}: {exc}"


def sample_captions(n: int, k: int, seed: int, image_id: int, valid: list[int]) -> list[int]:
    """k caption indices for one image: a sample without replacement when it has k, else padded
    with repeats; deterministic per (seed, image_id) whatever the processing order."""
    rng = random.Random(f"{seed}:{image_id}")
    pool = valid or list(range(n))
    if len(pool) >= k:
        return rng.sample(pool, k)
    return pool + [rng.choice(pool) for _ in range(k - len(pool))]


def percentiles(values: list[int], qs=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{q}": 0 for q in qs}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def write_dataset(
    records: list[Record],
    out_dir: str | Path,
    *,
    source: str,
    image_size: int = 256,
    loader: Callable[[Any, int, str], np.ndarray] = load_file_image,
    captions_per_image: int = 5,
    min_word_freq: int = 5,
    max_length: int = 50,
    resize_policy: str = "squash",
    workers: int = 0,
    seed: int = 0,
    progress: ProgressFn | None = None,
    extra_manifest: dict | None = None,
) -> dict:
    """Write the dataset dir and return the summary that goes into ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise UserError(f"no images with captions found for {out}; check the input paths")
    for r in records:
        r.tokens = [tokenize(c) for c in r.captions]
    splits = sorted({r.split for r in records}, key=lambda s: ("train", "val", "test").index(s)
                    if s in ("train", "val", "test") else 9)
    if "train" not in splits:
        raise UserError("the data has no training split; every source needs train images")
    vocab = Vocab.build((t for r in records if r.split == "train" for t in r.tokens), min_word_freq)

    workers = workers if workers > 0 else 0
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    skipped: list[dict] = []
    summary_splits: dict[str, dict] = {}
    t0 = time.perf_counter()
    try:
        for split in splits:
            recs = [r for r in records if r.split == split]
            summary_splits[split] = _write_split(
                recs, out / f"{split}.h5", split, vocab, image_size=image_size, loader=loader,
                k=captions_per_image, max_length=max_length, policy=resize_policy, pool=pool,
                seed=seed, progress=progress, skipped=skipped)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if sum(s["images"] for s in summary_splits.values()) == 0:
        raise UserError(f"every image was skipped ({len(skipped)}); see the reasons in {out / 'skipped.json'}")
    vocab.save(out / "vocab.json")
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
    manifest = {
        "capcli_version": capcli.__version__,
        "source": source,
        "image_size": image_size,
        "resize": resize_policy,
        "captions_per_image": captions_per_image,
        "tokenizer": "coco-ptb (capcli.text.tokenize)",
        "vocab": {"size": len(vocab), "min_word_freq": min_word_freq, "max_length": max_length},
        "splits": summary_splits,
        "skipped": len(skipped),
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        **(extra_manifest or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_split(recs, path: Path, split: str, vocab: Vocab, *, image_size, loader, k, max_length,
                 policy, pool, seed, progress, skipped) -> dict:
    n = len(recs)
    tmp = path.with_suffix(".h5.partial")
    S, L = image_size, max_length + 2
    unk = total_tokens = 0
    lengths_all: list[int] = []
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"captions_per_image": k, "max_length": max_length, "image_size": S})
        images = f.create_dataset("images", (n, 3, S, S), dtype="uint8", maxshape=(None, 3, S, S),
                                  chunks=(1, 3, S, S))
        caps = f.create_dataset("captions", (n * k, L), dtype="int32", maxshape=(None, L))
        lens = f.create_dataset("caption_lengths", (n * k,), dtype="int32", maxshape=(None,))
        cimg = f.create_dataset("caption_image", (n * k,), dtype="int32", maxshape=(None,))
        kept: list[Record] = []
        fn = partial(_load_one, loader, S, policy)
        items = ((i, r.source) for i, r in enumerate(recs))
        results = pool.imap(fn, items, chunksize=4) if pool is not None else map(fn, items)
        for done, (i, arr, err) in enumerate(results, 1):
            r = recs[i]
            if err is not None:
                skipped.append({"split": split, "image_id": r.image_id, "file": r.file_name, "reason": err})
            else:
                j = len(kept)
                images[j] = arr
                valid = [c for c, t in enumerate(r.tokens) if 0 < len(t) <= max_length]
                rows, row_lens = [], []
                for c in sample_captions(len(r.tokens), k, seed, r.image_id, valid):
                    toks = r.tokens[c][:max_length]
                    ids = vocab.encode(toks, max_length)
                    rows.append(ids)
                    row_lens.append(len(toks) + 2)
                    unk += sum(1 for t in ids if t == vocab.unk)
                    total_tokens += len(toks)
                    lengths_all.append(len(toks))
                caps[j * k:(j + 1) * k] = np.asarray(rows, dtype=np.int32)
                lens[j * k:(j + 1) * k] = row_lens
                cimg[j * k:(j + 1) * k] = j
                kept.append(r)
            if progress is not None:
                progress(split, done, n)
        m = len(kept)
        for ds in (images, caps, lens, cimg):
            ds.resize(m * (k if ds.name != "/images" else 1), axis=0)
        f.create_dataset("image_ids", data=np.asarray([r.image_id for r in kept], dtype=np.int64))
        str_dt = h5py.string_dtype("utf-8")
        f.create_dataset("file_names", data=np.asarray([r.file_name for r in kept], dtype=object), dtype=str_dt)
        refs = [c for r in kept for c in r.captions]
        offsets = np.cumsum([0] + [len(r.captions) for r in kept]).astype(np.int64)
        f.create_dataset("references", data=np.asarray(refs, dtype=object), dtype=str_dt)
        f.create_dataset("reference_offsets", data=offsets)
    os.replace(tmp, path)
    return {
        "images": m,
        "captions": m * k,
        "references": int(offsets[-1]),
        "unk_share": round(unk / max(total_tokens, 1), 5),
        "caption_length": percentiles(lengths_all),
    }
