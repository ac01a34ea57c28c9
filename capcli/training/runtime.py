"""Where a run executes: processes (torchrun/DDP), precision (autocast), seeds and CPU workers.

Resolved once per command and passed down; nothing here is module-level state.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from capcli.errors import UserError


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


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA
    (one GPU per local rank), gloo on the CPU."""
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


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available else cpu; validates 'cuda:N'."""
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


def cleanup_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum ``values`` over the ranks (float64); the values themselves when alone."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (e.g. its validation verdict)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(amp, device: torch.device) -> torch.dtype | None:
    """Resolve ``train.amp`` for a device: None (full precision), torch.bfloat16 or torch.float16.

    ``auto``: bf16 (fp16 where bf16 is missing) on CUDA, full precision elsewhere. ``bf16`` on the
    CPU is honoured: CPUs with AMX or AVX512-BF16 run it about twice as fast as float32."""
    if amp not in ("auto", "off", "bf16", "fp16", True, False, None):
        raise UserError(f"amp {amp!r}: use auto, off, bf16 or fp16")
    if device.type == "cpu" and amp == "bf16":
        return torch.bfloat16
    if device.type == "cpu" and amp == "fp16":
        raise UserError("amp fp16 is for CUDA; on the CPU use bf16 (fast where the CPU has AMX or AVX512-BF16) or off")
    if amp in ("off", False, None) or device.type != "cuda":
        return None
    if amp in ("auto", True):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """The ``amp`` value that :func:`autocast_dtype` resolves to ``dtype``: off, bf16 or fp16."""
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset, SLURM or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value, d: Dist | None = None) -> int:
    """``data.num_workers``: a number as given, or ``auto``: the CPUs this process may use, shared
    by the ranks on this machine, less one for the training process itself, at most 8. On 2 CPUs
    that is 1 (torch warns when workers outnumber the CPUs, and they only fight the main process)."""
    if value != "auto":
        return int(value)
    share = usable_cpus() // (d.local_world if d else 1)
    return max(0, min(8, share - 1))
