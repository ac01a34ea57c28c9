"""The one timing harness of `capcli benchmark`: warm-up, synchronised timing, peak memory, OOM retry.

Every ``bench_*`` function returns a flat dict (the rows of ``benchmark.json``) and never prints;
pass ``progress(phase, done, total)`` to follow it. Habits from timm's benchmark.py:

- warm-up iterations before timing (allocator, cuDNN autotuning, lazy init), not counted;
- ``torch.cuda.synchronize`` around every timed iteration on CUDA, so a time covers the GPU work
  and not just the kernel launches;
- inference under ``torch.inference_mode``;
- on out-of-memory (CUDA or host) the run is retried with half the batch (the row says which batch ran).

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

from capcli.data.vocab import SPECIALS, Vocab
from capcli.errors import UserError
from capcli.runtime import largest_that_fits, synchronize
from capcli.version import __version__

# progress(phase, done, total): e.g. ("train", 3, 13), counting warm-up and timed iterations
ProgressFn = Callable[[str, int, int], None]

FIRST_WORD = len(SPECIALS)  # random words are drawn from the ids after the specials


def random_vocab(size: int) -> Vocab:
    """A vocabulary of ``size`` tokens: the specials, then made-up words w4, w5, ..."""
    return Vocab([*SPECIALS, *(f"w{i}" for i in range(FIRST_WORD, size))])

# ----------------------------------------------------------------------------- timing, memory

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
    synchronize(device)  # warm-up work must not leak into the first timed step
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
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



def with_oom_retry(run: Callable[[int], dict], size: int, device: torch.device, what: str) -> dict:
    """``run(size)``; on out-of-memory (CUDA or host) retry with ``size // 2`` until it fits. The
    result says how many halvings it took (``oom_retries``)."""
    ran, out = largest_that_fits(run, size, device)
    if not ran:
        raise UserError(f"{what}: out of memory even with a batch of 1; use a smaller "
                        "--image-size or another device")
    out["oom_retries"] = int(round(math.log2(size / ran)))
    return out


# ----------------------------------------------------------------------------- helpers

def random_images(n: int, image_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g).to(device)


def random_captions(images: int, per_image: int, words: int, vocab: int, device: torch.device,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, K, words + 2) ids and (images, K) lengths: <start>, random words, <end>, then
    <pad>. Lengths (counting <start> and <end>) are drawn uniformly from ``words // 2`` to
    ``words + 1``, as the benchmark script of the paper's code draws them (docs/performance.md),
    so that both decode the same number of steps."""
    g = torch.Generator().manual_seed(seed)
    specials = random_vocab(FIRST_WORD)
    caps = torch.randint(FIRST_WORD, vocab, (images, per_image, words + 2), generator=g)
    lengths = torch.randint(max(2, words // 2), words + 2, (images, per_image), generator=g)
    pos = torch.arange(words + 2)
    caps[:, :, 0] = specials.start
    caps = caps.masked_fill(pos == (lengths - 1).unsqueeze(2), specials.end)
    caps = caps.masked_fill(pos >= lengths.unsqueeze(2), specials.pad)
    return caps.to(device), lengths.to(device)


def feature_shape(encoder, image_size: int) -> tuple[int, ...]:
    """(P, C) of ``encoder`` on one CPU image of ``image_size``; a UserError when the backbone does
    not take that size (e.g. ViTs built for a fixed size)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            return tuple(encoder(random_images(1, image_size, torch.device("cpu"))).shape[1:])
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
    x = random_images(1, image_size, device)
    try:
        with torch.inference_mode():
            encoder(x)  # a first call's one-off work (folding BatchNorm: capcli.models.fast.fold) is not counted
            with FlopCounterMode(display=False) as counter:
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

    device = torch.device(device)
    return {"capcli": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": str(device), "device_name": device_name(device),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # other work on the machine skews CPU timings: the 1-minute load average says how much
            "load_avg_1m": load_average(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def model_config(encoder: str, grid: int, finetune: bool):
    from capcli.config import ModelConfig

    # image_size=None: the benchmark feeds images at the size it measures, no resize inside
    return ModelConfig(encoder=encoder, pretrained=False, finetune=finetune, grid=grid, image_size=None)


