"""Timing harness for `capcli benchmark`: warm-up, synchronised timing, peak memory, OOM retry.

Every ``bench_*`` function returns a flat dict (the rows of ``benchmark.json``) and never prints;
pass ``progress(phase, done, total)`` to follow it. Habits from timm's benchmark.py:

- warm-up iterations before timing (allocator, cuDNN autotuning, lazy init), not counted;
- ``torch.cuda.synchronize`` around every timed iteration on CUDA, so a time covers the GPU work
  and not just the kernel launches;
- inference under ``torch.inference_mode``;
- on CUDA out-of-memory the run is retried with half the batch (the row says which batch ran).

Throughput is work / total timed seconds (the mean step); ``step_ms`` is the median step (latency,
robust to a stray slow step).

Peak memory (``peak_mem_mb``, its meaning in ``peak_mem_kind``):

- ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated before the model went to the device: weights, gradients, optimizer
  state and activations of this benchmark (the allocator's cache is not counted).
- ``cpu_peak_rss_delta``: growth of the process's peak resident set over the benchmark (Linux:
  freed heap memory is first handed back with glibc's ``malloc_trim`` and the peak is reset
  through ``/proc/self/clear_refs``). The model is built on the CPU before measuring, so the
  weights are not in it: it is activations, gradients and optimizer state, give or take what the
  allocator keeps. Coarser than the CUDA number; compare rows of one run, not across machines.
- ``cpu_maxrss_delta``: the same from ``resource.getrusage`` where the peak cannot be reset; a
  lower bound (0 when an earlier part of the process peaked higher).
- ``None`` (with ``peak_mem_mb`` None): no way to measure on this device (e.g. MPS).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from capcli.errors import UserError
from capcli.evaluate import autocast_dtype
from capcli.models.encoder import check_encoder_names

# progress(phase, done, total): e.g. ("train", 3, 13), counting warm-up and timed iterations
ProgressFn = Callable[[str, int, int], None]

MODES = ("frozen", "finetune", "cached")
START, END = 1, 2  # capcli.data.vocab: <pad>=0, <start>=1, <end>=2, <unk>=3; random words are >= 4
FIRST_WORD = 4
CPU_ENCODERS = ("convnext_atto", "convnext_femto", "convnext_pico")
GPU_ENCODERS = ("convnext_tiny", "convnext_small", "convnext_base")  # the paper's sizes
ROW_KEYS = ("encoder", "params_m", "gflops", "images_per_s", "train_samples_per_s", "peak_mem_mb")
RANDOM_NOTE = ("random weights: the decoder rarely emits <end>, so most captions run to max_length "
               "words; this is the worst case of the beam search")


# ----------------------------------------------------------------------------- timing, memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int, iters: int, device: torch.device | str,
            progress: ProgressFn | None = None, phase: str = "run") -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed (synchronised on CUDA).

    Returns seconds per iteration: ``mean_s`` (total / iters, what throughput uses), ``median_s``,
    ``min_s``, and ``total_s``, ``iters``.
    """
    device = torch.device(device)
    if iters < 1:
        raise UserError(f"need at least 1 timed iteration, got {iters}")
    total = warmup + iters
    for i in range(warmup):
        fn()
        if progress is not None:
            progress(phase, i + 1, total)
    _sync(device)  # warm-up work must not leak into the first timed step
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(phase, warmup + i + 1, total)
    return {"iters": iters, "total_s": sum(times), "mean_s": sum(times) / iters,
            "median_s": statistics.median(times), "min_s": min(times)}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that the resident set is what is live.

    Without it, memory freed by an earlier benchmark in the same process stays resident and is
    reused without raising the peak, and a later benchmark reads as needing almost nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass


def _maxrss_kb() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a block: ``start()``, run, ``stop()`` -> MB (or None); ``kind`` says what."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind: str | None = None
        self._base = 0

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
        elif self.device.type == "cpu":
            _malloc_trim()
            rss = _status_kb("VmRSS")
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                reset = rss is not None and _status_kb("VmHWM") is not None
            except OSError:
                reset = False
            if reset:
                self._base, self.kind = rss, "cpu_peak_rss_delta"
            else:
                base = _maxrss_kb()
                self._base, self.kind = (base, "cpu_maxrss_delta") if base is not None else (0, None)
        return self

    def stop(self) -> float | None:
        if self.kind == "cuda_max_allocated":
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return peak / 2**20
        if self.kind == "cpu_peak_rss_delta":
            peak = _status_kb("VmHWM")
            return max(0, peak - self._base) / 1024 if peak is not None else None
        if self.kind == "cpu_maxrss_delta":
            peak = _maxrss_kb()
            return max(0, peak - self._base) / 1024 if peak is not None else None
        return None


