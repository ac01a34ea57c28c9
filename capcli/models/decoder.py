"""The decoder of Show, Attend and Tell (Xu et al. 2015), as the paper's captioner uses it.

At each step t, from the LSTM state (h, c) after the words so far:

1. soft attention over the image's regions: weights alpha_t = softmax(w . relu(W_e feats + W_h h))
   and the context, the alpha-weighted mean of the region features (:class:`SoftAttention`);
2. a gate on the context, sigmoid(f_beta(h)), which lets the model turn the image down for words
   like "a" and "of";
3. one LSTM step on [the word's embedding, the gated context];
4. scores for the next word from the new h, through dropout and a linear layer.

h and c start from the mean region feature, through one linear layer each. Training adds the
doubly stochastic penalty (each region's attention summed over the caption, pushed towards 1:
:mod:`capcli.models.loss`).

:meth:`Decoder.step` and the loop in :meth:`Decoder.forward` are the definition. With
``Decoder.fused`` (the default, see :mod:`capcli.models.fast`) the same computation runs fused:
training through :mod:`capcli.models.fast.recurrence`, decoding without gradients through
:mod:`capcli.models.fast.inference`; both are tested equal to this code.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from capcli.models import fast
from capcli.models.attention import SoftAttention
from capcli.models.fast import inference, recurrence


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
        self.fused = fast.enabled()  # False: the reference code below, step by step
        self._gate_table: torch.Tensor | None = None  # held inside derived_weights()

    def init_state(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = feats.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def step(self, tokens: torch.Tensor, feats: torch.Tensor, enc_proj: torch.Tensor,
             h: torch.Tensor, c: torch.Tensor):
        """One step: (h, c, alpha) after reading ``tokens`` (B,), with ``enc_proj`` =
        ``attention.project(feats)``."""
        context, alpha = self.attention(feats, enc_proj, h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([self.embedding(tokens), context], dim=1), (h, c))
        return h, c, alpha

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(h))

    def forward(self, feats: torch.Tensor, captions: torch.Tensor, tf_ratio: float = 1.0,
                enc_proj: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        """Scores for captions[:, 1:] given captions[:, :-1].

        Args:
            feats: (N, P, enc_dim) region features, one row per caption.
            captions: (N, T+1) token ids, <start> first, padded.
            tf_ratio: probability of feeding the ground-truth word at each step (1 = teacher
                forcing; below 1 the model's own argmax is fed back otherwise: scheduled
                sampling, or free-running at 0).
            enc_proj: ``attention.project(feats)`` if already computed.
            lengths: (N,) caption lengths counting <start> and <end>, when known: the fused code
                then runs each caption only for its own steps (what comes after them is padding,
                which the loss masks).
        Returns:
            logits (N, T, V) and attention weights (N, T, P).
        """
        if enc_proj is None:
            enc_proj = self.attention.project(feats)
        if self.fused:
            return recurrence.forward(self, feats, enc_proj, captions, tf_ratio, lengths, self._gate_table)
        h, c = self.init_state(feats)
        n, steps = captions.size(0), captions.size(1) - 1
        token = captions[:, 0]
        logits, alphas = [], []
        for t in range(steps):
            h, c, alpha = self.step(token, feats, enc_proj, h, c)
            scores = self.logits(h)
            logits.append(scores)
            alphas.append(alpha)
            token = captions[:, t + 1]
            if tf_ratio < 1.0:  # the model's own word where the draw says so (drawn at every step)
                predicted = scores.argmax(dim=-1)
                if tf_ratio <= 0.0:
                    token = predicted
                else:
                    token = torch.where(torch.rand(n, device=captions.device) < tf_ratio, token, predicted)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)

    def stepper(self, rows: int = 0, steps: int = 0):
        """The step that decoding without gradients (beam search, sampling) calls, for ``rows``
        sequences over up to ``steps`` steps: :meth:`step` itself, or with ``fused`` its fused
        form (:class:`capcli.models.fast.inference.InferenceStep`)."""
        if not self.fused:
            return self.step
        return inference.make_step(self, rows, steps, self._gate_table)

    @contextlib.contextmanager
    def derived_weights(self):
        """A block in which the weights do not change (an evaluation, a captioning run), so that
        what the fused code derives from them is made once for all its batches. (Weight version
        counters cannot tell: fused optimizers update in place without bumping them.)"""
        self._gate_table = inference.gate_table(self) if self.fused else None
        try:
            yield self
        finally:
            self._gate_table = None
