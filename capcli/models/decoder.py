"""Show-Attend-Tell LSTM decoder: soft attention, a sigmoid gate on the context, h/c initialised
from the mean region feature, dropout before the vocabulary projection.

Teacher forcing (ratio 1) runs the LSTM step by step and the vocabulary projection over all steps
at once; a ratio below 1 (free-running or scheduled sampling) feeds back the model's own argmax with
probability 1 - ratio, which needs the projection at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capcli.models.attention import SoftAttention


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, enc_dim: int, emb_dim: int = 512, att_dim: int = 512,
                 dec_dim: int = 512, dropout: float = 0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.enc_dim, self.dec_dim = enc_dim, dec_dim
        self.attention = SoftAttention(enc_dim, dec_dim, att_dim)
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.lstm = nn.LSTMCell(emb_dim + enc_dim, dec_dim)
        self.init_h = nn.Linear(enc_dim, dec_dim)
        self.init_c = nn.Linear(enc_dim, dec_dim)
        self.f_beta = nn.Linear(dec_dim, enc_dim)  # gate on the attended context
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dec_dim, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def init_state(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = feats.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def step(self, tokens: torch.Tensor, feats: torch.Tensor, enc_proj: torch.Tensor,
             h: torch.Tensor, c: torch.Tensor):
        """One LSTM step: (h, c, alpha) after reading ``tokens`` (B,)."""
        context, alpha = self.attention(feats, enc_proj, h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([self.embedding(tokens), context], dim=1), (h, c))
        return h, c, alpha

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(h))

    def forward(self, feats: torch.Tensor, captions: torch.Tensor, tf_ratio: float = 1.0,
                enc_proj: torch.Tensor | None = None):
        """Scores for captions[:, 1:] given captions[:, :-1].

        Args:
            feats: (N, P, enc_dim) region features, one row per caption.
            captions: (N, T+1) token ids, <start> first, padded.
            tf_ratio: probability of feeding the ground-truth token (1 = teacher forcing).
            enc_proj: ``attention.project(feats)`` if already computed.
        Returns:
            logits (N, T, V) and attention weights (N, T, P).
        """
        if enc_proj is None:
            enc_proj = self.attention.project(feats)
        n, steps = captions.size(0), captions.size(1) - 1
        h, c = self.init_state(feats)
        hs, alphas, step_logits = [], [], []
        token = captions[:, 0]
        for t in range(steps):
            h, c, alpha = self.step(token, feats, enc_proj, h, c)
            alphas.append(alpha)
            if tf_ratio >= 1.0:
                hs.append(h)
                token = captions[:, t + 1]
                continue
            logit = self.logits(h)
            step_logits.append(logit)
            predicted = logit.argmax(dim=-1)
            if tf_ratio <= 0.0:
                token = predicted
            else:
                use_truth = torch.rand(n, device=captions.device) < tf_ratio
                token = torch.where(use_truth, captions[:, t + 1], predicted)
        if tf_ratio >= 1.0:
            logits = self.logits(torch.stack(hs, dim=1))  # one projection over all steps
        else:
            logits = torch.stack(step_logits, dim=1)
        return logits, torch.stack(alphas, dim=1)


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
    ce = F.cross_entropy(logits.float()[mask], targets[mask])
    loss = ce
    if alpha_c:
        attended = (alphas.float() * mask.unsqueeze(2)).sum(dim=1)  # (N, P): total attention per region
        loss = loss + alpha_c * ((1.0 - attended) ** 2).mean()
    return loss, ce, mask