def _is_oom(exc: BaseException, device: torch.device) -> bool:
    return device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_oom_retry(run: Callable[[int], dict], size: int, device: torch.device, what: str) -> dict:
    """``run(size)``; on CUDA out-of-memory retry with ``size // 2`` until it fits (or size 0)."""
    requested = size
    while True:
        try:
            out = run(size)
            break
        except Exception as exc:  # noqa: BLE001 - only OOM is retried, the rest re-raised
            if not _is_oom(exc, device):
                raise
        _free(device)  # outside the except block: the traceback no longer pins the failed tensors
        if size <= 1:
            raise UserError(f"{what}: out of GPU memory even with a batch of 1; use a smaller "
                            "--image-size or another device")
        size //= 2
    out["oom_retries"] = int(round(math.log2(requested / size))) if size != requested else 0
    return out


# ----------------------------------------------------------------------------- helpers

def _amp_name(dtype) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _random_images(n: int, image_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g).to(device)


def _random_captions(images: int, per_image: int, words: int, vocab: int, device: torch.device,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, K, words + 2) ids: <start> w1..w_words <end>, no padding (every step is real)."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(FIRST_WORD, vocab, (images, per_image, words + 2), generator=g)
    caps[:, :, 0], caps[:, :, -1] = START, END
    lengths = torch.full((images, per_image), words + 2, dtype=torch.long)
    return caps.to(device), lengths.to(device)


def feature_shape(encoder, image_size: int) -> tuple[int, ...]:
    """(P, C) of ``encoder`` on one CPU image of ``image_size``; a UserError when the backbone does
    not take that size (e.g. ViTs built for a fixed size)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            return tuple(encoder(_random_images(1, image_size, torch.device("cpu"))).shape[1:])
    except (AssertionError, RuntimeError, ValueError) as exc:
        native = encoder.backbone.pretrained_cfg.get("input_size", (3, None))[-1]
        hint = f"; use --image-size {native}" if native and native != image_size else ""
        raise UserError(f"encoder {encoder.name!r} does not take {image_size}px images "
                        f"({str(exc).splitlines()[0][:160]}){hint}") from exc
    finally:
        encoder.train(was_training)


def backbone_params_m(encoder) -> float:
    """Backbone parameters in millions (the pooling and normalisation add none)."""
    return sum(p.numel() for p in encoder.backbone.parameters()) / 1e6


def encoder_gflops(encoder, image_size: int) -> float:
    """GFLOPs of one forward of ``encoder`` on one image of ``image_size`` (counted on the CPU).

    From ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications,
    convolutions and attention only, with a multiply-add as 2 FLOPs. So this is about twice the
    "GMACs" that timm's tables and many papers quote (convnext_tiny at 224: ~4.5 GMACs, ~8.9 GFLOPs
    here); element-wise ops, norms and pooling are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = encoder.training
    devices = {p.device for p in encoder.parameters()} | {b.device for b in encoder.buffers()}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    encoder.eval()
    x = _random_images(1, image_size, device)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            encoder(x)
    finally:
        encoder.train(was_training)
    return counter.get_total_flops() / 1e9


