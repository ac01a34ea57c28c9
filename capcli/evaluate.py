"""One evaluation path, used by `capcli evaluate`, the quickstart, the study and validation inside
`train`: free-running decoding (no teacher forcing) for every reported caption score, plus the
teacher-forced loss and top-5 accuracy, scored against every raw reference caption of each image.

:func:`evaluate_model` scores a model on a dataset split; :func:`evaluate_checkpoint` does the whole
job for a MODEL source (load, feature cache, score, eval.json and captions.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from capcli.api import Captioner
from capcli.data.dataset import CaptionDataset, collate, trim_padding
from capcli.data.features import CachedFeatureDataset, build_cache, cache_dir, cache_file, collate_cached
from capcli.decode import DecodeOptions, decode_features, default_batch_size
from capcli.errors import UserError
from capcli.metrics import MeteorProcess, caption_scores, start_meteor
from capcli.models.loss import xe_loss, xe_summary
from capcli.runtime import amp_name, autocast, synchronize
from capcli.store.files import write_json
from capcli.store.folder import run_dir_of

ProgressFn = Callable[[int, int], None]


@torch.inference_mode()
def evaluate_model(model, dataset: CaptionDataset, device: torch.device, options: DecodeOptions, *,
                   batch_size: int = 32, num_workers: int = 0, alpha_c: float = 1.0, meteor: bool | None = None,
                   vocab=None, features: str | Path | None = None, score: bool = True,
                   progress: ProgressFn | None = None) -> dict:
    """Scores of ``model`` on ``dataset``, decoding with ``options`` (a ``max_length`` of None is
    the dataset's); returns the metrics dict and ``captions`` (COCO results).

    ``vocab`` is the model's vocabulary (default: the dataset's). Loss and top-5 need the dataset's
    encoded captions in the model's vocabulary, so they are None when the two differ. ``features``:
    a frozen encoder's feature cache of this split (:mod:`capcli.data.features`), read instead of
    running the encoder. ``score=False`` decodes and stops (to time a decode).
    """
    options = options.resolved(dataset.max_length)
    vocab = vocab or dataset.vocab
    # the teacher-forced pass runs the torch decoder over whole captions: not an ONNX model's
    teacher_forced = score and vocab.itos == dataset.vocab.itos and getattr(model, "backend", "torch") == "torch"
    # METEOR's JVM and paraphrase tables load (~10 s) while the captions are decoded
    meteor_proc = start_meteor() if score and meteor is not False else None
    try:
        hyps, sums, seconds = _decode_split(model, dataset, device, vocab, options, batch_size=batch_size,
                                            num_workers=num_workers, alpha_c=alpha_c if teacher_forced else None,
                                            features=features, progress=progress)
    except BaseException:
        if meteor_proc is not None:
            meteor_proc.close(kill=True)
        raise
    decode_seconds = seconds["encode"] + seconds["beam"]
    if not score:
        return {"images": len(hyps), "captions_per_s": len(hyps) / max(decode_seconds, 1e-9)}
    references = dataset.references()
    ids = dataset.image_ids()
    refs = {str(i): references[i] for i in hyps}
    t0 = time.perf_counter()
    scores = caption_scores(refs, {str(i): h for i, h in hyps.items()},
                            meteor=meteor_proc if isinstance(meteor_proc, MeteorProcess) else meteor)
    seconds["scoring"] = time.perf_counter() - t0
    tf = xe_summary(sums.tolist()) if sums is not None else {}
    scores.update({
        "loss": tf.get("ce"),  # cross-entropy per word, without the attention penalty
        "top5": tf.get("top5"),
        "images": len(hyps),
        # every decoding setting (DESIGN: eval.json records them)
        "beam_size": options.beam_size,
        "block_ngrams": options.block_ngrams,
        "allow_unk": options.allow_unk,
        "dangling": list(options.dangling),
        "max_length": options.max_length,
        "length_penalty": options.length_penalty,
        "amp": amp_name(options.amp_dtype),
        "backend": getattr(model, "backend", "torch") + ("-int8" if getattr(model, "int8", False) else ""),
        "captions_per_s": len(hyps) / max(decode_seconds, 1e-9),
        # where the time went: encoder (or cached features), beam search, teacher-forced pass,
        # metrics (METEOR included: the wait for its process, started before decoding)
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    })
    scores["captions"] = [{"image_id": ids[i], "caption": hyps[i]} for i in sorted(hyps)]
    return scores


def _decode_split(model, dataset: CaptionDataset, device: torch.device, vocab, options: DecodeOptions, *,
                  batch_size: int, num_workers: int, alpha_c: float | None, features,
                  progress: ProgressFn | None) -> tuple[dict[int, str], torch.Tensor | None, dict]:
    """Free-running captions of every image (index -> text), the teacher-forced sums
    (:data:`capcli.models.loss.XE_SUMS`, when ``alpha_c`` is given) and the seconds spent encoding,
    in beam search and in the teacher-forced pass."""
    model.eval()
    data = CachedFeatureDataset(dataset, Path(features)) if features is not None else dataset
    # its own generator: evaluating never draws from the global RNG (a training run resumes exactly)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_cached if features is not None else collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    hyps: dict[int, str] = {}
    sums = None
    seconds = {"encode": 0.0, "beam": 0.0, "teacher_forced": 0.0}
    with model.derived_weights():
        for batch in loader:
            t0 = _clock(device)
            with autocast(device, options.amp_dtype):
                feats = model.features(_to(batch.get("images"), device), _to(batch.get("regions"), device))
            t1 = _clock(device)
            texts, _ = decode_features(model, vocab, feats, options)
            t2 = _clock(device)
            hyps.update(zip(batch["index"].tolist(), texts))
            seconds["encode"] += t1 - t0
            seconds["beam"] += t2 - t1
            if progress is not None:
                progress(len(hyps), len(dataset))
            if alpha_c is not None:  # teacher-forced loss and top-5 (what the paper reports), same features
                tf_batch = trim_padding(batch)
                with autocast(device, options.amp_dtype):
                    out = xe_loss(model, feats, tf_batch["captions"].to(device), batch["lengths"].to(device),
                                  1.0, alpha_c)["sums"]
                sums = out if sums is None else sums + out
                seconds["teacher_forced"] += _clock(device) - t2
    return hyps, sums, seconds


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def _clock(device: torch.device) -> float:
    """perf_counter, after the device's queued work."""
    synchronize(device)
    return time.perf_counter()


