"""`capcli benchmark decode`: captioning throughput, encoder + beam search."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from capcli.api import load_model
from capcli.bench.harness import (FIRST_WORD, PeakMemory, ProgressFn, feature_shape, model_config, random_images,
                                  random_vocab, with_oom_retry)
from capcli.decode import DecodeOptions, decode_features, default_batch_size
from capcli.errors import UserError
from capcli.models.captioner import CaptionModel
from capcli.models.encoder import check_encoder_names
from capcli.runtime import amp_name, autocast, autocast_dtype, free_memory, synchronize

RANDOM_NOTE = ("random weights: the decoder rarely emits <end>, so most captions run to max_length "
               "words; this is the worst case of the beam search")


def bench_decode(encoder: str | None = None, *, beam: int = 3, images: int = 64, max_length: int = 20,
                 vocab: int = 1000, image_size: int | None = None, device: torch.device | str = "cpu",
                 checkpoint: str | Path | None = None, batch: int | None = None, warmup: int = 1, amp="auto",
                 grid: int = 7, progress: ProgressFn | None = None, backend: str = "torch", int8: bool = False,
                 block_ngrams: int = 0) -> dict:
    """Captioning throughput: ``images`` random images, ``batch`` at a time, encoder + beam search.

    ``captions_per_s`` counts images captioned per second, encoder included. Random weights unless
    ``checkpoint`` (a .pt or a run dir) is given: its encoder, vocabulary and image size are then
    used, ``vocab`` is ignored and ``encoder``, if given, must match. ``max_length`` counts words.
    ``ended_fraction`` is the share of captions that ended with <end> before ``max_length``.

    ``backend="onnxruntime"`` runs the ONNX graphs through the same beam search: those of
    ``checkpoint`` (a model folder exported with ``--format onnx``), or of the random model,
    exported to a temporary folder first (``int8``: the int8 decoder). ``block_ngrams``: as in
    caption (0 here by default: the benchmark's history is without it).
    """
    if backend not in ("torch", "onnxruntime"):
        raise UserError(f"backend {backend!r}: use torch or onnxruntime")
    if int8 and backend != "onnxruntime":
        raise UserError("--int8 runs the quantised ONNX decoder: add --backend onnxruntime")
    if backend == "onnxruntime" and torch.device(device).type != "cpu":
        raise UserError("the onnxruntime backend runs on the CPU here: use --device cpu")
    device = torch.device(device)
    batch = batch or default_batch_size(device)  # the engine's, as caption and evaluate use it
    for key, value in (("beam", beam), ("images", images), ("max_length", max_length), ("batch", batch)):
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    amp_dtype = autocast_dtype(amp, device)
    note = None
    if checkpoint is not None and backend == "onnxruntime":
        from capcli.api import Captioner

        captioner = Captioner.load(checkpoint, "cpu", backend="onnxruntime", int8=int8)
        model, voc, cfg = captioner.model, captioner.vocab, captioner.config
        if encoder is not None and encoder != cfg.model.encoder:
            raise UserError(f"--encoder {encoder} does not match the model's encoder {cfg.model.encoder}")
        encoder = cfg.model.encoder
        image_size = captioner.image_size
        vocab = len(voc)
    elif checkpoint is not None:
        model, voc, cfg, ckpt = load_model(checkpoint, "cpu")
        if encoder is not None and encoder != cfg.model.encoder:
            raise UserError(f"--encoder {encoder} does not match the checkpoint's encoder "
                            f"{cfg.model.encoder}; leave --encoder out to use the checkpoint's")
        encoder = cfg.model.encoder
        image_size = image_size or int(ckpt.get("data", {}).get("image_size") or cfg.model.image_size or 224)
        vocab = len(voc)
    else:
        if encoder is None:
            raise UserError("give an encoder name (--encoder convnext_atto) or a --checkpoint")
        if vocab <= FIRST_WORD:
            raise UserError(f"vocab {vocab} is too small: 4 ids are specials, so use at least {FIRST_WORD + 1}")
        check_encoder_names([encoder])
        image_size = image_size or 224
        model = CaptionModel(model_config(encoder, grid, finetune=False), vocab, pretrained=False)
        voc = random_vocab(vocab)
        note = RANDOM_NOTE
        if backend == "onnxruntime":
            model = _random_onnx(model.eval(), image_size, int8)
    model.eval()
    if backend == "torch":
        feature_shape(model.encoder, image_size)
    else:
        amp_dtype = None  # onnxruntime runs float32 (its int8 decoder with --int8)
    options = DecodeOptions(beam_size=beam, max_length=max_length, amp_dtype=amp_dtype, block_ngrams=block_ngrams)

    def run(n: int) -> dict:
        meter = PeakMemory(device).start()
        chunks = [min(n, images - i) for i in range(0, images, n)]
        pixels = random_images(n, image_size, torch.device("cpu"))
        lengths: list[int] = []
        try:
            model.to(device)
            pixels_dev = pixels.to(device)

            @torch.inference_mode()
            def caption(size: int) -> list[list[int]]:  # the engine of evaluate and caption
                with autocast(device, amp_dtype):
                    feats = model.encode(pixels_dev[:size])
                return decode_features(model, voc, feats, options)[1].tokens

            for i in range(warmup):  # on a full batch: allocator, autotuning, lazy init
                caption(n)
                if progress is not None:
                    progress("warm-up", i + 1, warmup)
            synchronize(device)
            times = []
            t0 = time.perf_counter()
            with model.derived_weights():  # as an evaluation does: derived weights once, timed
                for i, size in enumerate(chunks):
                    tokens = caption(size)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    lengths.extend(len(t) for t in tokens)
                    if progress is not None:
                        progress("decode", min(images, (i + 1) * n), images)
            peak = meter.stop()
        finally:
            model.to("cpu")
            free_memory(device)
        total = sum(times)
        return {"captions_per_s": images / total, "batch_ms": statistics.median(times) * 1e3,
                "ms_per_image": total / images * 1e3, "peak_mem_mb": peak, "peak_mem_kind": meter.kind,
                "mean_words": sum(lengths) / len(lengths),
                "ended_fraction": sum(1 for x in lengths if x < max_length) / len(lengths),
                "batch": n}

    out = with_oom_retry(run, min(batch, images), device, f"decode {encoder}")
    return {"encoder": encoder, **out, "beam": beam, "images": images, "max_length": max_length,
            "vocab": vocab, "image_size": image_size, "checkpoint": str(checkpoint) if checkpoint else None,
            "weights": "checkpoint" if checkpoint else "random", "warmup": warmup,
            "amp": amp_name(amp_dtype), "device": str(device), "note": note,
            "backend": backend + ("-int8" if int8 else ""), "block_ngrams": block_ngrams}


def _random_onnx(model, image_size: int, int8: bool):
    """The random model as ONNX graphs in a temporary folder, loaded for onnxruntime (the files
    stay open in onnxruntime's sessions; the folder goes when the process ends)."""
    import atexit
    import shutil
    import tempfile

    from capcli.onnx import export_graphs
    from capcli.store.onnx import OnnxCaptionModel

    folder = Path(tempfile.mkdtemp(prefix="capcli-bench-onnx-"))
    atexit.register(shutil.rmtree, folder, True)
    section = export_graphs(model, image_size, folder, quantize="int8" if int8 else None)
    return OnnxCaptionModel(folder, {"onnx": section}, model.decoder.vocab_size, int8=int8)


