"""BatchNorm folded into the convolution before it, for a backbone that runs without gradients.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution
with scaled weights and a shifted bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``): one pass
over the activations fewer per convolution, which is most of an EfficientNet's inference time on
a CPU.

:func:`fold_batchnorm` returns a folded *copy*: the backbone itself keeps its weights, so
checkpoints, the feature cache's fingerprint and fine-tuning never see folded weights. Which
BatchNorm reads which convolution's output is found by running one image with hooks (a BatchNorm
whose input is the very tensor a convolution returned, each called once), and the copy is kept only
when it gives the backbone's output on that image (a convolution whose output also went elsewhere,
say a shortcut, would not). :class:`FoldedCopy` keeps one such copy up to date.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stands in for ``bn`` once folded: nothing for a plain BatchNorm, the activation (and
    drop) for timm's BatchNormAct2d; None for other kinds (left alone)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "act", None), nn.Module):
        return nn.Sequential(bn.drop, bn.act)
    return None


def conv_bn_pairs(backbone: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm, in eval mode with running
    statistics, reads the convolution's output directly; from one forward_features of ``probe``."""
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(_m, _inp, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                outputs[name] = out
            hooks.append(m.register_forward_hook(conv_hook))
        elif (isinstance(m, nn.BatchNorm2d) and _replacement(m) is not None
              and m.running_mean is not None and m.running_var is not None):
            def bn_hook(_m, inp, name=name):
                calls[name] = calls.get(name, 0) + 1
                inputs[name] = inp[0]
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        backbone.forward_features(probe)
    finally:
        for h in hooks:
            h.remove()
    by_output = {id(t): name for name, t in outputs.items() if calls[name] == 1}
    pairs = []
    for bn_name, t in inputs.items():
        conv_name = by_output.get(id(t))
        if conv_name is not None and calls[bn_name] == 1 and outputs[conv_name] is t:
            pairs.append((conv_name, bn_name))
    return pairs


def fold_batchnorm(backbone: nn.Module, probe: torch.Tensor, rtol: float = 1e-3) -> nn.Module | None:
    """A copy of ``backbone`` (in eval mode) with each BatchNorm folded into the convolution whose
    output it reads, or None when there is nothing to fold, the weights are not float32/float64,
    or the copy's ``forward_features(probe)`` differs from the backbone's by more than ``rtol`` of
    the output's largest magnitude. ``probe``: one input batch (an image is enough)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()):
        return None
    params = list(backbone.parameters())
    if not params or any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return None
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
        probe = probe.clone()
        was_training = backbone.training
        backbone.eval()
        try:
            pairs = conv_bn_pairs(backbone, probe)
            if not pairs:
                return None
            expected = backbone.forward_features(probe)
        finally:
            backbone.train(was_training)
        folded = copy.deepcopy(backbone).eval()
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            parent_name, _, child = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent_name), child, _replacement(bn))
        folded.requires_grad_(False)
        got = folded.forward_features(probe)
        if not isinstance(expected, torch.Tensor) or got.shape != expected.shape:
            return None
        tol = rtol * max(1.0, float(expected.abs().max()))
        if not bool(torch.isfinite(got).all()) or float((got - expected).abs().max()) > tol:
            return None
    return folded


class FoldedCopy:
    """The folded copy of one backbone (:func:`fold_batchnorm`), or the backbone itself where
    nothing folds: made on first use and again whenever the backbone's weights change or move
    (their version counters, data pointers and dtypes are its key). Held outside the module tree,
    so it has no state-dict keys and ``.to()`` does not move it."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._module: nn.Module | None = None

    def get(self, backbone: nn.Module, probe: torch.Tensor) -> nn.Module:
        tensors = [*backbone.parameters(), *backbone.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if self._module is None or self._key != key:
            self.clear()  # the old copy goes before a new one is made
            self._module, self._key = fold_batchnorm(backbone, probe[:1]) or backbone, key
        return self._module

    def clear(self) -> None:
        self._key = self._module = None