def feature_cache(model, dataset: CaptionDataset, device: torch.device, amp_dtype, batch_size: int,
                  progress: ProgressFn | None = None) -> Path | None:
    """The split's cached features for a model trained on a frozen encoder: made now if missing
    (beside the training caches, reused by later evaluations); None when the model's encoder was
    fine-tuned or the dataset dir cannot be written."""
    cfg = model.cfg
    if cfg.finetune:
        return None
    path = cache_file(cache_dir(dataset.dir, model.encoder), dataset, amp_dtype)
    if path.is_file():
        return path
    if not os.access(dataset.dir, os.W_OK):
        return None
    build_cache(model.encoder, dataset, device, path, batch_size=batch_size, amp_dtype=amp_dtype, progress=progress)
    return path


def decode_options(beam: int = 3, max_length: int = 0, block_ngrams: int | None = None, allow_unk: bool = False,
                   dangling: tuple[str, ...] | None = None) -> DecodeOptions:
    """The options of a `capcli evaluate` run: beam search with the defaults of every decode
    (n-gram blocking, no <unk>, no dangling last word) unless given."""
    return DecodeOptions(beam_size=beam, max_length=max_length or None,
                         **({} if block_ngrams is None else {"block_ngrams": block_ngrams}),
                         allow_unk=allow_unk, **({} if dangling is None else {"dangling": tuple(dangling)}))


def run_eval_path(run_dir: str | Path, split: str) -> Path:
    """Where a run's evaluation on ``split`` lives: RUN/eval-SPLIT/eval.json (the model card reads
    it from there)."""
    return Path(run_dir) / f"eval-{split}" / "eval.json"


def default_output(source: str | Path, split: str) -> Path:
    """Where a model's evaluation goes by default: :func:`run_eval_path` for a run (or a checkpoint
    inside one), ./eval.json for anything else."""
    run_dir = run_dir_of(source)
    return run_eval_path(run_dir, split) if run_dir is not None else Path("eval.json")


