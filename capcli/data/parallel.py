"""Worker processes for ``prepare``: images decoded (and captions tokenised) in parallel, the
results handed back in input order with a bounded number of items in flight.

:class:`WorkerPool` is a :class:`concurrent.futures.ProcessPoolExecutor`: forked on Linux (instant
start; the parent's objects are frozen out of the children's garbage collector around the fork so
they are not copied page by page), spawned elsewhere. Workers ignore Ctrl-C (the parent handles it)
and, on Linux, die with the parent even when it is SIGKILLed.

Pixels do not travel through a pipe as pickles: on Linux the pool owns ``slots``, an anonymous
shared-memory array (window, 3, S, S) that the executor's initializer hands to every worker;
:func:`decode_one` writes an image into the slot its item names and returns the slot's number. A
slot is reused only once its image has been consumed (:func:`ordered_map` keeps at most ``window``
items handed out).

A worker that dies (the OOM killer, a crash inside an image codec) breaks the executor: its futures
raise :class:`~concurrent.futures.process.BrokenProcessPool`, which :func:`ordered_map` turns into
:class:`WorkerDied`, a one-line error. After any error the pool closes without waiting: the work
not started is dropped and the workers are killed.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from capcli.data.records import skip_reason
from capcli.errors import UserError

WINDOW_BYTES = 512 << 20  # at most this much decoded pixel data in flight
TEST_DELAY_ENV = "CAPCLI_PREPARE_TEST_DELAY"  # seconds of sleep per image in workers (tests only)

# In a worker process: the pool's shared-memory slots, set by the executor's initializer. Always
# None in the parent, which reads the slots through WorkerPool.slots.
_worker_slots: np.ndarray | None = None


class WorkerDied(UserError):
    """A decoding worker process died, so the images it held can never finish."""

    def __init__(self) -> None:
        super().__init__(
            "an image decoding worker died (killed by the system, e.g. out of memory, or crashed "
            "inside an image library), so its images can never finish; rerun the same command to "
            "resume from the last flush, with fewer --workers or --workers 0 to find the file")


def _worker_init(buffer: Any, shape: tuple[int, ...] | None) -> None:
    global _worker_slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    if sys.platform.startswith("linux"):  # die with the parent, even when it is SIGKILLed
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    if buffer is not None:
        _worker_slots = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)


class WorkerPool:
    """``workers`` processes for :func:`ordered_map`; with ``slot_shape`` (window, 3, S, S), on
    Linux, the shared-memory ``slots`` that :func:`decode_one` writes images into (None elsewhere:
    images come back pickled). Use as a context manager, or call :meth:`close`."""

    def __init__(self, workers: int, slot_shape: tuple[int, ...] | None = None):
        self.workers = workers
        fork = sys.platform.startswith("linux")
        buffer = None
        self.slots: np.ndarray | None = None
        if slot_shape is not None and fork:  # anonymous shared memory, inherited by the forked workers
            import mmap

            buffer = mmap.mmap(-1, math.prod(slot_shape))
            self.slots = np.frombuffer(buffer, dtype=np.uint8).reshape(slot_shape)
        self._others = set(mp.active_children())  # child processes that are not this pool's
        self.executor = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("fork" if fork else "spawn"), initializer=_worker_init,
            initargs=(buffer, slot_shape if buffer is not None else None))
        if fork:
            gc.freeze()
            try:  # with fork, the first submit starts every worker
                self.executor.submit(os.getpid)
            finally:
                gc.unfreeze()

    def close(self, ok: bool = True) -> None:
        """Let the workers finish and end (``ok``); after an error, drop the work not yet started,
        end the workers without waiting for the items they hold (a slow image, a dead pool), and
        return at once."""
        self.executor.shutdown(wait=ok, cancel_futures=not ok)
        if not ok:
            for worker in set(mp.active_children()) - self._others:
                worker.kill()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc is None)


def decode_one(loader: Callable, size: int, policy: str, item: tuple[int, Any, int | None]):
    """(index, image array or its shared-memory slot, None) or (index, None, (reason, error)) for
    ``item`` = (index, source, slot or None)."""
    i, source, slot = item
    delay = os.environ.get(TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    try:
        arr = loader(source, size, policy)
        if slot is not None and _worker_slots is not None:
            _worker_slots[slot] = arr
            return i, slot, None
        return i, arr, None
    except Exception as exc:  # corrupt, truncated, missing, unreadable: skipped, with the reason
        return i, None, (skip_reason(exc), f"{type(exc).__name__}: {exc}")


def plan_window(workers: int, n: int, item_bytes: int = 0) -> tuple[int, int]:
    """(chunksize, window) for ``n`` items over ``workers`` processes: chunks of up to 8 items,
    about 3 chunks per worker in flight, and at most :data:`WINDOW_BYTES` of them."""
    chunksize = max(1, min(8, n // (max(workers, 1) * 8)))
    while chunksize > 1 and workers * chunksize * 3 * item_bytes > WINDOW_BYTES:
        chunksize //= 2
    return chunksize, max(min(32, max(1, WINDOW_BYTES // max(item_bytes, 1))), workers * chunksize * 3)


def _apply_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(pool: WorkerPool | None, fn: Callable, items: Iterable, n: int,
                plan: tuple[int, int] | None = None) -> Iterator:
    """``fn`` over ``items`` (``n`` of them) in order; in ``pool`` when given, in chunks, with at
    most ``window`` items handed out and not yet consumed (``plan`` = (chunksize, window), default
    :func:`plan_window`). An item counts as consumed once the caller asks for the next result.
    A dead worker raises :class:`WorkerDied`."""
    if pool is None:
        yield from map(fn, items)
        return
    chunksize, window = plan or plan_window(pool.workers, n)
    chunks = _chunked(items, chunksize)
    futures: deque[Future] = deque()
    handed = 0  # items submitted and not yet consumed
    more = True
    try:
        while True:
            while more and (not futures or handed + chunksize <= window):
                chunk = next(chunks, None)
                if chunk is None:
                    more = False
                    break
                futures.append(pool.executor.submit(_apply_chunk, fn, chunk))
                handed += len(chunk)
            if not futures:
                return
            results = futures.popleft().result()
            for result in results:
                yield result
                handed -= 1
    except BrokenProcessPool as exc:
        raise WorkerDied() from exc
    finally:
        for future in futures:  # the caller stopped early (an error): drop what has not started
            future.cancel()
