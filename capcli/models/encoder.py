"""Image encoder: any timm backbone's ``forward_features``, pooled to a grid of region features.

Images enter as uint8 (or float in [0, 1]) RGB tensors; normalisation uses the mean and std of the
backbone's pretrained config (``timm.data.resolve_model_data_config``), so every path that feeds the
encoder (train, evaluate, caption, benchmark) preprocesses the same way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from capcli.errors import UserError
from capcli.models import fast
from capcli.models.fast import chunks
from capcli.models.fast.depthwise import speed_up_depthwise
from capcli.models.fast.fold import FoldedCopy


def check_encoder_names(names: list[str]) -> None:
    """UserError naming the first name that timm does not know, with close matches."""
    import difflib

    import timm

    known = None
    for name in names:
        if timm.is_model(name):
            continue
        known = known or timm.list_models()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `timm.list_models()` for names."
        raise UserError(f"unknown encoder {name!r}: not a timm model name.{hint}")


def _create_backbone(name: str, pretrained: bool | str) -> nn.Module:
    import timm

    check_encoder_names([name])
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if isinstance(pretrained, str) and pretrained not in ("true", "false"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained: weights file {path} does not exist; give a path to "
                            "a .safetensors/.pth file, true (hub) or false")
        overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
        try:
            return timm.create_model(name, pretrained=True, dynamic_img_size=True, **overlay, **kwargs)
        except TypeError:
            return timm.create_model(name, pretrained=True, **overlay, **kwargs)
    use_hub = pretrained is True or pretrained == "true"
    try:
        try:  # token models (ViT, ...) accept any image size only when asked to
            return timm.create_model(name, pretrained=use_hub, dynamic_img_size=True, **kwargs)
        except TypeError:
            return timm.create_model(name, pretrained=use_hub, **kwargs)
    except Exception as exc:  # network errors, missing hub weights
        if use_hub:
            raise UserError(f"could not load pretrained weights for {name!r} from the hub ({exc}); "
                            "use model.pretrained=false or model.pretrained=PATH") from exc
        raise


class Encoder(nn.Module):
    """timm backbone -> (B, grid*grid, C) region features.

    Args:
        name: timm model name (e.g. ``convnext_tiny``).
        pretrained: ``True`` for hub weights, ``False`` for random init, or a path to a local file.
        grid: side of the adaptive-average-pooled feature grid (7 like the paper: 49 regions).
        finetune: train the backbone (``False`` freezes it and keeps it in eval mode).
        finetune_stages: with ``finetune``, train only the last N stages (0 = all of them).
        image_size: resize inputs to this size before the backbone (``None`` keeps the input size).
        feature_norm: a learnable LayerNorm over the region features (ConvNeXt's ``forward_features``
            ends before its final norm, so raw features drift in scale while the encoder trains).
        channels_last: run the backbone in channels_last memory format: ``"auto"`` does so for
            convnets (faster convolutions with oneDNN on the CPU and tensor cores on CUDA; token
            models gain nothing).
    """

    def __init__(self, name: str, pretrained: bool | str = False, grid: int = 7,
                 finetune: bool = True, finetune_stages: int = 0, image_size: int | None = None,
                 feature_norm: bool = True, channels_last: bool | str = "auto"):
        super().__init__()
        from timm.data import resolve_model_data_config

        self.name = name
        self.backbone = _create_backbone(name, pretrained)
        self.fast = fast.enabled()  # False: the backbone runs as timm made it (see capcli.models.fast)
        if self.fast:
            speed_up_depthwise(self.backbone)  # a faster weight gradient on small maps (CPU, fine-tuning)
        # what the fast inference path keeps (plain attributes: no state-dict keys, not moved by .to())
        self._folded, self._chunks, self._derived_depth = FoldedCopy(), chunks.ChunkSizer(), 0
        data_cfg = resolve_model_data_config(self.backbone)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.grid = grid
        self.image_size = image_size
        self.out_dim = int(self.backbone.num_features)
        self.feature_norm = nn.LayerNorm(self.out_dim) if feature_norm else nn.Identity()
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.finetune = finetune
        self.set_trainable(finetune, finetune_stages)
        if channels_last == "auto":  # a convnet has more than a patch-embedding convolution
            channels_last = sum(isinstance(m, nn.Conv2d) for m in self.backbone.modules()) > 1
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    # timm's classifier parts: never used by forward_features, so never trained here (DDP also
    # refuses parameters that get no gradient). pre_logits is VGG's fc6/fc7 (120M parameters).
    HEAD_PREFIXES = ("head.", "fc_norm.", "global_pool.", "classifier.", "fc.", "pre_logits.")

    def _head_prefixes(self) -> tuple[str, ...]:
        # MobileNetV3 runs conv_head after pooling, in forward_head (EfficientNet, in forward_features)
        if type(self.backbone).__name__ == "MobileNetV3":
            return self.HEAD_PREFIXES + ("conv_head.", "norm_head.")
        return self.HEAD_PREFIXES

    def set_trainable(self, finetune: bool, stages: int = 0) -> None:
        """Freeze the backbone (``finetune=False``), or train it: all of it, or its last ``stages``."""
        self.finetune = finetune
        self.train(self.training)  # a frozen backbone stays in eval mode
        for p in self.backbone.parameters():
            p.requires_grad = False
        if not finetune:
            return
        blocks = getattr(self.backbone, "stages", None) or getattr(self.backbone, "blocks", None)
        if stages <= 0 or blocks is None:
            for name, p in self.backbone.named_parameters():
                p.requires_grad = not name.startswith(self._head_prefixes())
            return
        for block in list(blocks)[-stages:]:
            for p in block.parameters():
                p.requires_grad = True
        for attr in ("norm_pre", "norm"):  # final norms sit after the last stage
            mod = getattr(self.backbone, attr, None)
            if isinstance(mod, nn.Module):
                for p in mod.parameters():
                    p.requires_grad = True

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen: no dropout/drop-path, no running-stat updates
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (B, 3, H, W) -> normalised float, resized if image_size is set."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def regions(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled region features (B, P, C), before the feature norm: what a
        frozen encoder's feature cache stores."""
        x = self.normalize(images)
        grad = torch.is_grad_enabled() and self.finetune
        with torch.set_grad_enabled(grad):
            if grad or self.backbone.training or not self.fast:
                return self._pooled(self.backbone.forward_features(x))
            # without gradients in eval mode: BatchNorm folded, a CPU's batch in chunks
            return self._pooled(chunks.forward_features(self._inference_backbone(x), x, self._chunks))

    def _inference_backbone(self, x: torch.Tensor) -> nn.Module:
        """The backbone with its BatchNorms folded (a copy: :mod:`capcli.models.fast.fold`). A
        backbone with trainable weights runs folded only inside :meth:`derived_weights`: a fused
        optimizer updates weights in place without bumping their version counters, so a copy kept
        between a fine-tuning run's validations could be stale."""
        if self._derived_depth == 0 and any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone
        return self._folded.get(self.backbone, x)

    @contextlib.contextmanager
    def derived_weights(self):
        """A block in which the backbone's weights do not change (an evaluation, a captioning run):
        a backbone being fine-tuned may then run folded too, from a copy made afresh for the block."""
        trainable = any(p.requires_grad for p in self.backbone.parameters())
        outermost = self._derived_depth == 0
        if trainable and outermost:
            self._folded.clear()
        self._derived_depth += 1
        try:
            yield self
        finally:
            self._derived_depth -= 1
            if trainable and outermost:
                self._folded.clear()

    def _pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> (B, P, C) region features."""
        if feats.dim() == 4:  # (B, C, H, W): convnets
            if self.grid:
                feats = F.adaptive_avg_pool2d(feats, self.grid)
            return feats.flatten(2).transpose(1, 2)
        # (B, N, C) token models (ViT and friends): drop class/register tokens
        return feats[:, self.num_prefix_tokens:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_norm(self.regions(images))

    @torch.inference_mode()
    def check_grid(self, image_size: int) -> None:
        """A UserError when ``grid`` asks for more regions than the backbone's feature map has at
        ``image_size`` px (pooling would only repeat features); one small forward to find out."""
        if not self.grid:
            return
        param = next(self.backbone.parameters())
        size = self.image_size or image_size
        x = torch.zeros(1, 3, size, size, device=param.device)
        was = self.backbone.training
        self.backbone.eval()
        try:
            feats = self.backbone.forward_features(self.normalize(x))
        finally:
            self.backbone.train(was)
        if feats.dim() != 4:  # token models: no grid pooling
            return
        h, w = feats.shape[-2:]
        if self.grid > min(h, w):
            raise UserError(f"model.grid={self.grid} is larger than {self.name}'s {h}x{w} feature map at {size} px; "
                            f"use model.grid<={min(h, w)}, larger images (prepare --size) or model.image_size")