def evaluate_checkpoint(source: str | Path | Captioner, device: torch.device,
                        options: DecodeOptions | None = None, *,
                        data: str | Path | None = None, split: str = "test", amp: str | None = None,
                        batch_size: int | None = None, max_images: int = 0, num_workers: int = 0,
                        meteor: bool | None = None, output: str | Path | None = None,
                        progress: Callable[[str, int, int], None] | None = None, backend: str = "torch",
                        int8: bool = False) -> tuple[dict, Path]:
    """Score a MODEL source (or a :class:`~capcli.api.Captioner` already loaded) on a split and
    write ``eval.json`` (the scores, with where the time went) and ``captions.json`` (COCO results)
    beside it; returns (scores, eval.json path).

    ``data``: the dataset dir (default: the one the model trained on). ``amp``: the precision
    (default: the model's ``train.amp``). ``options``: how to decode (the model's precision and
    the dataset's longest caption fill what it leaves open). ``output``: the eval.json path
    (default: :func:`default_output`). A model trained on a frozen encoder reads the split's
    feature cache (made on the first evaluation). ``progress(phase, done, total)`` follows the
    ``cache`` and ``decode`` phases. ``backend``/``int8``: see :meth:`Captioner.load` (an ONNX
    model scores captions only: its loss and top-5 are null).
    """
    t_start = time.perf_counter()
    captioner = (source if isinstance(source, Captioner)
                 else Captioner.load(source, device, amp=amp, backend=backend, int8=int8))
    source = captioner.source
    options = dataclasses.replace(options or DecodeOptions(), amp_dtype=captioner.amp_dtype)
    load_s = time.perf_counter() - t_start
    cfg = captioner.config
    data = Path(data or captioner.data.get("dir") or cfg.data.dir)
    dataset = CaptionDataset(data, split, max_images=max_images)
    batch_size = batch_size or default_batch_size(device)
    phase = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
    t0 = time.perf_counter()
    features = (feature_cache(captioner.model, dataset, device, captioner.amp_dtype, batch_size, phase("cache"))
                if cfg.train.cache_features and captioner.backend == "torch" else None)
    cache_s = time.perf_counter() - t0
    scores = evaluate_model(captioner.model, dataset, device, options, batch_size=batch_size,
                            num_workers=num_workers, alpha_c=cfg.train.alpha_c, meteor=meteor,
                            vocab=captioner.vocab, features=features, progress=phase("decode"))
    captions = scores.pop("captions")
    scores.update({"checkpoint": str(source), "data": str(data), "split": split})
    # load: checkpoint and model; feature_cache: a frozen encoder's cache of this split, made on
    # the first evaluation only; total: the call from its start (a command's imports come before)
    scores["seconds"] = {"load": round(load_s, 3), "feature_cache": round(cache_s, 3), **scores["seconds"],
                         "total": round(time.perf_counter() - t_start, 3)}
    output = Path(output) if output is not None else default_output(source, split)
    write_json(output, scores)
    write_json(output.with_name("captions.json"), captions)
    return scores, output


def score_results(results_path: str | Path, dataset: CaptionDataset, meteor: bool | None = None) -> dict:
    """Score a COCO results file (a list of {image_id, caption}) against the dataset's references."""
    path = Path(results_path)
    if not path.is_file():
        raise UserError(f"results file {path} not found")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"results file {path} is not valid JSON: {exc}") from exc
    if not isinstance(results, list) or not all(isinstance(r, dict) and "image_id" in r and "caption" in r
                                                for r in results):
        raise UserError(f"results file {path} must be a JSON list of {{\"image_id\": ..., \"caption\": ...}}")
    ids = dataset.image_ids()
    references = dataset.references()
    by_id = {img_id: references[i] for i, img_id in enumerate(ids)}
    hyps = {}
    for r in results:
        key = r["image_id"]
        if key not in by_id:
            raise UserError(f"image_id {key!r} in {path} is not in split {dataset.split!r} of {dataset.dir}")
        hyps[str(key)] = str(r["caption"])
    refs = {str(k): by_id[k] for k in (r["image_id"] for r in results)}
    scores = caption_scores(refs, hyps, meteor=meteor)
    scores.update({"loss": None, "top5": None, "images": len(hyps), "beam_size": None,
                   "captions_per_s": None})
    return scores
