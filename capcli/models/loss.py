"""What cross-entropy training optimises, and the teacher-forced numbers the paper reports.

:func:`caption_loss`: the cross-entropy of each next word over the real steps of each caption, plus
Show, Attend and Tell's doubly stochastic attention penalty: alpha_c * mean((1 - sum_t alpha_t)^2),
which asks every region to be attended, in total over the caption, about once.

:func:`xe_loss` runs a captioner over captions and returns the loss with the running sums
(:data:`XE_SUMS`) that training and evaluation add up; :func:`xe_summary` turns added-up sums into
the loss and top-5 accuracy they report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capcli.metrics import topk_hits

XE_SUMS = ("loss", "ce", "top5_hits", "tokens")  # token-weighted sums, added up over batches


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor,
                 lengths: torch.Tensor, alpha_c: float = 1.0, pad: int = 0):
    """Masked cross-entropy over real steps + doubly stochastic attention regularisation.

    Args:
        logits: (N, T, V); targets: (N, T) = captions[:, 1:]; alphas: (N, T, P);
        lengths: (N,) caption lengths including <start> and <end> (so T_real = lengths - 1).
    Returns:
        (total loss, cross-entropy, mask) where mask (N, T) marks the real steps.
    """
    steps = targets.size(1)
    mask = torch.arange(steps, device=targets.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    # padding steps are ignored rather than cut out: no boolean indexing (a copy of the logits on the
    # CPU, a host sync on a GPU); the mean over the kept steps is the same
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~mask, -100).flatten(),
                         ignore_index=-100)
    loss = ce
    if alpha_c:
        attended = (alphas.float() * mask.unsqueeze(2)).sum(dim=1)  # (N, P): total attention per region
        loss = loss + alpha_c * ((1.0 - attended) ** 2).mean()
    return loss, ce, mask


def xe_loss(model, feats: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, tf_ratio: float = 1.0,
            alpha_c: float = 1.0) -> dict:
    """The captioner ``model`` (:class:`capcli.models.captioner.CaptionModel`) on the captions
    (B, K, T+1) of B images with region features ``feats`` (B, P, C) and caption lengths (B, K),
    teacher-forced at ``tf_ratio``: ``loss`` (to back-propagate), ``sums`` (a float64 tensor of
    :data:`XE_SUMS` that stays on the device) and ``samples`` (caption-image pairs)."""
    b, k, length = captions.shape
    logits, alphas = model.decode_captions(feats, captions, tf_ratio, lengths)
    targets = captions.reshape(b * k, length)[:, 1:]
    loss, ce, mask = caption_loss(logits, targets, alphas, lengths.reshape(-1), alpha_c)
    hits, tokens = topk_hits(logits.detach().float(), targets, mask, k=5)
    sums = torch.stack([loss.detach() * tokens, ce.detach() * tokens, hits, tokens]).double()
    return {"loss": loss, "sums": sums, "samples": b * k}


def xe_summary(sums: list[float]) -> dict:
    """Added-up :data:`XE_SUMS` -> ``loss`` (with the attention penalty), ``ce`` (cross-entropy per
    word) and ``top5`` (top-5 accuracy of the next word)."""
    loss, ce, hits, tokens = sums
    n = max(tokens, 1.0)
    return {"loss": loss / n, "ce": ce / n, "top5": hits / n}
