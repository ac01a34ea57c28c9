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


# what every split file holds (see capcli.data.prepare)
SPLIT_DATASETS = ("images", "captions", "caption_lengths", "caption_image", "image_ids", "file_names",
                  "references", "reference_offsets")
SPLIT_ATTRS = ("captions_per_image", "max_length")


def _redo(d: Path) -> str:
    return f"rerun `capcli prepare ... --out {d} --overwrite` to rebuild it"


def read_manifest(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"dataset dir {d} does not exist; make one with `capcli prepare synthetic --out {d}`")
    m = d / "manifest.json"
    if not m.is_file():
        raise UserError(f"{d} is not a capcli dataset dir (no manifest.json); make one with `capcli prepare`")
    try:
        manifest = json.loads(m.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{m} is not valid JSON ({str(exc)[:120]}): the dataset dir is damaged; {_redo(d)}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{m} is not a capcli dataset manifest (no 'splits'); {_redo(d)}")
    return manifest


def split_path(data_dir: str | Path, split: str, manifest: dict | None = None) -> Path:
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    if split not in manifest["splits"]:
        known = ", ".join(manifest["splits"])
        raise UserError(f"dataset {data_dir} has no split {split!r}; it has: {known}")
    path = Path(data_dir) / f"{split}.h5"
    if not path.is_file():
        raise UserError(f"split file {path} is missing; rerun `capcli prepare` for {data_dir}")
    return path


def check_split_file(path: Path, manifest: dict, split: str) -> dict:
    """Open a split file once and check it is whole and agrees with the manifest: a one-line
    UserError otherwise. Returns its shape facts (images, captions per image, max length, size)."""
    d = path.parent
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path} cannot be read as HDF5 ({first}); it is truncated or damaged (a copy cut "
                        f"short?): copy it again, or {_redo(d)}") from exc
    try:
        with f:
            missing = [name for name in SPLIT_DATASETS if name not in f]
            missing += [f"attribute {a}" for a in SPLIT_ATTRS if a not in f.attrs]
            if missing:
                raise UserError(f"{path} is not a capcli split file (it lacks {', '.join(missing)}); {_redo(d)}")
            n = int(f["images"].shape[0])
            facts = {"images": n, "captions_per_image": int(f.attrs["captions_per_image"]),
                     "max_length": int(f.attrs["max_length"]), "image_size": int(f["images"].shape[-1])}
            k = facts["captions_per_image"]
            if f["captions"].shape[0] != n * k or int(f["reference_offsets"].shape[0]) != n + 1:
                raise UserError(f"{path} is inconsistent ({n} images, {f['captions'].shape[0]} captions, "
                                f"{k} per image); {_redo(d)}")
    except OSError as exc:  # metadata readable, the rest cut off
        raise UserError(f"{path} cannot be read ({str(exc)[:120]}); it is truncated or damaged: {_redo(d)}") from exc
    listed = manifest["splits"][split].get("images") if isinstance(manifest["splits"][split], dict) else None
    if listed is not None and listed != n:
        raise UserError(f"{path} holds {n} images but {d / 'manifest.json'} says {listed}: the files do not "
                        f"belong together (copied from different runs?); {_redo(d)}")
    return facts


class CaptionDataset(Dataset):
    """Items: ``image`` uint8 (3, S, S), ``captions`` long (K, L+2), ``lengths`` long (K,), ``index``."""

    def __init__(self, data_dir: str | Path, split: str, max_images: int = 0):
        self.dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.dir)
        self.path = split_path(self.dir, split, self.manifest)
        self.vocab = Vocab.load(self.dir / "vocab.json")
        facts = check_split_file(self.path, self.manifest, split)
        self.num_images = facts["images"]
        self.captions_per_image = facts["captions_per_image"]
        self.max_length = facts["max_length"]
        self.image_size = facts["image_size"]
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


def trim_padding(batch: dict) -> dict:
    """The batch's captions cut after its longest caption (stored captions are padded to the
    dataset's longest, often three times a typical one): read on the CPU, before any transfer."""
    longest = int(batch["lengths"].max())
    return {**batch, "captions": batch["captions"][:, :, :longest]}
