"""Training objectives: what a step optimises, as a module the trainer calls on each batch.

An objective wraps the captioner (so DDP wraps the objective and sees every parameter it trains)
and maps ``(batch, tf_ratio)`` to a dict:

- ``loss``: the scalar to back-propagate;
- ``sums``: a 1-D float64 tensor of running sums (named by ``sum_names``) that stays on the device
  and is added up over steps; the trainer reads it only when it reports;
- ``samples``: how many caption-image pairs (or sampled captions) the step trained on.

``summary(sums)`` turns added-up sums into the numbers logged (``loss``, ``top5``, ...), so the
training loop never needs to know which objective it runs.
"""

from __future__ import annotations

import torch
from torch import nn

from capcli.metrics import topk_hits
from capcli.models.decoder import caption_loss


class XEObjective(nn.Module):
    """Cross-entropy of each next word plus the doubly stochastic attention penalty (Show, Attend
    and Tell, weight ``alpha_c``), with teacher forcing at ``tf_ratio``. Also gives the
    teacher-forced loss and top-5 accuracy that evaluation reports (``tf_ratio`` = 1)."""

    name = "xe"
    sum_names = ("loss", "ce", "top5_hits", "tokens")

    def __init__(self, model: nn.Module, alpha_c: float = 1.0):
        super().__init__()
        self.model = model
        self.alpha_c = alpha_c

    def forward(self, batch: dict, tf_ratio: float = 1.0, feats: torch.Tensor | None = None) -> dict:
        """``batch``: ``captions`` (B, K, T+1), ``lengths`` (B, K) and ``images`` or ``regions``;
        ``feats``: the batch's region features when already computed (evaluation)."""
        if feats is None:
            feats = self.model.features(batch.get("images"), batch.get("regions"))
        captions = batch["captions"]
        b, k, length = captions.shape
        logits, alphas = self.model.decode_captions(feats, captions, tf_ratio)
        targets = captions.reshape(b * k, length)[:, 1:]
        loss, ce, mask = caption_loss(logits, targets, alphas, batch["lengths"].reshape(-1), self.alpha_c)
        hits, tokens = topk_hits(logits.detach().float(), targets, mask, k=5)
        sums = torch.stack([loss.detach() * tokens, ce.detach() * tokens, hits, tokens]).double()
        return {"loss": loss, "sums": sums, "samples": b * k}

    @staticmethod
    def summary(sums: list[float]) -> dict:
        loss, ce, hits, tokens = sums
        n = max(tokens, 1.0)
        return {"loss": loss / n, "ce": ce / n, "top5": hits / n}


def build_objective(cfg, model: nn.Module, train_set=None) -> nn.Module:
    """The objective ``cfg.train.objective`` names, around ``model``."""
    if cfg.train.objective == "xe":
        return XEObjective(model, cfg.train.alpha_c)
    raise ValueError(f"unknown objective {cfg.train.objective!r}")  # config validation lists them


class TrainStep:
    """One optimisation step, the same for training and `capcli benchmark train`: the objective
    under autocast, backward (scaled for fp16), gradient clipping by value, the optimizer step.

    ``task`` is the objective, or its DDP wrapper; ``params`` the parameters that are clipped.
    """

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0):
        self.task, self.optimizer, self.scaler = task, optimizer, scaler
        self.device, self.amp_dtype, self.grad_clip = device, amp_dtype, grad_clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, batch: dict, tf_ratio: float = 1.0) -> dict:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.task(batch, tf_ratio)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out