def set_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads (0 keeps torch's default); returns the number in use.

    On a shared or busy machine fewer threads than cores can be several times faster: a thread
    that the OS parks stalls every parallel op at its barrier.
    """
    if threads < 0:
        raise UserError(f"threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): above the core count, CPU timings
    share the machine with other work."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def env_info(device: torch.device | str) -> dict:
    """Versions and hardware, for the ``env`` block of benchmark JSON."""
    import timm

    import capcli

    device = torch.device(device)
    return {"capcli": capcli.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": str(device), "device_name": device_name(device),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # other work on the machine skews CPU timings: the 1-minute load average says how much
            "load_avg_1m": load_average(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def _model_config(encoder: str, grid: int, finetune: bool):
    from capcli.config import ModelConfig

    # image_size=None: the benchmark feeds images at the size it measures, no resize inside
    return ModelConfig(encoder=encoder, pretrained=False, finetune=finetune, grid=grid, image_size=None)


# ----------------------------------------------------------------------------- training steps

def bench_train(encoder: str, *, image_size: int = 224, batch: int = 32, mode: str = "finetune",
                steps: int = 10, warmup: int = 3, device: torch.device | str = "cpu", amp="auto",
                captions_per_image: int = 5, vocab: int = 1000, max_length: int = 16, grid: int = 7,
                grad_clip: float = 5.0, progress: ProgressFn | None = None) -> dict:
    """Throughput of training steps (forward, loss, backward, Adam step) on random data.

    ``batch`` counts caption-image pairs as ``train.batch_size`` does: each step encodes
    ``batch // captions_per_image`` images and decodes ``captions_per_image`` captions of
    ``max_length`` random words per image (teacher forcing, no padding: every step is real).

    Modes: ``finetune`` trains encoder and decoder; ``frozen`` runs the encoder under no_grad and
    trains the decoder; ``cached`` trains the decoder on precomputed random features of the
    encoder's output shape (the cost of training on cached features of a frozen encoder, without
    reading them from disk).
    """
    from capcli.models.captioner import Captioner
    from capcli.models.decoder import caption_loss

    device = torch.device(device)
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if captions_per_image < 1:
        raise UserError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if batch < captions_per_image:
        raise UserError(f"batch {batch} counts caption-image pairs; it needs at least "
                        f"{captions_per_image} (one image with its {captions_per_image} captions)")
    if vocab <= FIRST_WORD:
        raise UserError(f"vocab {vocab} is too small: 4 ids are specials, so use at least {FIRST_WORD + 1}")
    if max_length < 1:
        raise UserError(f"max_length must be at least 1 word, got {max_length}")
    amp_dtype = autocast_dtype(amp, device)
    check_encoder_names([encoder])

    def run(images: int) -> dict:
        model = Captioner(_model_config(encoder, grid, finetune=mode == "finetune"), vocab, pretrained=False)
        # cached: the encoder only gives the feature shape and never reaches the device
        feat_shape = feature_shape(model.encoder, image_size)
        groups = model.trainable_groups(lr=4e-4, encoder_lr=1e-4)
        if mode == "cached":
            model.encoder = None
        meter = PeakMemory(device).start()
        try:
            model.to(device).train()
            params = [p for g in groups for p in g["params"]]
            optimizer = torch.optim.Adam(groups)
            scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
            captions, lengths = _random_captions(images, captions_per_image, max_length, vocab, device)
            targets = captions.reshape(images * captions_per_image, -1)[:, 1:]
            flat_lengths = lengths.reshape(-1)
            if mode == "cached":
                g = torch.Generator().manual_seed(0)
                cached = torch.randn((images, *feat_shape), generator=g).to(device)
            else:
                pixels = _random_images(images, image_size, device)

            def step() -> None:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if mode == "cached":
                        feats = cached
                    elif mode == "frozen":
                        with torch.no_grad():
                            feats = model.encode(pixels)
                    else:
                        feats = model.encode(pixels)
                    logits, alphas = model.decode_captions(feats, captions, 1.0)
                loss, _, _ = caption_loss(logits, targets, alphas, flat_lengths)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if grad_clip:  # as train.py: unscale, then clip by value
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_value_(params, grad_clip)
                scaler.step(optimizer)
                scaler.update()

            timing = time_fn(step, warmup, steps, device, progress, phase=f"train {mode}")
            peak = meter.stop()
        finally:
            del model
            _free(device)
        pairs = images * captions_per_image
        return {"samples_per_s": pairs / timing["mean_s"], "images_per_s": images / timing["mean_s"],
                "step_ms": timing["median_s"] * 1e3, "step_ms_mean": timing["mean_s"] * 1e3,
                "peak_mem_mb": peak, "peak_mem_kind": meter.kind,
                "batch": pairs, "images_per_step": images}

    out = _with_oom_retry(run, batch // captions_per_image, device, f"train {encoder} ({mode})")
    return {"encoder": encoder, "mode": mode, **out, "batch_requested": batch,
            "captions_per_image": captions_per_image, "image_size": image_size, "steps": steps,
            "warmup": warmup, "vocab": vocab, "max_length": max_length, "grid": grid,
            "amp": _amp_name(amp_dtype), "device": str(device)}


# ----------------------------------------------------------------------------- encoders

def bench_encoder(name: str, *, image_size: int = 224, batch: int = 32, device: torch.device | str = "cpu",
                  amp="auto", grid: int = 7, steps: int = 10, warmup: int = 3, train_batch: int | None = None,
                  captions_per_image: int = 5, progress: ProgressFn | None = None) -> dict:
    """One row of ``capcli benchmark encoders``: size, cost and speed of one timm encoder.

    Keys: ``encoder``, ``params_m`` (backbone parameters, millions), ``gflops`` (per image, see
    :func:`encoder_gflops`: multiply-add = 2 FLOPs), ``images_per_s`` (encoder inference,
    ``batch`` images at a time, inference_mode), ``train_samples_per_s`` (caption-image pairs per
    second of a full finetuning step, encoder + decoder, 5 random captions of 16 words per image,
    vocab 1000: see :func:`bench_train`), ``peak_mem_mb`` (the larger of the inference and training
    peaks), then the settings. ``train_batch`` counts pairs; default ``batch * captions_per_image``
    (the same ``batch`` images as inference, each with its captions).
    """
    from capcli.models.encoder import Encoder

    device = torch.device(device)
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    amp_dtype = autocast_dtype(amp, device)
    check_encoder_names([name])
    train_batch = train_batch or batch * captions_per_image

    # size and FLOPs on the CPU, once, with the model the inference run uses
    enc = Encoder(name, pretrained=False, grid=grid, finetune=False, image_size=None).eval()
    feat_shape = list(feature_shape(enc, image_size))
    params_m = backbone_params_m(enc)
    gflops = encoder_gflops(enc, image_size)

    def infer(n: int) -> dict:
        meter = PeakMemory(device).start()
        try:
            enc.to(device)
            images = _random_images(n, image_size, device)

            @torch.inference_mode()
            def forward() -> None:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    enc(images)

            timing = time_fn(forward, warmup, steps, device, progress, phase="inference")
            peak = meter.stop()
        finally:
            enc.to("cpu")
            _free(device)
        return {"images_per_s": n / timing["mean_s"], "infer_ms": timing["median_s"] * 1e3,
                "infer_peak_mem_mb": peak, "peak_mem_kind": meter.kind, "batch": n}

    inference = _with_oom_retry(infer, batch, device, f"encoder {name} (inference)")
    del enc
    _free(device)
    train = bench_train(name, image_size=image_size, batch=train_batch, mode="finetune", steps=steps,
                        warmup=warmup, device=device, amp=amp, captions_per_image=captions_per_image,
                        vocab=1000, max_length=16, grid=grid, progress=progress)
    peaks = [p for p in (inference["infer_peak_mem_mb"], train["peak_mem_mb"]) if p is not None]
    return {
        "encoder": name,
        "params_m": params_m,
        "gflops": gflops,
        "images_per_s": inference["images_per_s"],
        "train_samples_per_s": train["samples_per_s"],
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_mem_kind": inference["peak_mem_kind"],
        "infer_ms": inference["infer_ms"],
        "infer_peak_mem_mb": inference["infer_peak_mem_mb"],
        "train_step_ms": train["step_ms"],
        "train_peak_mem_mb": train["peak_mem_mb"],
        "feature_shape": feat_shape,
        "image_size": image_size,
        "batch": inference["batch"],
        "train_batch": train["batch"],
        "oom_retries": inference["oom_retries"] + train["oom_retries"],
        "steps": steps,
        "warmup": warmup,
        "amp": _amp_name(amp_dtype),
        "device": str(device),
    }


# ----------------------------------------------------------------------------- decoding

def bench_decode(encoder: str | None = None, *, beam: int = 3, images: int = 64, max_length: int = 20,
                 vocab: int = 1000, image_size: int | None = None, device: torch.device | str = "cpu",
                 checkpoint: str | Path | None = None, batch: int = 16, warmup: int = 1, amp="auto",
                 grid: int = 7, progress: ProgressFn | None = None) -> dict:
    """Captioning throughput: ``images`` random images, ``batch`` at a time, encoder + beam search.

    ``captions_per_s`` counts images captioned per second, encoder included. Random weights unless
    ``checkpoint`` (a .pt or a run dir) is given: its encoder, vocabulary and image size are then
    used, ``vocab`` is ignored and ``encoder``, if given, must match. ``max_length`` counts words.
    ``ended_fraction`` is the share of captions that ended with <end> before ``max_length``.
    """
    from capcli.decode import beam_search
    from capcli.models.captioner import Captioner, captioner_from_checkpoint

    device = torch.device(device)
    for key, value in (("beam", beam), ("images", images), ("max_length", max_length), ("batch", batch)):
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    amp_dtype = autocast_dtype(amp, device)
    note = None
    if checkpoint is not None:
        model, voc, cfg, ckpt = captioner_from_checkpoint(checkpoint, "cpu")
        if encoder is not None and encoder != cfg.model.encoder:
            raise UserError(f"--encoder {encoder} does not match the checkpoint's encoder "
                            f"{cfg.model.encoder}; leave --encoder out to use the checkpoint's")
        encoder = cfg.model.encoder
        image_size = image_size or int(ckpt.get("data", {}).get("image_size") or cfg.model.image_size or 224)
        vocab, start, end, pad = len(voc), voc.start, voc.end, voc.pad
    else:
        if encoder is None:
            raise UserError("give an encoder name (--encoder convnext_atto) or a --checkpoint")
        if vocab <= FIRST_WORD:
            raise UserError(f"vocab {vocab} is too small: 4 ids are specials, so use at least {FIRST_WORD + 1}")
        check_encoder_names([encoder])
        image_size = image_size or 224
        model = Captioner(_model_config(encoder, grid, finetune=False), vocab, pretrained=False)
        start, end, pad = START, END, 0
        note = RANDOM_NOTE
    model.eval()
    feature_shape(model.encoder, image_size)

    def run(n: int) -> dict:
        meter = PeakMemory(device).start()
        chunks = [min(n, images - i) for i in range(0, images, n)]
        pixels = _random_images(n, image_size, torch.device("cpu"))
        lengths: list[int] = []
        try:
            model.to(device)
            pixels_dev = pixels.to(device)

            @torch.inference_mode()
            def caption(size: int) -> list[list[int]]:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    feats = model.encode(pixels_dev[:size])
                return beam_search(model.decoder, feats.float(), start=start, end=end, pad=pad,
                                   beam_size=beam, max_length=max_length).tokens

            for i in range(warmup):  # on a full batch: allocator, autotuning, lazy init
                caption(n)
                if progress is not None:
                    progress("warm-up", i + 1, warmup)
            _sync(device)
            times = []
            for i, size in enumerate(chunks):
                t0 = time.perf_counter()
                tokens = caption(size)
                _sync(device)
                times.append(time.perf_counter() - t0)
                lengths.extend(len(t) for t in tokens)
                if progress is not None:
                    progress("decode", min(images, (i + 1) * n), images)
            peak = meter.stop()
        finally:
            model.to("cpu")
            _free(device)
        total = sum(times)
        return {"captions_per_s": images / total, "batch_ms": statistics.median(times) * 1e3,
                "ms_per_image": total / images * 1e3, "peak_mem_mb": peak, "peak_mem_kind": meter.kind,
                "mean_words": sum(lengths) / len(lengths),
                "ended_fraction": sum(1 for x in lengths if x < max_length) / len(lengths),
                "batch": n}

    out = _with_oom_retry(run, min(batch, images), device, f"decode {encoder}")
    return {"encoder": encoder, **out, "beam": beam, "images": images, "max_length": max_length,
            "vocab": vocab, "image_size": image_size, "checkpoint": str(checkpoint) if checkpoint else None,
            "weights": "checkpoint" if checkpoint else "random", "warmup": warmup,
            "amp": _amp_name(amp_dtype), "device": str(device), "note": note}


# ----------------------------------------------------------------------------- plot

def plot_encoders(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A PNG scatter of images/s (y) against parameters in millions (x), one labelled dot per row.

    Pillow only. Rows without both numbers are skipped.
    """
    from PIL import Image, ImageDraw, ImageFont

    pts = [(float(r["params_m"]), float(r["images_per_s"]), str(r["encoder"])) for r in rows
           if r.get("params_m") is not None and r.get("images_per_s") is not None]
    if not pts:
        raise UserError("nothing to plot: no row has both params_m and images_per_s")
    w, h = 900, 600
    left, right, top, bottom = 90, 40, 50, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def axis(values: list[float]) -> tuple[float, float, list[float]]:
        lo, hi = 0.0, max(values)
        hi = hi * 1.1 if hi > 0 else 1.0
        raw = hi / 5
        mag = 10 ** math.floor(math.log10(raw))
        tick = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        ticks = [i * tick for i in range(int(hi / tick) + 1)]
        return lo, ticks[-1] + tick if ticks[-1] < hi else ticks[-1], ticks

    x0, x1, xt = axis([p[0] for p in pts])
    y0, y1, yt = axis([p[1] for p in pts])

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in xt:
        px, _ = to_px(t, y0)
        draw.line([px, h - bottom, px, h - bottom + 5], fill="black")
        draw.line([px, top, px, h - bottom], fill=(230, 230, 230))
        draw.text((px - 10, h - bottom + 8), f"{t:g}", fill="black", font=font)
    for t in yt:
        _, py = to_px(x0, t)
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, w - right, py], fill=(230, 230, 230))
        draw.text((8, py - 6), f"{t:g}", fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for x, y, label in pts:
        px, py = to_px(x, y)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(31, 119, 180), outline="black")
        draw.text((px + 8, py - 14), label, fill="black", font=font)
    draw.text((left, h - 25), "parameters (millions)", fill="black", font=font)
    draw.text((8, 15), "images/s (encoder inference)", fill="black", font=font)
    if title:
        draw.text((left + 250, 15), title, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
