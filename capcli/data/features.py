"""Feature cache for a frozen encoder: each image is encoded once and its region features stored
beside the dataset under ``features/``, so training the decoder never runs the backbone again.

The cache file is named by a fingerprint of everything the features depend on (encoder name,
weights checksum, grid, image size, split), so a changed encoder never reads stale features.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from capcli.data.dataset import CaptionDataset, collate


def encoder_fingerprint(encoder) -> str:
    h = hashlib.sha1()
    h.update(f"{encoder.name}|{encoder.grid}|{encoder.image_size}".encode())
    for name, p in sorted(encoder.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(dataset: CaptionDataset, encoder) -> Path:
    return dataset.dir / "features" / f"{encoder.name}-{encoder_fingerprint(encoder)}" / f"{dataset.split}.h5"


@torch.inference_mode()
def build_cache(encoder, dataset: CaptionDataset, device: torch.device, path: Path, *, batch_size: int = 64,
                amp_dtype=None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode every image of ``dataset`` once into ``path`` (from :func:`cache_path`; float16 on
    disk); a finished cache is reused."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.partial")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    try:
        with h5py.File(tmp, "w") as f:
            ds = None
            done = 0
            for batch in loader:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    regions = encoder.regions(batch["images"].to(device))
                arr = regions.float().cpu().numpy().astype(np.float16)
                if ds is None:
                    ds = f.create_dataset("regions", (len(dataset), *arr.shape[1:]), dtype="float16",
                                          chunks=(1, *arr.shape[1:]))
                ds[done:done + len(arr)] = arr
                done += len(arr)
                if progress is not None:
                    progress(done, len(dataset))
        os.replace(tmp, path)
    finally:
        encoder.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path


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
