"""Greedy and batched beam search over the decoder: pure tensor code, no Python loop over images.

A beam that emits <end> is frozen (it can only continue with <pad> at no cost) and keeps its slot;
beams still open after ``max_length`` words are closed there at no cost (truncated), so a caption
is always produced and never exceeds ``max_length`` words.
Greedy decoding is beam search with ``beam_size=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.models.decoder import Decoder


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # best caption per image, word ids without <start>/<end>/<pad>
    scores: torch.Tensor  # (B,) log-probability of each best caption (length-normalised if asked)
    alphas: torch.Tensor | None  # (B, T, P) attention of the best beam per step, when asked


@torch.inference_mode()
def beam_search(decoder: Decoder, feats: torch.Tensor, *, start: int, end: int, pad: int = 0,
                beam_size: int = 3, max_length: int = 50, length_penalty: float = 0.0,
                return_alphas: bool = False) -> DecodeResult:
    """Decode a batch of images.

    Args:
        feats: (B, P, E) encoder features.
        max_length: most words per caption (the <end> token comes on top).
        length_penalty: final scores are divided by length ** length_penalty (0 = raw log-prob).
    """
    b, p, _ = feats.shape
    k = beam_size
    v = decoder.vocab_size
    device = feats.device
    proj = decoder.attention.project(feats).repeat_interleave(k, dim=0)
    h, c = decoder.init_state(feats)
    h, c = h.repeat_interleave(k, dim=0), c.repeat_interleave(k, dim=0)
    feats_k = feats.repeat_interleave(k, dim=0)

    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand the first one only
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    seqs = torch.empty(b, k, 0, dtype=torch.long, device=device)
    alphas = torch.empty(b, k, 0, p, device=device) if return_alphas else None
    frozen = torch.full((v,), float("-inf"), device=device)
    frozen[pad] = 0.0  # a finished beam may only add <pad>, at no cost
    cut = torch.full((v,), float("-inf"), device=device)
    cut[end] = 0.0  # at the length limit an open beam is closed, at no cost (truncation)
    tokens = torch.full((b * k,), start, dtype=torch.long, device=device)
    offsets = (torch.arange(b, device=device) * k).unsqueeze(1)

    for t in range(max_length + 1):
        h, c, alpha = decoder.step(tokens, feats_k, proj, h, c)
        if t == max_length:
            logp = cut.expand(b, k, v)
        else:
            logits = decoder.logits(h).float()
            logits[:, [pad, start]] = float("-inf")  # an open caption never emits <pad>/<start>
            logp = torch.log_softmax(logits, dim=-1).view(b, k, v)
        logp = torch.where(finished.unsqueeze(2), frozen, logp)
        top, idx = (scores.unsqueeze(2) + logp).view(b, k * v).topk(k, dim=1)
        beam = torch.div(idx, v, rounding_mode="floor")  # integer division (never float indices)
        token = idx % v
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(2).expand(-1, -1, seqs.size(2))),
                          token.unsqueeze(2)], dim=2)
        if alphas is not None:
            prev = alphas.gather(1, beam[:, :, None, None].expand(-1, -1, alphas.size(2), p))
            step_alpha = alpha.view(b, k, p).gather(1, beam.unsqueeze(2).expand(-1, -1, p))
            alphas = torch.cat([prev, step_alpha.unsqueeze(2).float()], dim=2)
        finished = finished.gather(1, beam) | (token == end)
        scores = top
        flat = (beam + offsets).view(-1)
        h, c = h[flat], c[flat]
        tokens = token.view(-1)
        if bool(finished.all()):
            break

    words = (seqs != end) & (seqs != pad)
    lengths = words.sum(dim=2)
    final = scores
    if length_penalty:
        final = scores / (lengths.clamp(min=1).float() + finished.float()) ** length_penalty
    final = torch.where(torch.isfinite(final), final, torch.full_like(final, -1e30))
    best = final.argmax(dim=1)
    best_seqs = seqs[torch.arange(b, device=device), best].tolist()
    out_tokens = []
    for s in best_seqs:
        caption = []
        for t in s:
            if t == end:
                break
            if t != pad:
                caption.append(t)
        out_tokens.append(caption)
    best_alphas = alphas[torch.arange(b, device=device), best] if alphas is not None else None
    return DecodeResult(out_tokens, final[torch.arange(b, device=device), best], best_alphas)


def greedy(decoder: Decoder, feats: torch.Tensor, *, start: int, end: int, pad: int = 0,
           max_length: int = 50, return_alphas: bool = False) -> DecodeResult:
    return beam_search(decoder, feats, start=start, end=end, pad=pad, beam_size=1,
                       max_length=max_length, return_alphas=return_alphas)
