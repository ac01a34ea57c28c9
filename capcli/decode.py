"""Decoding: how a trained captioner turns region features into words, in one place.

:class:`DecodeOptions` holds every decoding setting (beam size, length, n-gram blocking, sampling,
precision); :func:`generate` is the one predictor, images in, captions out, used by the Python
API, ``capcli caption``, ``capcli evaluate`` and validation inside training.

:func:`beam_search` decodes a batch with batched beams, no Python loop over images. A beam that
emits <end> is frozen (it can only continue with <pad> at no cost) and keeps its slot; beams still
open after ``max_length`` words are closed there at no cost (truncated), so a caption is always
produced and never exceeds ``max_length`` words. ``block_ngrams=N`` forbids any word that would
repeat an N-gram already in the caption. Greedy decoding is beam search with ``beam_size=1``.
:func:`sample` draws captions from the model's distribution (temperature, top-k), as self-critical
training and varied captions need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capcli.runtime import autocast
from capcli.text import BLOCK_NGRAMS, DANGLING_EN

# Images decoded at once when the user gives no batch size. A GPU's beam search is bound by
# launching its small per-word kernels, so its throughput grows with the batch; a CPU's products
# are saturated by 32 (docs/performance.md).
DEFAULT_BATCH = {"cpu": 32, "cuda": 128}


def default_batch_size(device: torch.device | str) -> int:
    """Images per decoding batch on ``device`` when none is given (:data:`DEFAULT_BATCH`)."""
    return DEFAULT_BATCH.get(torch.device(device).type, 32)


@dataclass(frozen=True)
class DecodeOptions:
    """Every setting of a decode. ``max_length`` None means the model's own (the longest caption
    of its training data); the callers that know the model resolve it (:meth:`resolved`)."""

    beam_size: int = 3  # 1 = greedy
    max_length: int | None = None  # most words per caption (<end> comes on top)
    length_penalty: float = 0.0  # beam scores divided by length ** length_penalty (0 = raw log-prob)
    block_ngrams: int = BLOCK_NGRAMS  # N > 0: never repeat an N-gram within a caption (0 = off)
    sample: bool = False  # draw captions from the model instead of beam search
    temperature: float = 1.0  # sampling: below 1 safer, above 1 more varied
    top_k: int = 0  # sampling: draw among the k likeliest words only (0 = all)
    seed: int | None = None  # sampling: the same seed draws the same captions
    allow_unk: bool = False  # emit <unk> (the words outside the vocabulary) where the model puts it
    dangling: tuple[str, ...] = DANGLING_EN  # words a caption may not end on (unless cut at max_length)
    amp_dtype: torch.dtype | None = None  # products under autocast at this dtype (None = full precision)

    def resolved(self, max_length: int) -> "DecodeOptions":
        """These options with ``max_length`` filled in where it was left to the model."""
        return self if self.max_length else dataclasses.replace(self, max_length=max_length)

    def generator(self, device: torch.device, rank: int = 0) -> torch.Generator | None:
        """The random source of a sampling run (one per run, not per batch): seeded with ``seed``
        (plus the torchrun rank, so that ranks draw differently), or None for torch's global RNG."""
        if not self.sample or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed + rank)


@torch.inference_mode()
def generate(model, vocab, images: torch.Tensor, options: DecodeOptions, *, return_alphas: bool = False,
             generator: torch.Generator | None = None):
    """Captions (strings) for a batch of uint8 images (B, 3, S, S), with the :class:`DecodeResult`.
    ``options.max_length`` must be resolved."""
    with autocast(images.device, options.amp_dtype):
        feats = model.encode(images)
    return decode_features(model, vocab, feats, options, return_alphas=return_alphas, generator=generator)


