"""Sources -> dataset dir: vocabulary from the training captions, one chunked HDF5 file per split.

Every source (synthetic scenes, COCO, Karpathy JSON, a folder + captions file) is turned into a
list of :class:`~capcli.data.records.Record` and handed to :func:`write_dataset`, which tokenises
every caption (:mod:`capcli.data.tokens`), decodes images in worker processes
(:mod:`capcli.data.parallel`), streams them into one HDF5 file per split
(:mod:`capcli.data.h5writer`) and writes ``vocab.json`` and ``manifest.json`` last.

Memory stays flat in the number of images: decoded images live only in a bounded window between
the workers and the writer, and are written to disk in blocks as they arrive. Per-image metadata
(records, captions, token ids) is what grows: about 2-3 KB an image.

Resuming. Each split's writer records its progress after every flush; ``prepare_state.json`` holds
a fingerprint of the settings and the record list, and the summaries of the finished splits. A
rerun with the same fingerprint continues from the last flush and produces the same files as an
uninterrupted run; a different fingerprint is refused unless ``overwrite``. A finished dataset
(``manifest.json`` with the same fingerprint) is returned as it is.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from capcli.data.h5writer import SplitWriter
from capcli.data.images import RESIZE_POLICIES
from capcli.data.parallel import WorkerPool, decode_one, ordered_map, plan_window
from capcli.data.records import Record, load_file_image
from capcli.data.tokens import TokenTable, tokenize_records
from capcli.errors import UserError, disk_space
from capcli.store.files import write_json
from capcli.version import __version__

ProgressFn = Callable[[str, int, int], None]

FORMAT_VERSION = 2
STATE_FILE = "prepare_state.json"
TOKENIZER = {"name": "coco-ptb (capcli.text.tokenize)", "lowercase": True, "punctuation": "removed",
             "as": "the COCO caption evaluation's PTB tokenizer + punctuation removal"}
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class Settings:
    """What the files depend on besides the records: in the fingerprint, the state and the manifest."""

    source: str
    image_size: int
    resize: str
    captions_per_image: int
    min_word_freq: int
    max_length: int
    seed: int
    images: int


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


@dataclass
class _Run:
    """What every split of one :func:`write_dataset` call is written with, and its running totals."""

    out: Path
    fp: str
    settings: Settings
    tokens: TokenTable
    loader: Callable[[Any, int, str], np.ndarray]
    pool: WorkerPool | None
    plan: tuple[int, int]
    progress: ProgressFn | None
    resumed: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    seconds: float = 0.0

    def write_split(self, split: str, records: list[Record], index: list[int]) -> tuple[dict, list[dict]]:
        """Decode, encode and write the records ``index`` of ``records`` as ``split`` (resuming its
        partial file): (summary, skipped)."""
        s, progress = self.settings, self.progress
        recs = [records[g] for g in index]
        n = len(recs)
        with SplitWriter(self.out, split, n, fingerprint=self.fp, captions_per_image=s.captions_per_image,
                         image_size=s.image_size, max_length=s.max_length) as writer:
            start = self.resumed[split] = writer.start
            slots = self.pool.slots if self.pool is not None else None
            window = self.plan[1]
            items = ((i, recs[i].source, (i - start) % window if slots is not None else None) for i in range(start, n))
            t_start = last_report = time.perf_counter()
            if progress is not None:
                progress(split, writer.processed, n)
            results = ordered_map(self.pool, partial(decode_one, self.loader, s.image_size, s.resize), items,
                                  n - start, self.plan)
            try:
                for i, arr, err in results:
                    r = recs[i]
                    if err is not None:
                        writer.skip({"split": split, "image_id": r.image_id, "file": r.file_name,
                                     "reason": err[0], "error": err[1], "index": i})
                    else:
                        writer.add(slots[arr] if isinstance(arr, int) else arr,
                                   *self.tokens.encode(index[i], r.image_id, s.captions_per_image, s.max_length,
                                                       s.seed))
                    now = time.perf_counter()
                    if progress is not None and now - last_report >= 0.1:
                        progress(split, writer.processed, n)
                        last_report = now
            finally:
                results.close()
            writer.flush()
            self.processed += writer.processed - start
            self.seconds += time.perf_counter() - t_start
            if progress is not None:
                progress(split, writer.processed, n)
            return writer.finish(recs, self.tokens.vocab)


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
    out = Path(out_dir)
    if resize_policy not in RESIZE_POLICIES:
        raise UserError(f"unknown resize policy {resize_policy!r}; use one of {', '.join(RESIZE_POLICIES)}")
    if captions_per_image < 1 or max_length < 1 or image_size < 1:
        raise UserError("captions per image, max length and image size must be at least 1")
    if not records:
        raise UserError(f"no images with captions found for {out}; check the input paths")
    settings = Settings(source=source, image_size=image_size, resize=resize_policy,
                        captions_per_image=captions_per_image, min_word_freq=min_word_freq,
                        max_length=max_length, seed=seed, images=len(records))
    fp = fingerprint(asdict(settings), records, extra_manifest)
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in _output_files(out):
            p.unlink()
    else:
        done = _check_existing(out, fp, asdict(settings))
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
        state = {"fingerprint": fp, "settings": asdict(settings), "done": {}, "skipped": {}}
        write_json(state_path, state, indent=1)

    t0 = time.perf_counter()
    workers = workers if workers > 1 else 0
    plan = plan_window(workers, len(records), 3 * image_size * image_size)
    pool = WorkerPool(workers, (plan[1], 3, image_size, image_size)) if workers else None
    ok = False
    try:
        tokens = tokenize_records(records, pool, progress)
        vocab = tokens.build_vocab([g for g, r in enumerate(records) if r.split == "train"], min_word_freq)
        run = _Run(out, fp, settings, tokens, loader, pool, plan, progress)
        for split in splits:
            path = out / f"{split}.h5"
            if split in state["done"] and path.is_file():
                run.resumed[split] = state["done"][split]["images"] + state["done"][split]["skipped"]
                continue
            index = [g for g, r in enumerate(records) if r.split == split]
            with disk_space(path, len(index) * 3 * image_size ** 2,
                            "the splits and images written so far are kept: free some space, then rerun the "
                            "same command (it continues)"):
                summary, skipped = run.write_split(split, records, index)
            state["done"][split] = summary
            state["skipped"][split] = skipped
            with disk_space(state_path, 64 << 10, "the splits written so far are kept: free some space, then rerun "
                            "the same command (it continues)"):
                write_json(state_path, state, indent=1)
        ok = True
    finally:
        if pool is not None:
            pool.close(ok)

    summaries = {s: state["done"][s] for s in splits}
    skipped_all = [e for s in splits for e in state["skipped"].get(s, [])]
    kept = sum(s["images"] for s in summaries.values())
    if kept == 0:
        raise UserError(f"every image was skipped ({len(skipped_all)}): "
                        f"{_reason_counts(skipped_all)}; e.g. {skipped_all[0]['file']}: {skipped_all[0]['error']}")
    if summaries["train"]["images"] == 0:
        raise UserError(f"every training image was skipped ({summaries['train']['skipped']}); "
                        f"reasons: {_reason_counts(state['skipped']['train'])}")
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
        "prepare": {"fingerprint": fp, "settings": asdict(settings), "format": FORMAT_VERSION},
        **(extra_manifest or {}),
    }
    with disk_space(out / "manifest.json", 1 << 20, "the splits written so far are kept: free some space, then "
                    "rerun the same command (it continues)"):
        vocab.save(out / "vocab.json")
        write_json(out / "skipped.json", skipped_all, indent=1)
        write_json(out / "manifest.json", manifest, indent=1)
    state_path.unlink(missing_ok=True)
    run_info = {"seconds": round(seconds, 2),
                "images_per_s": round(run.processed / run.seconds, 1) if run.seconds else None,
                "resumed": run.resumed, "workers": workers}
    return {**manifest, **run_info}


def _reason_counts(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in skipped:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return dict(sorted(counts.items()))
