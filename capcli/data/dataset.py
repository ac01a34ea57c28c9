"""Reading a dataset dir: manifest, vocabulary and per-split HDF5 files.

The HDF5 file is opened lazily in each process (h5py handles cannot be pickled into DataLoader
workers), so ``num_workers > 0`` works. Training items are whole images with all their sampled
captions: each image is read and encoded once per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from capcli.data.vocab import Vocab
from capcli.errors import UserError


def read_manifest(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"dataset dir {d} does not exist; make one with `capcli prepare synthetic --out {d}`")
    m = d / "manifest.json"
    if not m.is_file():
        raise UserError(f"{d} is not a capcli dataset dir (no manifest.json); make one with `capcli prepare`")
    return json.loads(m.read_text())


def split_path(data_dir: str | Path, split: str) -> Path:
    manifest = read_manifest(data_dir)
    if split not in manifest.get("splits", {}):
        known = ", ".join(manifest.get("splits", {}))
        raise UserError(f"dataset {data_dir} has no split {split!r}; it has: {known}")
    path = Path(data_dir) / f"{split}.h5"
    if not path.is_file():
        raise UserError(f"split file {path} is missing; rerun `capcli prepare` for {data_dir}")
    return path


class CaptionDataset(Dataset):
    """Items: ``image`` uint8 (3, S, S), ``captions`` long (K, L+2), ``lengths`` long (K,), ``index``."""

    def __init__(self, data_dir: str | Path, split: str, max_images: int = 0):
        self.dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.dir)
        self.path = split_path(self.dir, split)
        self.vocab = Vocab.load(self.dir / "vocab.json")
        with h5py.File(self.path, "r") as f:
            self.num_images = int(f["images"].shape[0])
            self.captions_per_image = int(f.attrs["captions_per_image"])
            self.max_length = int(f.attrs["max_length"])
            self.image_size = int(f["images"].shape[-1])
        if max_images and max_images < self.num_images:
            self.num_images = max_images
        self._h5: h5py.File | None = None
        self._references: list[list[str]] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None  # reopened in the worker
        return state

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def __len__(self) -> int:
        return self.num_images

    def caption_item(self, i: int) -> dict:
        """Image i's sampled captions (K, L+2), their lengths (K,) and its index, without pixels."""
        f = self.h5
        k = self.captions_per_image
        return {
            "captions": torch.from_numpy(f["captions"][i * k:(i + 1) * k].astype(np.int64)),
            "lengths": torch.from_numpy(f["caption_lengths"][i * k:(i + 1) * k].astype(np.int64)),
            "index": i,
        }

    def __getitem__(self, i: int) -> dict:
        item = self.caption_item(i)
        item["image"] = torch.from_numpy(self.h5["images"][i])
        return item

    def references(self) -> list[list[str]]:
        """Every raw reference caption of each image (not just the sampled ones); read once, then
        kept (validation asks for them every epoch)."""
        if self._references is None:
            f = self.h5
            refs = f["references"].asstr()[:]
            offsets = f["reference_offsets"][:]
            self._references = [list(refs[offsets[i]:offsets[i + 1]]) for i in range(self.num_images)]
        return self._references

    def image_ids(self) -> list[int]:
        return [int(x) for x in self.h5["image_ids"][: self.num_images]]

    def file_names(self) -> list[str]:
        return list(self.h5["file_names"].asstr()[: self.num_images])


def collate(items: list[dict]) -> dict:
    return {
        "images": torch.stack([it["image"] for it in items]),
        "captions": torch.stack([it["captions"] for it in items]),  # (B, K, L+2)
        "lengths": torch.stack([it["lengths"] for it in items]),  # (B, K)
        "index": torch.tensor([it["index"] for it in items]),
    }
