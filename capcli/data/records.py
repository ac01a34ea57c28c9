"""What a source yields for ``prepare`` (one :class:`Record` per image) and why an image is skipped.

Every source (synthetic scenes, COCO, a Karpathy split file, a folder + captions file) turns its
input into a list of records; :func:`capcli.data.prepare.write_dataset` decodes their pixels with a
loader (:func:`load_file_image` for photo files) and skips, with a reason from :func:`skip_reason`,
the images that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capcli.data.images import load_image


@dataclass
class Record:
    """One image of a source: where its pixels come from and all its reference captions."""

    split: str
    image_id: int
    file_name: str
    captions: list[str]
    source: Any = None  # a file path for photo sources; a scene spec for synthetic scenes
    tokens: list[list[str]] = field(default_factory=list)  # unused by write_dataset (kept for callers)


@dataclass(frozen=True)
class OutsideRoot:
    """The source of a record whose image path (as a captions file writes it) leads out of the
    image root (``../..``, an absolute path elsewhere): the record is skipped, the path never opened."""

    path: str
    root: str

    def __str__(self) -> str:
        return self.path


class PathOutsideRoot(Exception):
    """Raised instead of opening an :class:`OutsideRoot` path."""


def load_file_image(source: Any, size: int, policy: str) -> np.ndarray:
    """The loader of photo sources: the file at ``source`` as uint8 (3, size, size)."""
    if isinstance(source, OutsideRoot):
        raise PathOutsideRoot(f"{source.path} is outside the image root {source.root}; image paths in a captions "
                              "file must stay under --images")
    return load_image(source, size, policy)


def skip_reason(exc: BaseException) -> str:
    """A short category for why an image could not be used."""
    import errno

    from PIL import Image, UnidentifiedImageError

    msg = str(exc).lower()
    if isinstance(exc, PathOutsideRoot):
        return "outside the image root"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        return "unreadable"
    if isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.EACCES, errno.EIO, errno.ENAMETOOLONG):
        return "unreadable"  # a symlink loop, a permission or disk problem
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large"
    if "truncated" in msg:
        return "truncated"
    return "corrupt"
