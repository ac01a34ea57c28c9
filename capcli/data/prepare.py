"""Sources -> dataset dir: vocabulary from the training captions, one chunked HDF5 file per split.

Every source (synthetic scenes, COCO, Karpathy JSON, a folder + captions file) is turned into a
list of :class:`Record` and handed to :func:`write_dataset`, which decodes images in worker
processes, streams them into HDF5 and writes ``vocab.json`` and ``manifest.json`` last.

Memory stays flat in the number of images: decoded images live only in a bounded window between
the workers and the writer (on Linux, slots of an anonymous shared-memory buffer the forked workers
write into, so pixels are not pickled through pipes), and are written to disk (one HDF5 chunk per
image) in blocks as they arrive. Per-image metadata (records, captions, token ids) is what grows:
about 2-3 KB an image.

Resuming. A split is written to ``{split}.h5.partial`` (every chunk allocated up front, so writes
never touch HDF5 metadata and a killed process leaves a file that opens), with
``{split}.progress.json`` beside it recording, after each flush, how many records were consumed
(in order), how many images were kept and which were skipped. ``prepare_state.json`` holds a
fingerprint of the settings and the record list, and the summaries of the finished splits. A rerun
with the same fingerprint continues from the last flush and produces the same files as an
uninterrupted run; a different fingerprint is refused unless ``overwrite``. A finished dataset
(``manifest.json`` with the same fingerprint) is returned as it is.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from capcli.data.images import RESIZE_POLICIES, load_image
from capcli.data.vocab import SPECIALS, Vocab
from capcli.errors import UserError, disk_space
from capcli.store.files import write_json
from capcli.text import tokenize
from capcli.version import __version__

ProgressFn = Callable[[str, int, int], None]

FORMAT_VERSION = 2
STATE_FILE = "prepare_state.json"
TOKENIZER = {"name": "coco-ptb (capcli.text.tokenize)", "lowercase": True, "punctuation": "removed",
             "as": "the COCO caption evaluation's PTB tokenizer + punctuation removal"}
SPLIT_ORDER = ("train", "val", "test")
FLUSH_RECORDS = 512  # flush (and record progress) at least every this many records ...
FLUSH_SECONDS = 2.0  # ... or this many seconds, whichever comes first
TEST_DELAY_ENV = "CAPCLI_PREPARE_TEST_DELAY"  # seconds of sleep per image in workers (tests only)


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


# Shared-memory slots (window, 3, S, S) that forked workers write decoded images into, so pixels
# do not travel through a pipe as pickles; set by the parent before the pool forks, else None.
_SLOTS: np.ndarray | None = None
WINDOW_BYTES = 512 << 20  # at most this much decoded pixel data in flight


def _load_one(loader: Callable, size: int, policy: str, item: tuple[int, Any, int | None]):
    """(index, image array or its shared-memory slot, None) or (index, None, (reason, error))."""
    i, source, slot = item
    delay = os.environ.get(TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    try:
        arr = loader(source, size, policy)
        if slot is not None and _SLOTS is not None:
            _SLOTS[slot] = arr
            return i, slot, None
        return i, arr, None
    except Exception as exc:  # corrupt, truncated, missing, unreadable: skipped, with the reason
        return i, None, (skip_reason(exc), f"{type(exc).__name__}: {exc}")


def _tokenize_batch(captions: list[list[str]]) -> list[list[list[str]]]:
    return [[tokenize(c) for c in caps] for caps in captions]


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    if sys.platform.startswith("linux"):  # die with the parent, even when it is SIGKILLed
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass


def make_pool(workers: int):
    """A process pool for image decoding: fork on Linux (instant start; the parent's objects are
    frozen out of the children's garbage collector so they are not copied page by page), spawn
    elsewhere."""
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("fork")
        gc.freeze()
        try:
            return ctx.Pool(workers, initializer=_worker_init)
        finally:
            gc.unfreeze()
    return mp.get_context("spawn").Pool(workers, initializer=_worker_init)


class _Window:
    """Feeds items to ``Pool.imap`` while at most ``size`` results are pending: bounded memory."""

    def __init__(self, size: int):
        self.sem = threading.Semaphore(size)
        self.stopped = False

    def feed(self, items: Iterable) -> Iterator:
        for item in items:
            while not self.sem.acquire(timeout=0.2):
                if self.stopped:
                    return
            if self.stopped:
                return
            yield item

    def done(self, n: int = 1) -> None:
        self.sem.release(n)

    def stop(self) -> None:
        self.stopped = True


def plan_window(workers: int, n: int, item_bytes: int = 0) -> tuple[int, int]:
    """(chunksize, window) for ``n`` items over ``workers`` processes: chunks of up to 8 items,
    about 3 chunks per worker in flight, and at most :data:`WINDOW_BYTES` of them."""
    chunksize = max(1, min(8, n // (max(workers, 1) * 8)))
    while chunksize > 1 and workers * chunksize * 3 * item_bytes > WINDOW_BYTES:
        chunksize //= 2
    return chunksize, max(min(32, max(1, WINDOW_BYTES // max(item_bytes, 1))), workers * chunksize * 3)


WATCHDOG_SECONDS = 2.0  # how often a waiting writer checks that every decoding worker is alive


def _worker_pids(pool) -> frozenset:
    """The pool's worker process ids (a pool never retires workers here: a change means a death)."""
    return frozenset(p.pid for p in getattr(pool, "_pool", []) or [])


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


class WorkerDied(UserError):
    """A decoding worker process died: the pool cannot finish (see :func:`raise_if_a_worker_died`)."""


def abandon_pool(pool) -> None:
    """Kill the workers of a pool that lost one and drop it without ``terminate()``: a worker
    killed while holding the task queue's lock leaves that lock held forever, and terminate (also
    run at exit by the pool's finaliser) would wait for it."""
    from multiprocessing import pool as mp_pool

    handler = getattr(pool, "_worker_handler", None)
    if handler is not None:
        handler._state = mp_pool.TERMINATE  # no more replacement workers
    for p in list(getattr(pool, "_pool", []) or []):
        try:
            p.kill()
        except Exception:  # already gone
            pass
    finaliser = getattr(pool, "_terminate", None)
    if finaliser is not None and hasattr(finaliser, "cancel"):
        finaliser.cancel()


def raise_if_a_worker_died(pool, workers_at_start: frozenset) -> None:
    """Pool replaces a worker that died (the OOM killer, a crash inside an image codec) but the
    chunk it held never comes back, so the results would be awaited forever: stop instead."""
    if _worker_pids(pool) != workers_at_start:
        raise WorkerDied(
            "an image decoding worker died (killed by the system, e.g. out of memory, or crashed "
            "inside an image library), so its images can never finish; rerun the same command to "
            "resume from the last flush, with fewer --workers or --workers 0 to find the file")


def ordered_map(pool, fn: Callable, items: Iterable, n: int, workers: int,
                plan: tuple[int, int] | None = None) -> Iterator:
    """``fn`` over ``items`` in order; in ``pool`` when given, with at most ``window`` items
    handed out and not yet consumed (``plan`` = (chunksize, window), default :func:`plan_window`).
    An item counts as consumed once the caller asks for the next result."""
    if pool is None:
        yield from map(fn, items)
        return
    chunksize, size = plan or plan_window(workers, n)
    window = _Window(size)
    consumed = 0
    # chunks are made here, not by imap(chunksize=...), whose flattening generator has no timeout
    results = pool.imap(partial(_apply_chunk, fn), _chunked(window.feed(items), chunksize), chunksize=1)
    workers_at_start = _worker_pids(pool)
    pending: list = []
    try:
        while True:
            if not pending:
                try:
                    pending = list(reversed(results.next(timeout=WATCHDOG_SECONDS)))
                except StopIteration:
                    break
                except mp.TimeoutError:
                    pending = []
                    raise_if_a_worker_died(pool, workers_at_start)
                    continue
            result = pending.pop()
            yield result
            consumed += 1
            if consumed == chunksize:  # wake the feeder once per chunk, not once per item
                window.done(consumed)
                consumed = 0
    finally:
        window.stop()


def sample_captions(n: int, k: int, seed: int, image_id: int, valid: list[int]) -> list[int]:
    """k caption indices for one image: a sample without replacement when it has k, else padded
    with repeats; deterministic per (seed, image_id) whatever the processing order."""
    rng = random.Random(f"{seed}:{image_id}")
    pool = valid or list(range(n))
    if len(pool) >= k:
        return rng.sample(pool, k)
    return pool + [rng.choice(pool) for _ in range(k - len(pool))]


def percentiles(values, qs=(50, 90, 99)) -> dict:
    arr = np.asarray(values)
    if arr.size == 0:
        return {f"p{q}": 0 for q in qs}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def _source_key(source: Any) -> Any:
    return str(source) if isinstance(source, (str, Path)) else source


def fingerprint(settings: dict, records: list[Record], extra: dict | None) -> str:
    """A hash of everything the output depends on: settings, source info and every record."""
    h = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "capcli": __version__, "settings": settings, "extra": extra or {}}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps([r.split, r.image_id, r.file_name, r.captions, _source_key(r.source)],
                            sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_output_dir(out: Path, what: str) -> None:
    """A UserError when ``out`` (a folder to write) is a file, or lies under one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file; give a directory (a new or a dataset one)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {out}: {parent} is a file, not a folder; choose another {what}")
            break


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, indent=1)


def _output_files(out: Path) -> list[Path]:
    names = ["manifest.json", "vocab.json", "skipped.json", STATE_FILE]
    found = [out / n for n in names if (out / n).exists()]
    for pattern in ("*.h5", "*.h5.partial", "*.progress.json", ".*.tmp*"):
        found.extend(sorted(out.glob(pattern)))
    return found


def _differences(old: dict, new: dict) -> str:
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diffs) if diffs else "the input images or captions changed"


def _check_existing(out: Path, fp: str, settings: dict) -> dict | None:
    """The finished manifest when ``out`` already holds this very dataset; None to (re)start or
    resume; a UserError when ``out`` holds something else."""
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        prep = manifest.get("prepare", {})
        if prep.get("fingerprint") == fp and all((out / f"{s}.h5").is_file() for s in manifest.get("splits", {})):
            (out / STATE_FILE).unlink(missing_ok=True)  # left over when a run was killed right at the end
            return manifest
        why = _differences(prep["settings"], settings) if "settings" in prep else "by an older capcli, or damaged"
        raise UserError(f"{out} already holds a finished dataset made differently ({why}); rerun with "
                        "--overwrite to replace it, or choose another --out")
    state_path = out / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("fingerprint") == fp:
            return None
        raise UserError(f"{out} holds an unfinished `prepare` with other arguments "
                        f"({_differences(state.get('settings', {}), settings)}); rerun it with the same "
                        "arguments to continue, or use --overwrite to start again")
    stale = [p.name for p in _output_files(out)]
    if stale:
        raise UserError(f"{out} already has dataset files ({', '.join(stale[:4])}) that no `prepare` state "
                        "describes; rerun with --overwrite to replace them, or choose another --out")
    return None


class TokenTable:
    """Every caption's tokens in one flat int32 array (about 4 bytes a token, not a Python list
    per caption): first as provisional word ids, then, after :meth:`build_vocab`, as vocabulary ids.
    Captions of record ``g`` are ``caption_start[g] .. caption_start[g + 1] - 1``; caption ``c``
    spans ``token_end[c - 1] .. token_end[c]`` of ``ids``."""

    def __init__(self) -> None:
        self.words: dict[str, int] = {}
        self._ids = array("i")
        self._token_end = array("q")
        self._caption_start = array("q", [0])
        self.ids = self.token_end = self.caption_start = None

    def add(self, captions: list[list[str]]) -> None:
        words, ids = self.words, self._ids
        for toks in captions:
            ids.extend([words.setdefault(t, len(words)) for t in toks])
            self._token_end.append(len(ids))
        self._caption_start.append(len(self._token_end))

    def build_vocab(self, train: list[int], min_freq: int) -> Vocab:
        """The vocabulary of the records ``train`` (as :meth:`Vocab.build` makes it), and the ids
        turned into vocabulary ids."""
        ids = np.frombuffer(self._ids, dtype=np.int32) if len(self._ids) else np.zeros(0, np.int32)
        token_end = np.frombuffer(self._token_end, dtype=np.int64) if len(self._token_end) else np.zeros(0, np.int64)
        caption_start = np.frombuffer(self._caption_start, dtype=np.int64)
        token_start = np.concatenate([[0], token_end[:-1]]).astype(np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for g in train:  # mark the tokens of training captions
            c0, c1 = caption_start[g], caption_start[g + 1]
            if c1 > c0:
                mask[token_start[c0]:token_end[c1 - 1]] = True
        counts = np.bincount(ids[mask], minlength=len(self.words))
        itos = list(self.words)
        words = sorted((w for w, i in self.words.items() if counts[i] >= min_freq and w not in SPECIALS),
                       key=lambda w: (-int(counts[self.words[w]]), w))
        vocab = Vocab(list(SPECIALS) + words)
        lut = np.asarray([vocab.stoi.get(w, vocab.unk) for w in itos] or [0], dtype=np.int32)
        self.ids = lut[ids] if len(ids) else ids
        self.token_end, self.caption_start = token_end, caption_start
        self.token_start = token_start
        del self._ids, self._token_end, self._caption_start, self.words
        return vocab

    def captions(self, g: int) -> list[np.ndarray]:
        """The vocabulary ids of each caption of record ``g``."""
        c0, c1 = int(self.caption_start[g]), int(self.caption_start[g + 1])
        return [self.ids[self.token_start[c]:self.token_end[c]] for c in range(c0, c1)]


def _tokenize_records(records: list[Record], pool, workers: int, progress: ProgressFn | None) -> TokenTable:
    """Tokenise every caption (in the pool for large sets) into a :class:`TokenTable`."""
    table = TokenTable()
    n_caps = sum(len(r.captions) for r in records)
    if pool is None or n_caps < 20000:
        for r in records:
            table.add([tokenize(c) for c in r.captions])
        return table
    batch = 512
    batches = ([r.captions for r in records[i:i + batch]] for i in range(0, len(records), batch))
    done = 0
    for toks in ordered_map(pool, _tokenize_batch, batches, (len(records) + batch - 1) // batch, workers):
        for t in toks:
            table.add(t)
        done += len(toks)
        if progress is not None:
            progress("tokens", done, len(records))
    return table


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
    overwrite: bool = False,
) -> dict:
    """Write the dataset dir and return the summary that goes into ``manifest.json``.

    ``workers`` > 1 decodes images in that many processes (0 or 1: in this process). ``progress``
    is called as ``progress(split, records_done, records_total)`` (at most ~10 times a second).
    Rerunning with the same arguments resumes an interrupted run, or returns the finished
    manifest (with ``"reused": True``) without redoing anything; ``overwrite`` starts afresh.
    The returned dict also carries ``"resumed"`` (records already done per split at the start).
    """
    global _SLOTS
    out = Path(out_dir)
    if resize_policy not in RESIZE_POLICIES:
        raise UserError(f"unknown resize policy {resize_policy!r}; use one of {', '.join(RESIZE_POLICIES)}")
    if captions_per_image < 1 or max_length < 1 or image_size < 1:
        raise UserError("captions per image, max length and image size must be at least 1")
    if not records:
        raise UserError(f"no images with captions found for {out}; check the input paths")
    settings = {"source": source, "image_size": image_size, "resize": resize_policy,
                "captions_per_image": captions_per_image, "min_word_freq": min_word_freq,
                "max_length": max_length, "seed": seed, "images": len(records)}
    fp = fingerprint(settings, records, extra_manifest)
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in _output_files(out):
            p.unlink()
    else:
        done = _check_existing(out, fp, settings)
        if done is not None:
            return {**done, "reused": True}

    splits = sorted({r.split for r in records}, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9)
    unknown = [s for s in splits if s not in SPLIT_ORDER]
    if unknown:
        raise UserError(f"unknown split(s) {unknown}; records must be in train, val or test")
    if "train" not in splits:
        raise UserError("the data has no training split; every source needs train images")

    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("fingerprint") != fp:
        state = {"fingerprint": fp, "settings": settings, "done": {}, "skipped": {}}
        _write_json(state_path, state)

    t0 = time.perf_counter()
    workers = workers if workers > 1 else 0
    plan = plan_window(workers, len(records), 3 * image_size * image_size)
    slots = None
    if workers and sys.platform.startswith("linux"):  # anonymous shared memory, inherited by fork
        import mmap

        shared = mmap.mmap(-1, plan[1] * 3 * image_size * image_size)
        slots = _SLOTS = np.frombuffer(shared, dtype=np.uint8).reshape(plan[1], 3, image_size, image_size)
    try:
        pool = make_pool(workers) if workers else None
    finally:
        _SLOTS = None  # only the forked workers keep it
    resumed: dict[str, int] = {}
    stats = {"processed": 0, "seconds": 0.0}
    ok = False
    try:
        tokens = _tokenize_records(records, pool, workers, progress)
        vocab = tokens.build_vocab([g for g, r in enumerate(records) if r.split == "train"], min_word_freq)
        for split in splits:
            path = out / f"{split}.h5"
            if split in state["done"] and path.is_file():
                resumed[split] = state["done"][split]["images"] + state["done"][split]["skipped"]
                continue
            index = [g for g, r in enumerate(records) if r.split == split]
            with disk_space(out / f"{split}.h5", len(index) * 3 * image_size ** 2,
                            "the splits and images written so far are kept: free some space, then rerun the "
                            "same command (it continues)"):
                summary, skipped = _write_split(
                    [records[g] for g in index], index, tokens, out, split, vocab, fp=fp, image_size=image_size,
                    loader=loader, k=captions_per_image, max_length=max_length, policy=resize_policy, pool=pool,
                    workers=workers, seed=seed, progress=progress, resumed=resumed, stats=stats, plan=plan,
                    slots=slots)
            state["done"][split] = summary
            state["skipped"][split] = skipped
            _write_json(state_path, state)
        ok = True
    except WorkerDied:
        abandon_pool(pool)  # terminate() could wait forever on a lock the dead worker held
        pool = None
        raise
    finally:
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()

    summaries = {s: state["done"][s] for s in splits}
    skipped_all = [e for s in splits for e in state["skipped"].get(s, [])]
    kept = sum(s["images"] for s in summaries.values())
    if kept == 0:
        raise UserError(f"every image was skipped ({len(skipped_all)}): "
                        f"{_reason_counts(skipped_all)}; e.g. {skipped_all[0]['file']}: {skipped_all[0]['error']}")
    if summaries["train"]["images"] == 0:
        raise UserError(f"every training image was skipped ({summaries['train']['skipped']}); "
                        f"reasons: {_reason_counts(state['skipped']['train'])}")
    vocab.save(out / "vocab.json")
    _write_json(out / "skipped.json", skipped_all)
    seconds = time.perf_counter() - t0
    manifest = {
        "capcli_version": __version__,
        "source": source,
        "image_size": image_size,
        "resize": resize_policy,
        "captions_per_image": captions_per_image,
        "tokenizer": TOKENIZER,
        "vocab": {"size": len(vocab), "min_word_freq": min_word_freq, "max_length": max_length},
        "splits": summaries,
        "skipped": len(skipped_all),
        "skipped_reasons": _reason_counts(skipped_all),
        "seed": seed,
        "prepare": {"fingerprint": fp, "settings": settings, "format": FORMAT_VERSION},
        **(extra_manifest or {}),
    }
    _write_json(out / "manifest.json", manifest)
    state_path.unlink(missing_ok=True)
    run_info = {"seconds": round(seconds, 2),
                "images_per_s": round(stats["processed"] / stats["seconds"], 1) if stats["seconds"] else None,
                "resumed": resumed, "workers": workers}
    return {**manifest, **run_info}


def _reason_counts(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in skipped:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return dict(sorted(counts.items()))


def _create_split_file(path: Path, fp: str, n: int, k: int, S: int, max_length: int) -> h5py.File:
    """A fresh partial file with every chunk allocated up front (and never filled: sparse), so
    later writes only touch raw data and a kill cannot leave the HDF5 metadata half-written."""
    L = max_length + 2
    f = h5py.File(path, "w")
    f.attrs.update({"captions_per_image": k, "max_length": max_length, "image_size": S,
                    "fingerprint": fp, "complete": False})

    def dataset(name, shape, dtype, chunks):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return f.create_dataset(name, shape, dtype=dtype, chunks=chunks, maxshape=(None,) + shape[1:],
                                dcpl=dcpl, fill_time="never")

    dataset("images", (n, 3, S, S), "uint8", (1, 3, S, S))
    rows = max(1, min(n * k, 65536 // L))
    dataset("captions", (n * k, L), "int32", (rows, L))
    dataset("caption_lengths", (n * k,), "int32", (min(n * k, 16384),))
    dataset("caption_image", (n * k,), "int32", (min(n * k, 16384),))
    f.flush()
    return f


def _open_partial(out: Path, split: str, fp: str, n: int, k: int, S: int, max_length: int):
    """(file, records done, images kept, skipped so far), resuming when a matching partial exists."""
    tmp = out / f"{split}.h5.partial"
    prog = out / f"{split}.progress.json"
    if tmp.is_file() and prog.is_file():
        try:
            p = json.loads(prog.read_text())
            if p.get("fingerprint") == fp and 0 <= p["kept"] <= p["processed"] <= n:
                f = h5py.File(tmp, "r+")
                ok = (f.attrs.get("fingerprint") == fp and f["images"].shape[0] == n
                      and f["captions"].shape == (n * k, max_length + 2) and f["images"].shape[-1] == S)
                if ok:
                    return f, int(p["processed"]), int(p["kept"]), list(p["skipped"])
                f.close()
        except (OSError, KeyError, ValueError, TypeError):
            pass  # unreadable leftovers: start this split again
    prog.unlink(missing_ok=True)
    return _create_split_file(tmp, fp, n, k, S, max_length), 0, 0, []


def _write_split(recs: list[Record], index: list[int], tokens: TokenTable, out: Path, split: str, vocab: Vocab,
                 *, fp, image_size, loader, k, max_length, policy, pool, workers, seed, progress, resumed,
                 stats, plan=None, slots: np.ndarray | None = None) -> tuple[dict, list]:
    """Decode, encode and write one split (resuming its partial file); (summary, skipped)."""
    n = len(recs)
    S, L = image_size, max_length + 2
    path = out / f"{split}.h5"
    tmp = out / f"{split}.h5.partial"
    prog = out / f"{split}.progress.json"
    f, start, kept, skipped = _open_partial(out, split, fp, n, k, S, max_length)
    resumed[split] = start
    try:
        images, caps = f["images"], f["captions"]
        lens, cimg = f["caption_lengths"], f["caption_image"]
        buf_rows: list[np.ndarray] = []
        buf_lens: list[int] = []
        buf_from = kept  # first image whose caption rows are still only in the buffers
        processed = start
        # Images go to HDF5 in small blocks (one h5py call per block, not per image).
        block = np.empty((max(1, min(32, (8 << 20) // (3 * S * S))), 3, S, S), dtype=np.uint8)
        in_block = 0

        def write_block() -> None:
            nonlocal in_block
            if in_block:
                images[kept - in_block:kept] = block[:in_block]
                in_block = 0

        def flush() -> None:
            nonlocal buf_from, buf_rows, buf_lens
            write_block()
            if buf_rows:
                lo, hi = buf_from * k, kept * k
                caps[lo:hi] = np.asarray(buf_rows, dtype=np.int32)
                lens[lo:hi] = np.asarray(buf_lens, dtype=np.int32)
                cimg[lo:hi] = np.repeat(np.arange(buf_from, kept, dtype=np.int32), k)
            buf_rows, buf_lens, buf_from = [], [], kept
            f.flush()  # raw data only: the metadata was written, complete, at creation
            _write_json(prog, {"fingerprint": fp, "processed": processed, "kept": kept, "skipped": skipped})

        fn = partial(_load_one, loader, S, policy)
        window = plan[1] if plan else 1
        items = ((i, recs[i].source, (i - start) % window if slots is not None and pool is not None else None)
                 for i in range(start, n))
        t_start = last_flush = last_report = time.perf_counter()
        since_flush = 0
        if progress is not None:
            progress(split, processed, n)
        results = ordered_map(pool, fn, items, n - start, workers, plan)
        try:
            for i, arr, err in results:
                r = recs[i]
                if err is not None:
                    skipped.append({"split": split, "image_id": r.image_id, "file": r.file_name,
                                    "reason": err[0], "error": err[1], "index": i})
                else:
                    block[in_block] = slots[arr] if isinstance(arr, int) else arr
                    in_block += 1
                    caps_ids = tokens.captions(index[i])
                    valid = [c for c, t in enumerate(caps_ids) if 0 < len(t) <= max_length]
                    for c in sample_captions(len(caps_ids), k, seed, r.image_id, valid):
                        row = np.zeros(L, dtype=np.int32)  # <pad> = 0
                        toks = caps_ids[c][:max_length]
                        row[0], row[1:len(toks) + 1], row[len(toks) + 1] = vocab.start, toks, vocab.end
                        buf_rows.append(row)
                        buf_lens.append(len(toks) + 2)
                    kept += 1
                    if in_block == len(block):
                        write_block()
                processed += 1
                since_flush += 1
                now = time.perf_counter()
                if since_flush >= FLUSH_RECORDS or now - last_flush >= FLUSH_SECONDS:
                    flush()
                    since_flush, last_flush = 0, time.perf_counter()
                if progress is not None and now - last_report >= 0.1:
                    progress(split, processed, n)
                    last_report = now
        finally:
            results.close()
        flush()
        stats["processed"] += processed - start
        stats["seconds"] += time.perf_counter() - t_start
        if progress is not None:
            progress(split, processed, n)
        summary = _finalize(f, recs, skipped, kept, k, vocab)
    except BaseException:
        f.close()
        raise
    f.close()
    os.replace(tmp, path)
    prog.unlink(missing_ok=True)
    summary["skipped"] = len(skipped)
    return summary, [{key: v for key, v in e.items() if key != "index"} for e in skipped]


def _replace(f: h5py.File, name: str, data, dtype=None) -> None:
    if name in f:
        del f[name]
    f.create_dataset(name, data=data, dtype=dtype)


def _replace_strings(f: h5py.File, name: str, strings: Iterable[str], n: int, batch: int = 8192) -> None:
    """A UTF-8 string dataset of ``n`` items, written in batches (no whole-array copy in memory)."""
    if name in f:
        del f[name]
    ds = f.create_dataset(name, shape=(n,), dtype=h5py.string_dtype("utf-8"))
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


def _finalize(f: h5py.File, recs: list[Record], skipped: list[dict], m: int, k: int, vocab: Vocab) -> dict:
    """Trim to the kept images, add ids, names and every reference; summary statistics from the
    written captions (so a resumed run reports what an uninterrupted one would)."""
    gone = {e["index"] for e in skipped}
    kept = [r for i, r in enumerate(recs) if i not in gone]
    assert len(kept) == m, (len(kept), m)
    f["images"].resize(m, axis=0)
    for name in ("captions", "caption_lengths", "caption_image"):
        f[name].resize(m * k, axis=0)
    _replace(f, "image_ids", np.asarray([r.image_id for r in kept], dtype=np.int64))
    _replace_strings(f, "file_names", (r.file_name for r in kept), m)
    offsets = np.cumsum([0] + [len(r.captions) for r in kept]).astype(np.int64)
    _replace_strings(f, "references", (c for r in kept for c in r.captions), int(offsets[-1]))
    _replace(f, "reference_offsets", offsets)
    lengths = f["caption_lengths"][:].astype(np.int64) - 2
    unk = 0
    caps = f["captions"]
    for lo in range(0, m * k, 16384):
        unk += int(np.count_nonzero(caps[lo:lo + 16384] == vocab.unk))
    f.attrs["complete"] = True
    return {
        "images": m,
        "captions": m * k,
        "references": int(offsets[-1]),
        "unk_share": round(unk / max(int(lengths.sum()), 1), 5),
        "caption_length": percentiles(lengths),
    }
