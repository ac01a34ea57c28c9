"""One evaluation path, used by `capcli evaluate` and by validation inside `train`: free-running
beam search (no teacher forcing) for every reported caption score, plus teacher-forced loss and
top-5 accuracy, scored against every raw reference caption of each image."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from capcli.data.dataset import CaptionDataset, collate, trim_padding
from capcli.data.features import CachedFeatureDataset, collate_cached
from capcli.decode import beam_search
from capcli.errors import UserError
from capcli.metrics import caption_scores

ProgressFn = Callable[[int, int], None]

# Images decoded at once when the user gives no batch size. A GPU's beam search is bound by
# launching its small per-word kernels, so its throughput grows with the batch (H200, convnext_atto,
# beam 5, 50 words: 530 captions/s at 40 images, 2,500 at 128, 4,600 at 256; peak 0.8 GB at 128);
# a CPU is saturated by 32 (measured: 16 left the decoder's products short of rows).
DEFAULT_BATCH = {"cpu": 32, "cuda": 128}


def default_batch_size(device: torch.device | str) -> int:
    """Images per decoding batch on ``device`` when none is given (:data:`DEFAULT_BATCH`)."""
    return DEFAULT_BATCH.get(torch.device(device).type, 32)


@torch.inference_mode()
def generate(model, vocab, images: torch.Tensor, *, beam_size: int = 3, max_length: int = 50,
             length_penalty: float = 0.0, block_ngrams: int = 0, return_alphas: bool = False, amp_dtype=None,
             sample: dict | None = None):
    """Captions (strings) for a batch of uint8 images, with the decode result."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        feats = model.encode(images)
    return decode_features(model, vocab, feats, beam_size=beam_size, max_length=max_length,
                           length_penalty=length_penalty, block_ngrams=block_ngrams,
                           return_alphas=return_alphas, sample=sample, amp_dtype=amp_dtype)


