"""Additive (Bahdanau) soft attention over encoder regions, as in Show, Attend and Tell."""

from __future__ import annotations

import torch
from torch import nn


class SoftAttention(nn.Module):
    def __init__(self, enc_dim: int, dec_dim: int, att_dim: int):
        super().__init__()
        self.enc_att = nn.Linear(enc_dim, att_dim)  # applied once per batch: see project()
        self.dec_att = nn.Linear(dec_dim, att_dim)
        self.full_att = nn.Linear(att_dim, 1)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, P, enc_dim) -> (B, P, att_dim); independent of the step, so computed once."""
        return self.enc_att(feats)

    def forward(self, feats: torch.Tensor, enc_proj: torch.Tensor, h: torch.Tensor):
        """Context (B, enc_dim) and weights (B, P) for decoder state h (B, dec_dim)."""
        scores = self.full_att(torch.relu(enc_proj + self.dec_att(h).unsqueeze(1))).squeeze(2)
        # softmax in at least float32 (under autocast the scores may be half precision)
        alpha = torch.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(feats.dtype)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
        return context, alpha
