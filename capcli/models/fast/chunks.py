"""A CPU encodes a batch a few images at a time, when it runs a backbone without gradients
(feature caches, evaluation, captioning).

A few images' activations stay near the cores, where a whole batch's go to main memory; single
images starve the matrix products. A chunk holds at most :data:`CPU_CHUNK` images, and no more
than keep its largest activation under :data:`CPU_CHUNK_BYTES`: glibc serves bigger blocks with
fresh mmaps however it is tuned (:mod:`capcli.allocator`), page-faulted in at every layer. The
sizes chosen and what they gain are in docs/performance.md. Training never splits a batch
(BatchNorm's batch statistics see the whole batch).
"""

from __future__ import annotations

import torch
from torch import nn

from capcli.runtime import active_autocast_dtype

CPU_CHUNK = 8  # most images per backbone call
CPU_CHUNK_BYTES = 28 << 20  # largest activation of a chunk


class ChunkSizer:
    """Images per backbone call for inputs shaped like ``x`` on a CPU: found once per input shape
    and precision by running one image with hooks on every module and noting the largest output."""

    def __init__(self, most: int = CPU_CHUNK, max_bytes: int = CPU_CHUNK_BYTES):
        self.most, self.max_bytes = most, max_bytes
        self._sizes: dict[tuple, int] = {}

    def __call__(self, backbone: nn.Module, x: torch.Tensor) -> int:
        key = (tuple(x.shape[1:]), x.dtype, active_autocast_dtype("cpu"), self.most, self.max_bytes)
        if key not in self._sizes:
            biggest = 0

            def note(_module, _inputs, out):
                nonlocal biggest
                if isinstance(out, torch.Tensor):
                    biggest = max(biggest, out.numel() * out.element_size())

            hooks = [m.register_forward_hook(note) for m in backbone.modules()]
            try:
                with torch.no_grad():
                    backbone.forward_features(x[:1])
            finally:
                for h in hooks:
                    h.remove()
            self._sizes[key] = max(1, min(self.most, self.max_bytes // max(1, biggest)))
        return self._sizes[key]


def forward_features(backbone: nn.Module, x: torch.Tensor, sizer: ChunkSizer) -> torch.Tensor:
    """``backbone.forward_features(x)``, in chunks of ``sizer``'s size on a CPU (whole elsewhere)."""
    if x.device.type == "cpu" and x.size(0) > 1:
        chunk = sizer(backbone, x)
        if x.size(0) > chunk:
            return torch.cat([backbone.forward_features(part) for part in x.split(chunk)])
    return backbone.forward_features(x)