def decode_features(model, vocab, feats: torch.Tensor, *, beam_size: int = 3, max_length: int = 50,
                    length_penalty: float = 0.0, block_ngrams: int = 0, return_alphas: bool = False,
                    sample: dict | None = None, amp_dtype=None):
    """Captions (strings) and the decode result for encoder features (B, P, E): beam search, or
    with ``sample`` (``{"temperature": T, "top_k": K}``) one caption drawn from the model. The
    decoder's products run under autocast at ``amp_dtype`` (scores stay float32)."""
    with torch.autocast(feats.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return _decode(model, vocab, feats if amp_dtype is not None else feats.float(), beam_size=beam_size,
                       max_length=max_length, length_penalty=length_penalty, block_ngrams=block_ngrams,
                       return_alphas=return_alphas, sample=sample)


def _decode(model, vocab, feats, *, beam_size, max_length, length_penalty, block_ngrams, return_alphas, sample):
    if sample is not None:
        from capcli.decode import DecodeResult, sample as draw

        s = draw(model.decoder, feats, start=vocab.start, end=vocab.end, pad=vocab.pad,
                 max_length=max_length, **sample)
        tokens = [[t for t in row if t not in (vocab.pad, vocab.end)] for row in s.tokens.tolist()]
        return [vocab.decode(t) for t in tokens], DecodeResult(tokens, torch.zeros(len(tokens)), None)
    result = beam_search(model.decoder, feats, start=vocab.start, end=vocab.end, pad=vocab.pad,
                         beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
                         block_ngrams=block_ngrams, return_alphas=return_alphas)
    return [vocab.decode(t) for t in result.tokens], result


@torch.inference_mode()
def evaluate_model(model, dataset: CaptionDataset, device: torch.device, *, beam_size: int = 3,
                   max_length: int = 0, batch_size: int = 32, num_workers: int = 0,
                   alpha_c: float = 1.0, amp_dtype=None, meteor: bool | None = None,
                   vocab=None, features: str | Path | None = None, score: bool = True,
                   block_ngrams: int = 0, progress: ProgressFn | None = None) -> dict:
    """Scores of ``model`` on ``dataset``; returns the metrics dict and ``captions`` (COCO results).

    ``vocab`` is the model's vocabulary (default: the dataset's). Loss and top-5 need the dataset's
    encoded captions in the model's vocabulary, so they are None when the two differ. ``features``:
    a frozen encoder's feature cache of this split (:mod:`capcli.data.features`), read instead of
    running the encoder. ``score=False`` decodes and stops (to time a decode).
    """
    from capcli.metrics import MeteorProcess, start_meteor
    from capcli.training.objectives import XEObjective
    from capcli.training.runtime import amp_name

    # METEOR's JVM and paraphrase tables load (~10 s) while the captions are decoded
    meteor_proc = start_meteor() if score and meteor is not False else None
    try:
        hyps, sums, seconds = _decode_split(
            model, dataset, device, vocab or dataset.vocab, beam_size=beam_size, block_ngrams=block_ngrams,
            max_length=max_length or dataset.max_length, batch_size=batch_size, num_workers=num_workers,
            objective=XEObjective(model, alpha_c) if score else None, amp_dtype=amp_dtype, features=features,
            progress=progress)
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
    tf = XEObjective.summary(sums.tolist()) if sums is not None else {}
    scores.update({
        "loss": tf.get("ce"),  # cross-entropy per word, without the attention penalty
        "top5": tf.get("top5"),
        "images": len(hyps),
        "beam_size": beam_size,
        "block_ngrams": block_ngrams,
        "amp": amp_name(amp_dtype),
        "captions_per_s": len(hyps) / max(decode_seconds, 1e-9),
        # where the time went: encoder (or cached features), beam search, teacher-forced pass,
        # metrics (METEOR included: the wait for its process, started before decoding)
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    })
    scores["captions"] = [{"image_id": ids[i], "caption": hyps[i]} for i in sorted(hyps)]
    return scores


def _decode_split(model, dataset: CaptionDataset, device: torch.device, vocab, *, beam_size: int, block_ngrams: int,
                  max_length: int, batch_size: int, num_workers: int, objective, amp_dtype, features,
                  progress: ProgressFn | None) -> tuple[dict[int, str], torch.Tensor | None, dict]:
    """Free-running captions of every image (index -> text), the objective's teacher-forced sums
    (when the vocabularies agree and ``objective`` is given) and the seconds spent encoding, in
    beam search and in the teacher-forced pass."""
    model.eval()
    teacher_forced = objective is not None and vocab.itos == dataset.vocab.itos
    data = CachedFeatureDataset(dataset, Path(features)) if features is not None else dataset
    # its own generator: evaluating never draws from the global RNG (a training run resumes exactly)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_cached if features is not None else collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    hyps: dict[int, str] = {}
    sums = None
    seconds = {"encode": 0.0, "beam": 0.0, "teacher_forced": 0.0}
    with model.frozen_weights():
        for batch in loader:
            encode_s, beam_s, feats = _decode_batch(model, vocab, batch, device, hyps, beam_size=beam_size,
                                                    block_ngrams=block_ngrams, max_length=max_length,
                                                    amp_dtype=amp_dtype, features=features is not None)
            seconds["encode"] += encode_s
            seconds["beam"] += beam_s
            if progress is not None:
                progress(len(hyps), len(dataset))
            if teacher_forced:  # teacher-forced loss and top-5 (what the seed reported), same features
                t0 = _clock(device)
                tf_batch = trim_padding(batch)
                tf_batch = {"captions": tf_batch["captions"].to(device), "lengths": batch["lengths"].to(device)}
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = objective(tf_batch, 1.0, feats=feats)["sums"]
                sums = out if sums is None else sums + out
                seconds["teacher_forced"] += _clock(device) - t0
    return hyps, sums, seconds


def _clock(device: torch.device) -> float:
    """perf_counter, after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _decode_batch(model, vocab, batch: dict, device, hyps: dict, *, beam_size: int, block_ngrams: int,
                  max_length: int, amp_dtype, features: bool) -> tuple[float, float, torch.Tensor]:
    """Caption one batch into ``hyps``; returns the seconds spent encoding and decoding it, and
    the batch's features."""
    regions = batch["regions"].to(device, non_blocking=True) if features else None
    images = batch["images"].to(device, non_blocking=True) if not features else None
    t0 = _clock(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        feats = model.features(images, regions)
    t1 = _clock(device)
    texts, _ = decode_features(model, vocab, feats, beam_size=beam_size, max_length=max_length,
                               block_ngrams=block_ngrams, amp_dtype=amp_dtype)
    t2 = _clock(device)
    for idx, text in zip(batch["index"].tolist(), texts):
        hyps[idx] = text
    return t1 - t0, t2 - t1, feats


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
