"""Where a command runs: the device, torchrun processes (DDP), precision (autocast), seeds and RNG
states, CPU counts and memory. Resolved once per command and passed down; nothing here is
module-level state.

torch is imported inside the functions that need it: ``capcli prepare`` reads the CPU counts
here and never imports torch (a second or more on every start).
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

from capcli.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


# --------------------------------------------------------------------------------- devices


def resolve_device(spec: str) -> "torch.device":
    """'auto' -> cuda if available else cpu; validates 'cuda:N'."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def synchronize(device: "torch.device") -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read after it
    covers that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------- torchrun / DDP


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun), readable before the
    process group exists: rank 0 speaks for a run, the others stay quiet."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: "torch.device") -> tuple[Dist, "torch.device"]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA
    (one GPU per local rank), gloo on the CPU."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from datetime import timedelta

        # rank 0 validates alone while the others wait at the next collective: allow a long one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, local, local_world), device


def cleanup_distributed(d: Dist) -> None:
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every rank (nothing when alone)."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: list[float], d: Dist, device: "torch.device") -> list[float]:
    """Sum ``values`` over the ranks (float64); the values themselves when alone."""
    if d.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flag: "torch.Tensor", world: int) -> bool:
    """True when ``flag`` (a 0/1 float tensor on the device) is 1 on every rank: one number read
    from the device (a sync), plus a collective under DDP."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_from_main(values: list[float], d: Dist, device: "torch.device") -> list[float]:
    """Rank 0's ``values`` on every rank (e.g. its validation verdict)."""
    if d.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.tolist()


# --------------------------------------------------------------------------------- precision


def check_amp(value, what: str = "amp") -> None:
    """A one-line UserError unless ``value`` is one of :data:`AMP_CHOICES` (or a YAML boolean)."""
    if value not in (*AMP_CHOICES, True, False, None):
        raise UserError(f"{what} {value!r}: use auto, off, bf16 or fp16")


def autocast_dtype(amp, device: "torch.device") -> "torch.dtype | None":
    """Resolve an ``amp`` setting for a device: None (full precision), torch.bfloat16 or torch.float16.

    ``auto``: bf16 (fp16 where bf16 is missing) on CUDA, full precision elsewhere. ``bf16`` on the
    CPU is honoured: CPUs with AMX or AVX512-BF16 run it about twice as fast as float32."""
    import torch

    check_amp(amp)
    if device.type == "cpu" and amp == "bf16":
        return torch.bfloat16
    if device.type == "cpu" and amp == "fp16":
        raise UserError("amp fp16 is for CUDA; on the CPU use bf16 (fast where the CPU has AMX or AVX512-BF16) or off")
    if amp in ("off", False, None) or device.type != "cuda":
        return None
    if amp in ("auto", True):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def amp_name(dtype: "torch.dtype | None") -> str:
    """The ``amp`` value that :func:`autocast_dtype` resolves to ``dtype``: off, bf16 or fp16."""
    import torch

    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: "torch.device", dtype: "torch.dtype | None"):
    """``torch.autocast`` at ``dtype`` on the device's type, or a no-op when ``dtype`` is None."""
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def active_autocast_dtype(device_type: str) -> "torch.dtype | None":
    """The dtype autocast runs products in on this device type now, or None when it is off."""
    import torch

    try:
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4: no per-device queries
        pass
    return None


def autocast_off(device_type: str):
    """Autocast disabled where the device has autocast (the meta device, used to build models
    without memory, has none)."""
    import contextlib

    import torch

    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


# --------------------------------------------------------------------------------- seeds, RNG states


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's, torch's and CUDA's RNG states, as tensors and plain values (a checkpoint
    opened with ``weights_only=True`` holds them)."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": list(py_state[1]),  # a tuple of ints; a list is weights_only-safe
        "python_pos": py_state[2],
        "numpy": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------- CPUs


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset, SLURM or a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(value, d: Dist | None = None) -> int:
    """``data.num_workers``: a number as given, or ``auto``: the CPUs this process may use, shared
    by the ranks on this machine, less one for the training process itself, at most 8. On 2 CPUs
    that is 1 (torch warns when workers outnumber the CPUs, and they only fight the main process)."""
    if value != "auto":
        return int(value)
    share = usable_cpus() // (d.local_world if d else 1)
    return max(0, min(8, share - 1))


# --------------------------------------------------------------------------------- memory

_HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "std::bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the host running out (MemoryError, allocator failures)."""
    import torch

    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or any(s in text for s in _HOST_OOM))


def free_memory(device: "torch.device") -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_that_fits(run: Callable[[int], T], size: int, device: "torch.device") -> tuple[int, T | None]:
    """``run(size)``, halving ``size`` on out-of-memory (CUDA or host) until a run fits: (the size
    that ran, its result), or (0, None) when not even 1 fits. Other errors propagate."""
    while size >= 1:
        try:
            return size, run(size)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory means "try smaller"
            if not is_out_of_memory(exc):
                raise
        free_memory(device)  # outside the except block: the traceback no longer pins the failed tensors
        size //= 2
    return 0, None
