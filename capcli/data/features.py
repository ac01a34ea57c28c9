"""Feature cache for a frozen encoder: each image is encoded once and its region features stored
beside the dataset under ``features/``, so training the decoder (and validating it) never runs the
backbone again.

``features/<encoder>-<fingerprint>/<split>.h5`` (or ``<split>-first<N>.h5`` for the first N images
of a split, and ``-bf16`` / ``-fp16`` before ``.h5`` for features made under autocast): the
fingerprint covers everything the features depend on (encoder name, a checksum of its weights, grid,
image size) and the name the precision they were made in, so a changed encoder never reads stale
features and a float32 evaluation never reads bf16-made ones.

A cache is written to ``<name>.partial`` and renamed when complete, so only finished files are read.
The partial file records how many images it holds: a stopped pass (a time budget, a kill, a full
disk) continues from there; a partial file that cannot be read is started over. As a dataset split
is (:mod:`capcli.data.h5writer`), it is created with every chunk allocated up front and its
counters in place, and written without a chunk cache, so that a full disk fails the write that met
it and leaves HDF5 nothing it cannot write.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from capcli.data.dataset import CaptionDataset, collate
from capcli.data.h5writer import NO_CHUNK_CACHE, metadata_bytes, require_space
from capcli.errors import disk_space, hold_open
from capcli.runtime import amp_name, autocast


def encoder_fingerprint(encoder) -> str:
    h = hashlib.sha1()
    h.update(f"{encoder.name}|{encoder.grid}|{encoder.image_size}".encode())
    for name, p in sorted(encoder.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir(data_dir: str | Path, encoder) -> Path:
    """The folder of this encoder's caches in a dataset dir (hashes the weights: call once a run)."""
    return Path(data_dir) / "features" / f"{encoder.name}-{encoder_fingerprint(encoder)}"


def cache_file(folder: Path, dataset: CaptionDataset, amp_dtype: torch.dtype | None = None) -> Path:
    """The cache of ``dataset`` (a split, perhaps limited to its first images) in ``folder``, made
    in full precision or under autocast at ``amp_dtype``."""
    with h5py.File(dataset.path, "r") as f:
        split_images = int(f["images"].shape[0])
    suffix = "" if len(dataset) == split_images else f"-first{len(dataset)}"
    precision = "" if amp_dtype is None else f"-{amp_name(amp_dtype)}"
    return folder / f"{dataset.split}{suffix}{precision}.h5"


def _open_partial(tmp: Path, n: int) -> tuple[h5py.File | None, int]:
    """Reopen a partial cache of ``n`` images for appending: (file, images done), or (None, 0)."""
    if not tmp.exists():
        return None, 0
    try:
        f = h5py.File(tmp, "a", **NO_CHUNK_CACHE)
        if "regions" in f and f["regions"].shape[0] == n:
            return f, int(f.attrs.get("done", 0))
        f.close()
    except (OSError, KeyError):  # torn by a kill: start over
        pass
    tmp.unlink()
    return None, 0


def _create_partial(tmp: Path, n: int, shape: tuple) -> h5py.File:
    """A fresh partial cache of ``n`` images of ``shape``: every chunk allocated up front (and never
    filled: sparse) and the counters in place, so that writing it changes no HDF5 metadata but the
    counters' values."""
    require_space(tmp, metadata_bytes(n))
    f = h5py.File(tmp, "w", **NO_CHUNK_CACHE)
    f.attrs["done"] = 0
    f.attrs["complete"] = False
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset("regions", (n, *shape), dtype="float16", chunks=(1, *shape), dcpl=dcpl, fill_time="never")
    f.flush()
    return f


@torch.inference_mode()
def build_cache(encoder, dataset: CaptionDataset, device: torch.device, path: Path, *, batch_size: int = 64,
                amp_dtype=None, deadline: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> bool:
    """Encode every image of ``dataset`` once into ``path`` (float16 on disk); a finished cache is
    reused. Returns True when the cache is complete, False when ``deadline`` (a
    ``time.perf_counter()`` value) came first: the partial file continues on the next call."""
    if path.is_file():
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    f, done = _open_partial(tmp, len(dataset))
    was_training = encoder.training
    encoder.eval()
    todo = Subset(dataset, range(done, len(dataset)))
    # own generator: building a cache never draws from the global RNG (exact resume)
    loader = DataLoader(todo, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        generator=torch.Generator())
    try:
        if progress is not None:
            progress(done, len(dataset))
        for batch in loader:
            with autocast(device, amp_dtype):
                regions = encoder.regions(batch["images"].to(device))
            arr = regions.float().cpu().numpy().astype(np.float16)
            left = arr[0].nbytes * (len(dataset) - done)
            with disk_space(tmp, left, f"the {done} images cached so far are kept: free some space and rerun"):
                if f is None:
                    f = _create_partial(tmp, len(dataset), arr.shape[1:])
                f["regions"][done:done + len(arr)] = arr
                f.attrs.modify("done", done + len(arr))  # after the data: a kill leaves the count at most behind it
                f.flush()
            done += len(arr)
            if progress is not None:
                progress(done, len(dataset))
            if deadline is not None and time.perf_counter() > deadline and done < len(dataset):
                return False
        with disk_space(tmp, 64 << 10, f"the {done} images cached are kept: free some space and rerun"):
            if f is None:  # an empty split
                f = h5py.File(tmp, "w", **NO_CHUNK_CACHE)
                f.create_dataset("regions", (0, 0, 0), dtype="float16")
            f.attrs.modify("complete", True)
            f.flush()
        f.close()
        f = None
        os.replace(tmp, path)
        return True
    except BaseException as exc:
        if f is not None:
            try:
                f.flush()
            except Exception:  # HDF5 cannot write what it holds: closing the file would crash the process
                hold_open(exc, f)
                f = None
        raise
    finally:
        if f is not None:
            f.close()
        encoder.train(was_training)


class CachedFeatureDataset(Dataset):
    """A CaptionDataset whose items carry ``regions`` (P, C) from the cache instead of ``image``."""

    def __init__(self, dataset: CaptionDataset, path: Path):
        self.dataset = dataset
        self.path = path
        self._h5: h5py.File | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        item = self.dataset.caption_item(i)
        item["regions"] = torch.from_numpy(self._h5["regions"][i])
        return item


def collate_cached(items: list[dict]) -> dict:
    return {
        "regions": torch.stack([it["regions"] for it in items]),
        "captions": torch.stack([it["captions"] for it in items]),
        "lengths": torch.stack([it["lengths"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
