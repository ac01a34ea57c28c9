"""How fast ``prepare`` turns image files into a dataset, next to bare Pillow on the same files.

The baseline is the least a decoding pipeline can do: a process pool of the same size, each
worker doing ``Image.open`` + ``convert("RGB")`` + ``resize`` (bicubic, to size x size) and
returning nothing. The prepare path is the real one: :func:`capcli.data.prepare.write_dataset`
into a temporary dir (EXIF orientation, mode fixes, transfer to the writer process, HDF5 writes,
captions, vocabulary, manifest). Both timings include starting the pool; the files are read once
beforehand so both find them in the page cache. ``ratio`` = prepare / bare images per second.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from capcli.data.images import find_images
from capcli.data.parallel import WorkerPool
from capcli.data.prepare import write_dataset
from capcli.data.records import Record
from capcli.errors import UserError
from capcli.runtime import usable_cpus


def _bare(size: int, draft: bool, path: str):
    from PIL import Image

    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft("RGB", (size * 2, size * 2))
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        return im.size


def bare_pillow(files: Sequence[str], size: int, workers: int, draft: bool = False) -> float:
    """Seconds for bare Pillow decode + RGB + resize of ``files`` with ``workers`` processes."""
    from functools import partial

    fn = partial(_bare, size, draft)
    t0 = time.perf_counter()
    if workers > 1:
        with WorkerPool(workers) as pool:
            chunksize = max(1, min(8, len(files) // (workers * 8) or 1))
            for _ in pool.executor.map(fn, files, chunksize=chunksize):
                pass
    else:
        for f in files:
            fn(f)
    return time.perf_counter() - t0


def _peak_rss_mb() -> dict:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return {}
    scale = 1 / 1024 if sys.platform.startswith("linux") else 1 / (1024 * 1024)  # KiB on Linux, bytes on macOS
    return {"parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1)}


def bench_prepare(images: str | Path | Sequence[str | Path], size: int = 256, workers: int | None = None, *,
                  resize_policy: str = "squash", repeats: int = 1, limit: int = 0, bare_draft: bool = False,
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Images per second of bare Pillow decode+resize and of the full prepare path, same files,
    same number of worker processes (default: every CPU this process may use).

    ``images``: a folder (searched recursively), or a list of files/folders/globs. ``limit``: use
    only the first N files (0 = all). ``repeats``: run both ``repeats`` times, alternating, and keep
    each one's best. ``bare_draft``: let the baseline use libjpeg's reduced-size decoding as
    prepare does (it only matters when a JPEG is at least 4x the target size).

    Returns ``{"images", "size", "workers", "resize", "bare_images_per_s", "prepare_images_per_s",
    "ratio", "bare_seconds", "prepare_seconds", "skipped", "parent_peak_rss_mb", "worker_peak_rss_mb"}``.
    """
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    files = [str(p) for p in find_images([str(p) for p in paths])]
    if limit:
        files = files[:limit]
    if not files:
        raise UserError(f"no image files found in {', '.join(map(str, paths))}")
    workers = usable_cpus() if workers is None else workers
    for f in files:  # page cache: both paths read from memory
        Path(f).read_bytes()
    records = [Record(split="train", image_id=i, file_name=Path(f).name, captions=["a photo of something"],
                      source=f) for i, f in enumerate(files)]
    bare_best = prep_best = float("inf")
    skipped = 0
    for _ in range(max(1, repeats)):
        bare_best = min(bare_best, bare_pillow(files, size, workers, bare_draft))
        with tempfile.TemporaryDirectory(prefix="capcli-bench-prepare-") as tmp:
            t0 = time.perf_counter()
            manifest = write_dataset(records, tmp, source="bench", image_size=size, workers=workers,
                                     min_word_freq=1, resize_policy=resize_policy, progress=progress)
            prep_best = min(prep_best, time.perf_counter() - t0)
            skipped = manifest["skipped"]
    n = len(files)
    return {
        "images": n,
        "size": size,
        "workers": workers,
        "resize": resize_policy,
        "bare_images_per_s": round(n / bare_best, 1),
        "prepare_images_per_s": round(n / prep_best, 1),
        "ratio": round(bare_best / prep_best, 3),
        "bare_seconds": round(bare_best, 3),
        "prepare_seconds": round(prep_best, 3),
        "skipped": skipped,
        "start_method": "fork" if workers > 1 and sys.platform.startswith("linux") else
                        ("spawn" if workers > 1 else "in-process"),
        "cpus": usable_cpus(),
        **_peak_rss_mb(),
    }
