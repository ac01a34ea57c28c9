"""Depthwise convolutions with a faster weight gradient on small feature maps on a CPU.

ConvNeXt's last stage runs 7x7 depthwise convolutions on a 7x7 map (224 px input). There, torch's
CPU (oneDNN, channels_last) kernel for the weight gradient is several times slower than the same
sums written as one shifted product-sum per kernel offset over the channels-last tensors
(docs/performance.md has the numbers). Larger maps keep torch's kernel (it wins there). Forward
passes and the input gradient are torch's own everywhere.

:func:`speed_up_depthwise` switches a backbone's depthwise ``nn.Conv2d`` modules to
:class:`DepthwiseConv2d`, which keeps their parameters and state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _shifted_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int],
                         padding: tuple[int, int]) -> torch.Tensor:
    """d loss / d weight (C, 1, kh, kw) of a stride-1 depthwise convolution, as one product-sum
    over (batch, rows, columns) per kernel offset, on channels-last views (C innermost)."""
    (kh, kw), (ph, pw) = kernel, padding
    b, c, h, w = grad.shape
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (B, H + 2ph, W + 2pw, C)
    g = grad.permute(0, 2, 3, 1)  # (B, H, W, C)
    out = grad.new_empty(kh, kw, c)
    tmp = grad.new_empty(b, h, w, c)
    for i in range(kh):
        for j in range(kw):
            torch.mul(xp[:, i:i + h, j:j + w], g, out=tmp)
            torch.sum(tmp.view(-1, c), 0, out=out[i, j])
    return out.permute(2, 0, 1).unsqueeze(1).contiguous()


class _Depthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, 1, padding, 1, x.size(1))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        kernel, padding = tuple(weight.shape[2:]), ctx.padding
        small = grad.size(2) <= kernel[0] and grad.size(3) <= kernel[1]  # the map fits in the kernel
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], x.size(1),
            [need_x, need_w and not small, False])
        if need_w and small:
            gw = _shifted_weight_grad(x, grad, kernel, padding)
        gb = grad.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, None


class DepthwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (stride 1, no dilation, zero padding, one filter per channel) whose
    backward on a CPU in float32 goes through :class:`_Depthwise`; elsewhere it is nn.Conv2d."""

    def _conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad
                and input.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            return _Depthwise.apply(input, weight, bias, tuple(self.padding))
        return super()._conv_forward(input, weight, bias)


def is_plain_depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.groups > 1
            and m.stride == (1, 1) and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple))


def speed_up_depthwise(module: nn.Module) -> int:
    """Switch every plain depthwise ``nn.Conv2d`` inside ``module`` to :class:`DepthwiseConv2d`
    (same parameters); returns how many."""
    n = 0
    for m in module.modules():
        if is_plain_depthwise(m):
            m.__class__ = DepthwiseConv2d
            n += 1
    return n
