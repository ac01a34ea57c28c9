"""The decoding pool: results in input order, a bounded number of items in flight (flat memory),
the default worker count."""

from __future__ import annotations

import os
import time

from capcli.data import parallel, prepare as prep, records


def _slow_square(x: int) -> int:
    time.sleep(0.002 if x % 7 else 0.02)  # uneven work: later items finish before earlier ones
    return x * x


def test_ordered_map_keeps_order_and_bounds_items_in_flight():
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(400):
            pulled += 1
            yield i

    with parallel.WorkerPool(2) as pool:
        out, most_ahead = [], 0
        for r in parallel.ordered_map(pool, _slow_square, items(), 400):
            out.append(r)
            most_ahead = max(most_ahead, pulled - len(out))
            if len(out) % 50 == 0:
                time.sleep(0.05)  # a slow writer: the feeder must wait, not run ahead
    assert out == [i * i for i in range(400)]
    chunksize, window = parallel.plan_window(2, 400)
    assert most_ahead <= window + chunksize


def test_plan_window_caps_pixels_in_flight():
    assert parallel.plan_window(2, 500, 3 * 256 * 256) == (8, 48)
    chunksize, window = parallel.plan_window(64, 10**6, 3 * 1024 * 1024)
    assert window * 3 * 1024 * 1024 <= parallel.WINDOW_BYTES * 1.6 and chunksize >= 1
    assert parallel.plan_window(4, 3) == (1, 32)


def test_worker_pool_and_in_process_write_the_same_files(tmp_path):
    from tests.test_prepare_resume import assert_same_dataset, make_folder
    from capcli.data.sources import folder_records

    data = make_folder(tmp_path / "src", 110, bad=2)
    for name, workers in (("pool", 2), ("inline", 0)):
        prep.write_dataset(folder_records(data / "img", data / "captions.csv"), tmp_path / name, source="folder",
                           image_size=24, min_word_freq=1, workers=workers)
    assert_same_dataset(tmp_path / "inline", tmp_path / "pool")


def test_default_workers_is_the_affinity_mask():
    from capcli.runtime import usable_cpus

    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cpus() == want


def test_skip_reasons():
    from PIL import UnidentifiedImageError

    assert records.skip_reason(FileNotFoundError(2, "x")) == "missing"
    assert records.skip_reason(IsADirectoryError(21, "x")) == "unreadable"
    assert records.skip_reason(PermissionError(13, "x")) == "unreadable"
    assert records.skip_reason(UnidentifiedImageError("x")) == "not an image"
    assert records.skip_reason(OSError("image file is truncated (3 bytes not processed)")) == "truncated"
    assert records.skip_reason(SyntaxError("broken PNG file")) == "corrupt"