def decode_features(model, vocab, feats: torch.Tensor, options: DecodeOptions, *, return_alphas: bool = False,
                    generator: torch.Generator | None = None):
    """Captions (strings) and the :class:`DecodeResult` for region features (B, P, C): beam search,
    or with ``options.sample`` one caption drawn from the model. The decoder's products run under
    autocast at ``options.amp_dtype`` (scores stay float32)."""
    amp = options.amp_dtype
    with autocast(feats.device, amp):
        feats = feats if amp is not None else feats.float()
        specials = {"start": vocab.start, "end": vocab.end, "pad": vocab.pad, **word_constraints(vocab, options)}
        if options.sample:
            s = sample(model.decoder, feats, max_length=options.max_length, temperature=options.temperature,
                       top_k=options.top_k, generator=generator, **specials)
            tokens = [[t for t in row if t not in (vocab.pad, vocab.end)] for row in s.tokens.tolist()]
            return [vocab.decode(t) for t in tokens], DecodeResult(tokens, torch.zeros(len(tokens)), None)
        result = beam_search(model.decoder, feats, beam_size=options.beam_size, max_length=options.max_length,
                             length_penalty=options.length_penalty, block_ngrams=options.block_ngrams,
                             return_alphas=return_alphas, **specials)
        return [vocab.decode(t) for t in result.tokens], result


def word_constraints(vocab, options: DecodeOptions) -> dict:
    """``banned`` and ``dangling`` word ids of ``options`` in ``vocab`` (words it lacks are skipped)."""
    return {"banned": () if options.allow_unk else (vocab.unk,),
            "dangling": tuple(sorted({vocab.stoi[w] for w in options.dangling if w in vocab.stoi}))}


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # best caption per image, word ids without <start>/<end>/<pad>
    scores: torch.Tensor  # (B,) log-probability of each best caption (length-normalised if asked)
    alphas: torch.Tensor | None  # (B, T, P) attention of the best beam per step, when asked


