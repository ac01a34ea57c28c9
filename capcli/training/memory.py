"""Out of memory, on a GPU or in host memory: recognise it, free what it left, and find a batch
that fits, so that a user gets a batch size to use instead of a traceback."""

from __future__ import annotations

import gc
from typing import Callable

import torch

_HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "std::bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the host running out (MemoryError, allocator failures)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or any(s in text for s in _HOST_OOM))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_fitting_batch(task: torch.nn.Module, batch: dict, to_device: Callable[[dict], dict], tf_ratio: float,
                          amp_dtype, device: torch.device) -> int:
    """The most images of ``batch`` (halving from its size) whose forward and backward fit in
    memory now; 0 when not even one does. Gradients are cleared after each try: no weight moves."""
    module = getattr(task, "module", task)  # under DDP: the bare objective, no collectives
    params = [p for p in module.parameters() if p.requires_grad]
    n = len(batch["index"])
    size = n // 2
    while size >= 1:
        free_memory(device)
        part = {k: v[:size] for k, v in batch.items()}
        try:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = module(to_device(part), tf_ratio)
            out["loss"].backward()
            return size
        except Exception as exc:  # noqa: BLE001 - only out-of-memory means "try smaller"
            if not is_out_of_memory(exc):
                raise
        finally:
            for p in params:
                p.grad = None
        size //= 2
    free_memory(device)
    return 0
