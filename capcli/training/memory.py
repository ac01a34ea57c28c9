"""Out of memory in a training step: find a batch that fits, so that a user gets a batch size to
use instead of a traceback."""

from __future__ import annotations

from typing import Callable

import torch

from capcli.runtime import autocast, largest_that_fits


def largest_fitting_batch(task: torch.nn.Module, batch: dict, to_device: Callable[[dict], dict], tf_ratio: float,
                          amp_dtype, device: torch.device) -> int:
    """The most images of ``batch`` (halving from half its size) whose forward and backward fit in
    memory now; 0 when not even one does. Gradients are cleared after each try: no weight moves."""
    module = getattr(task, "module", task)  # under DDP: the bare objective, no collectives
    params = [p for p in module.parameters() if p.requires_grad]

    def attempt(size: int) -> None:
        part = {k: v[:size] for k, v in batch.items()}
        try:
            with autocast(device, amp_dtype):
                out = module(to_device(part), tf_ratio)
            out["loss"].backward()
        finally:
            for p in params:
                p.grad = None

    return largest_that_fits(attempt, len(batch["index"]) // 2, device)[0]