@torch.inference_mode()
def beam_search(decoder, feats: torch.Tensor, *, start: int, end: int, pad: int = 0,
                beam_size: int = 3, max_length: int = 50, length_penalty: float = 0.0,
                block_ngrams: int = 0, return_alphas: bool = False, banned: Sequence[int] = (),
                dangling: Sequence[int] = ()) -> DecodeResult:
    """Decode a batch of images.

    Args:
        feats: (B, P, E) encoder features.
        max_length: most words per caption (the <end> token comes on top).
        length_penalty: final scores are divided by length ** length_penalty (0 = raw log-prob).
        block_ngrams: N > 0 forbids a word that would repeat an N-gram of the caption so far.
        banned: words never emitted (beside <pad> and <start>), e.g. <unk>.
        dangling: words a caption may not end on (<end> cannot follow them), unless it reaches
            ``max_length`` there.
    """
    b, p, _ = feats.shape
    k = beam_size
    v = decoder.vocab_size
    device = feats.device
    step = _stepper(decoder, b * k, max_length + 1)
    proj = decoder.attention.project(feats)
    h, c = decoder.init_state(feats)
    grouped = getattr(step, "grouped", False)
    frozen = torch.full((v,), float("-inf"), device=device)
    frozen[pad] = 0.0  # a finished beam may only add <pad>, at no cost
    cut = torch.full((v,), float("-inf"), device=device)
    cut[end] = 0.0  # at the length limit an open beam is closed, at no cost (truncation)
    ban = torch.tensor(sorted({pad, start, *banned}), device=device)  # never emitted by an open caption
    no_end = _word_mask(dangling, v, device)

    def word_logp(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        # index_fill_ with an index already on the device: a list index would be copied from
        # host memory at every step (a synchronising copy on a GPU)
        logits = decoder.logits(h).float().index_fill_(1, ban, float("-inf"))
        if no_end is not None:
            logits[:, end].masked_fill_(no_end[prev], float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    first = 0
    if grouped and 1 < k <= v and max_length > 0:
        # all beams start identical: the first word is chosen from one row per image, and its k
        # likeliest words start the k beams (what expanding only the first beam gives)
        first_words = torch.full((b,), start, dtype=torch.long, device=device)
        h, c, alpha = step(first_words, feats, proj, h, c)
        scores, token = word_logp(h, first_words).topk(k, dim=1)
        finished = token == end
        seqs = token.unsqueeze(2)
        alphas = alpha.float()[:, None, None, :].expand(b, k, 1, p).contiguous() if return_alphas else None
        tokens = token.view(-1)
        first = 1
    else:
        if not grouped:  # a plain step wants the features once per beam
            feats, proj = feats.repeat_interleave(k, dim=0), proj.repeat_interleave(k, dim=0)
        scores = torch.zeros(b, k, device=device)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand the first one only
        finished = torch.zeros(b, k, dtype=torch.bool, device=device)
        seqs = torch.empty(b, k, 0, dtype=torch.long, device=device)
        alphas = torch.empty(b, k, 0, p, device=device) if return_alphas else None
        tokens = torch.full((b * k,), start, dtype=torch.long, device=device)
    h, c = h.repeat_interleave(k, dim=0), c.repeat_interleave(k, dim=0)
    offsets = (torch.arange(b, device=device) * k).unsqueeze(1)
    # Images whose beams have all ended leave the batch (their beams would only add <pad> at no
    # cost): ``images`` maps the rows still decoding to the batch, ``done`` keeps the others.
    images = torch.arange(b, device=device)
    done: list[tuple] = []
    n = b  # images still decoding

    for t in range(first, max_length + 1):
        h, c, alpha = step(tokens, feats, proj, h, c)
        if t == max_length:
            logp = cut.expand(n, k, v)
        else:
            logp = word_logp(h, tokens)
            if block_ngrams and seqs.size(2) >= block_ngrams:
                logp = logp.masked_fill(repeated_ngram(seqs.view(n * k, -1), block_ngrams, v), float("-inf"))
            logp = logp.view(n, k, v)
        logp = torch.where(finished.unsqueeze(2), frozen, logp)
        top, idx = (scores.unsqueeze(2) + logp).view(n, k * v).topk(k, dim=1)
        beam = torch.div(idx, v, rounding_mode="floor")  # integer division (never float indices)
        token = idx % v
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(2).expand(-1, -1, seqs.size(2))),
                          token.unsqueeze(2)], dim=2)
        if alphas is not None:
            prev = alphas.gather(1, beam[:, :, None, None].expand(-1, -1, alphas.size(2), p))
            step_alpha = alpha.view(n, k, p).gather(1, beam.unsqueeze(2).expand(-1, -1, p))
            alphas = torch.cat([prev, step_alpha.unsqueeze(2).float()], dim=2)
        finished = finished.gather(1, beam) | (token == end)
        scores = top
        flat = (beam + offsets).view(-1)
        h, c = h[flat], c[flat]
        tokens = token.view(-1)
        ended = finished.all(dim=1)
        n_ended = int(ended.sum())  # the step's one host sync, as the all-finished test was
        if n_ended == n:
            break
        if COMPACT_FRACTION and t < max_length and n_ended >= max(1, n // COMPACT_FRACTION):
            gone, keep = ended.nonzero().squeeze(1), (~ended).nonzero().squeeze(1)
            done.append((images[gone], seqs[gone], scores[gone], finished[gone],
                         alphas[gone] if alphas is not None else None))
            rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            images, seqs, scores, finished = images[keep], seqs[keep], scores[keep], finished[keep]
            alphas = alphas[keep] if alphas is not None else None
            h, c, tokens = h[rows], c[rows], tokens[rows]
            feats, proj = (feats[keep], proj[keep]) if grouped else (feats[rows], proj[rows])
            n = keep.numel()
            offsets = offsets[:n]
    if done:
        seqs, scores, finished, alphas = _reassemble(done + [(images, seqs, scores, finished, alphas)], b, pad)

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


# Images whose beams have all ended leave the batch once they are at least 1/COMPACT_FRACTION of it
# (each compaction copies the rest's features and states once); 0 = never.
COMPACT_FRACTION = 8


def _reassemble(parts: list[tuple], b: int, pad: int):
    """Batch-ordered (seqs, scores, finished, alphas) from the parts that left the beam search at
    different steps: (image indices, seqs, scores, finished, alphas), shorter seqs padded with
    <pad> (what their ended beams would have added, at no cost) and alphas with zeros."""
    _, seqs, scores, _, alphas = parts[-1]
    k, length = seqs.shape[1:]
    all_seqs = seqs.new_full((b, k, length), pad)
    all_scores = scores.new_empty(b, k)
    all_finished = torch.empty(b, k, dtype=torch.bool, device=seqs.device)
    all_alphas = alphas.new_zeros(b, k, length, alphas.size(3)) if alphas is not None else None
    for images, s, sc, f, a in parts:
        all_seqs[images, :, : s.size(2)] = s
        all_scores[images] = sc
        all_finished[images] = f
        if a is not None:
            all_alphas[images, :, : a.size(2)] = a
    return all_seqs, all_scores, all_finished, all_alphas


def _stepper(decoder, rows: int, steps: int):
    """The step to decode ``rows`` sequences over up to ``steps`` steps: the decoder's
    ``stepper`` (:meth:`capcli.models.decoder.Decoder.stepper`), or its ``step`` for a decoder that
    has no other (any object with ``init_state``, ``step``, ``logits`` and ``attention.project``)."""
    make = getattr(decoder, "stepper", None)
    return make(rows, steps) if make is not None else decoder.step


def repeated_ngram(seqs: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(N, V) bool: the words that would repeat an ``n``-gram already in each row of ``seqs`` (N, L)
    if appended (its last n-1 words followed by the word occur earlier in the row)."""
    windows = seqs.unfold(1, n, 1)  # (N, L - n + 1, n): every n-gram so far
    suffix = seqs[:, seqs.size(1) - (n - 1):]  # (N, n - 1): the words a new n-gram would start with
    match = (windows[:, :, : n - 1] == suffix.unsqueeze(1)).all(dim=2)  # (N, W)
    hits = torch.zeros(seqs.size(0), vocab_size, device=seqs.device)
    hits.scatter_add_(1, windows[:, :, n - 1], match.float())  # the word that followed each match
    return hits > 0


def _word_mask(words: Sequence[int], vocab_size: int, device) -> torch.Tensor | None:
    """(V,) bool, True at ``words``; None when there are none."""
    if not words:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.tensor(list(words), dtype=torch.long, device=device)] = True
    return mask


def greedy(decoder, feats: torch.Tensor, *, start: int, end: int, pad: int = 0,
           max_length: int = 50, block_ngrams: int = 0, return_alphas: bool = False) -> DecodeResult:
    return beam_search(decoder, feats, start=start, end=end, pad=pad, beam_size=1, max_length=max_length,
                       block_ngrams=block_ngrams, return_alphas=return_alphas)


@dataclass
class Samples:
    tokens: torch.Tensor  # (N, L) word ids, then <end>, then <pad>; L <= max_length + 1
    ended: torch.Tensor  # (N,) bool: emitted <end> within max_length words (else cut there)
    lengths: torch.Tensor  # (N,) words, <end> not counted


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One word per row of ``probs`` (N, V), rows summing to about 1: the inverse of each row's
    cumulative distribution at a uniform draw. One uniform number per row, where
    ``torch.multinomial`` makes an exponential variate per word (V of them a row: most of a CPU
    sampling step's time at a vocabulary of thousands). Words of probability 0 are never drawn
    (the first word whose cumulative sum passes the draw is taken)."""
    cdf = probs.cumsum(dim=1)
    total = cdf[:, -1:]
    u = torch.rand(probs.size(0), 1, device=probs.device, dtype=cdf.dtype, generator=generator) * total
    # below the total even where the product rounds up to it: the last word of positive probability
    # is then the one taken, never a word of probability 0 after it
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def policy_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """The logits :func:`sample` draws from (last dim: words): over ``temperature``, and with
    ``top_k`` > 0 -inf outside the k likeliest words, except the word ids in ``keep`` (shaped as
    ``logits`` less its last dim, plus 1), which stay in. Self-critical training scores its samples
    with the same function, so the probabilities it differentiates are those that drew them."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        out = logits < logits.topk(top_k, dim=-1).values[..., -1:]
        if keep is not None:
            out = out.scatter_(-1, keep, False)
        logits = logits.masked_fill(out, float("-inf"))
    return logits


@torch.no_grad()
def sample(decoder, feats: torch.Tensor, *, start: int, end: int, pad: int = 0, max_length: int = 50,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
           banned: Sequence[int] = (), dangling: Sequence[int] = (), per_image: int = 1) -> Samples:
    """``per_image`` captions per row of ``feats`` (B, P, E) (rows image-major: the captions of
    image i are rows i*per_image ...), each word drawn from the model's softmax at
    ``temperature``, restricted to the ``top_k`` likeliest words when ``top_k`` > 0. <pad>,
    <start> and the words in ``banned`` (e.g. <unk>) are never drawn; <end> never follows a word
    of ``dangling``. Captions that never end are cut at ``max_length`` words (their ``ended`` is
    False). Draws from ``generator`` (default: torch's global RNG).

    The captions of an image share its features (the decoder's grouped step) until the first
    captions end; ended captions leave the batch once they are a share of it (as in
    :func:`beam_search`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = per_image
    n = feats.size(0) * k
    device = feats.device
    step = _stepper(decoder, n, max_length)
    proj = decoder.attention.project(feats)
    h, c = decoder.init_state(feats)
    h, c = h.repeat_interleave(k, dim=0), c.repeat_interleave(k, dim=0)
    g = k if getattr(step, "grouped", False) else 1  # rows of h per row of feats
    if g == 1 and k > 1:  # a plain step wants the features once per row
        feats, proj = feats.repeat_interleave(k, dim=0), proj.repeat_interleave(k, dim=0)
    token = torch.full((n,), start, dtype=torch.long, device=device)
    ban = torch.tensor(sorted({pad, start, *banned}), device=device)
    no_end = _word_mask(dangling, decoder.vocab_size, device)
    out = torch.full((n, max_length), pad, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # the rows of ``out`` still drawing
    done = torch.zeros(n, dtype=torch.bool, device=device)  # of those, the ones past their <end>
    steps = 0
    for t in range(max_length):
        h, c, _ = step(token, feats, proj, h, c)
        logits = decoder.logits(h).float().index_fill_(1, ban, float("-inf"))
        if no_end is not None:
            logits[:, end].masked_fill_(no_end[token], float("-inf"))
        logits = policy_logits(logits, temperature, top_k)
        token = draw(torch.softmax(logits, dim=1), generator).masked_fill_(done, pad)  # after <end>: padding
        out[rows, t] = token
        steps = t + 1
        done |= token == end
        n_done = int(done.sum())  # the step's one host sync
        if n_done == done.numel():
            break
        if n_done >= max(1, done.numel() // COMPACT_FRACTION):
            # the ended captions leave; the rest's features go to one row each from here on (the
            # products of a step cost what its rows are, so rows that have ended should not stay)
            keep = (~done).nonzero().squeeze(1)
            image = torch.div(keep, g, rounding_mode="floor")
            feats, proj, g = feats[image], proj[image], 1
            rows, token, h, c, done = rows[keep], token[keep], h[keep], c[keep], done[keep]
    tokens = out[:, :max(steps, 1)] if n else out[:, :0]
    words = (tokens != end) & (tokens != pad)
    ended = (tokens == end).any(dim=1)
    return Samples(tokens, ended, words.sum(dim=1))
