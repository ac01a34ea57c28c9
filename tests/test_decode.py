"""Beam search on a Markov 'decoder' whose optimum is found by enumeration."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from capcli.decode import beam_search, greedy

PAD, START, END = 0, 1, 2
WORDS = [4, 5, 6, 7]  # ids 3 (<unk>) never used


class Markov:
    """Next-token log-probs depend on (image, previous token) only: logp[image, prev]."""

    def __init__(self, logp: torch.Tensor):
        self.logp = logp  # (B, V, V)
        self.vocab_size = logp.size(-1)
        self.attention = SimpleNamespace(project=lambda f: f)

    def init_state(self, feats):
        img = torch.arange(feats.size(0), dtype=torch.float32)
        return torch.stack([img, torch.full_like(img, START)], 1), torch.zeros(feats.size(0), 1)

    def step(self, tokens, feats, proj, h, c):
        h = torch.stack([h[:, 0], tokens.float()], 1)
        return h, c, torch.full((tokens.size(0), feats.size(1)), 1.0 / feats.size(1))

    def logits(self, h):
        return self.logp[h[:, 0].long(), h[:, 1].long()]


def random_tables(b, v, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, v, generator=g) * 2
    logits[:, :, [PAD, START, 3]] = -1e9  # never produced
    return torch.log_softmax(logits, -1)


def best_by_enumeration(logp, max_len):
    best, best_seq = -math.inf, None
    for n in range(0, max_len + 1):
        for seq in itertools.product(WORDS, repeat=n):
            prev, score = START, 0.0
            for w in seq:
                score += logp[prev, w].item()
                prev = w
            if n < max_len:
                score += logp[prev, END].item()  # a natural end; at the limit the cut costs nothing
            if score > best:
                best, best_seq = score, list(seq)
    return best, best_seq


def test_wide_beam_finds_the_optimum_and_greedy_is_myopic():
    b, v, max_len = 6, 8, 3
    logp = random_tables(b, v, seed=3)
    feats = torch.zeros(b, 2, 1)
    res = beam_search(Markov(logp), feats, start=START, end=END, pad=PAD, beam_size=100, max_length=max_len)
    for i in range(b):
        score, seq = best_by_enumeration(logp[i], max_len)
        assert res.tokens[i] == seq
        assert math.isclose(res.scores[i].item(), score, abs_tol=1e-4)
    g = greedy(Markov(logp), feats, start=START, end=END, pad=PAD, max_length=max_len)
    for i in range(b):  # greedy follows the argmax chain by hand
        prev, seq = START, []
        for _ in range(max_len):
            nxt = int(logp[i, prev].argmax())
            if nxt == END:
                break
            seq.append(nxt)
            prev = nxt
        assert g.tokens[i] == seq
    assert any(res.scores[i] > g.scores[i] + 1e-6 for i in range(b))  # beam beats greedy somewhere


def test_beam_that_never_ends_is_returned_at_the_limit():
    v = 8
    logp = torch.full((2, v, v), -1e9)
    logp[:, :, 5] = 0.0  # always "5", never <end>
    res = beam_search(Markov(logp), torch.zeros(2, 1, 1), start=START, end=END, pad=PAD,
                      beam_size=3, max_length=4, return_alphas=True)
    assert res.tokens == [[5, 5, 5, 5], [5, 5, 5, 5]]
    assert res.alphas.shape[0] == 2 and res.alphas.shape[2] == 1


def test_batch_results_equal_single_image_results():
    logp = random_tables(5, 8, seed=11)
    feats = torch.zeros(5, 2, 1)
    batched = beam_search(Markov(logp), feats, start=START, end=END, pad=PAD, beam_size=3, max_length=5)
    for i in range(5):
        one = beam_search(Markov(logp[i:i + 1]), feats[:1], start=START, end=END, pad=PAD, beam_size=3, max_length=5)
        assert one.tokens[0] == batched.tokens[i]


def test_real_decoder_beam_one_equals_greedy_argmax_loop():
    from capcli.models.decoder import Decoder

    torch.manual_seed(0)
    dec = Decoder(vocab_size=30, enc_dim=8, emb_dim=8, att_dim=8, dec_dim=8, dropout=0.0).eval()
    feats = torch.randn(3, 4, 8)
    res = greedy(dec, feats, start=START, end=END, pad=PAD, max_length=6)
    proj = dec.attention.project(feats)
    h, c = dec.init_state(feats)
    tok = torch.full((3,), START)
    outs = [[] for _ in range(3)]
    done = [False] * 3
    with torch.no_grad():
        for _ in range(6):
            h, c, _ = dec.step(tok, feats, proj, h, c)
            logits = dec.logits(h)
            logits[:, [PAD, START]] = -float("inf")  # never emitted by an open caption
            tok = logits.argmax(-1)
            for i in range(3):
                if not done[i]:
                    if tok[i] == END:
                        done[i] = True
                    else:
                        outs[i].append(int(tok[i]))
    assert res.tokens == outs


@pytest.mark.parametrize("beam", [1, 4, 30])
def test_real_decoder_fused_beam_search_equals_the_plain_step(beam, monkeypatch):
    """The fused step reads each image's features once for all its beams (a CPU: in blocks of
    images) and takes the first word from one row per image (all beams start identical); the
    plain per-row step reads the features repeated per beam and expands the first beam of k.
    Same captions, same scores, same attention (beam 30: as many beams as words)."""
    from capcli.models.decoder import Decoder
    from capcli.models.fast.inference import InferenceStep

    torch.manual_seed(1)
    dec = Decoder(vocab_size=30, enc_dim=8, emb_dim=8, att_dim=8, dec_dim=8, dropout=0.0).double().eval()
    feats = torch.randn(5, 4, 8, dtype=torch.float64)
    monkeypatch.setattr(InferenceStep, "CPU_BLOCK_BYTES", 1)  # one image per block
    rows = []
    real_call = InferenceStep.__call__
    monkeypatch.setattr(InferenceStep, "__call__", lambda self, tokens, *a: rows.append(tokens.numel())
                        or real_call(self, tokens, *a))
    fused = beam_search(dec, feats, start=START, end=END, pad=PAD, beam_size=beam, max_length=7, return_alphas=True)
    assert rows[:2] == [5, 5 * beam]  # the first word from one row per image, then a row per beam
    dec.fused = False  # the reference: Decoder.step
    plain = beam_search(dec, feats, start=START, end=END, pad=PAD, beam_size=beam, max_length=7, return_alphas=True)
    assert fused.tokens == plain.tokens
    torch.testing.assert_close(fused.scores, plain.scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.alphas, plain.alphas, rtol=1e-10, atol=1e-12)


def repeats_an_ngram(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_block_ngrams_finds_the_best_caption_without_a_repeated_ngram():
    """An exhaustive beam with --block-ngrams 2 equals the best caption by enumeration among those
    that repeat no bigram; on tables that favour a loop, the plain beam does repeat one."""
    b, v, max_len = 4, 7, 4
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(b, v, v, generator=g)
    logits[:, 4, 5] += 4.0  # 4 -> 5 -> 4 -> 5 ... is likely
    logits[:, 5, 4] += 4.0
    logits[:, :, [PAD, START, 3]] = -1e9
    logp = torch.log_softmax(logits, -1)
    feats = torch.zeros(b, 2, 1)
    words = [4, 5, 6]
    plain = beam_search(Markov(logp), feats, start=START, end=END, pad=PAD, beam_size=400, max_length=max_len)
    blocked = beam_search(Markov(logp), feats, start=START, end=END, pad=PAD, beam_size=400, max_length=max_len,
                          block_ngrams=2)
    assert any(repeats_an_ngram(t, 2) for t in plain.tokens)
    for i in range(b):
        best, best_seq = -math.inf, None
        for n in range(max_len + 1):
            for seq in itertools.product(words, repeat=n):
                if repeats_an_ngram(list(seq), 2):
                    continue
                prev, score = START, 0.0
                for w in seq:
                    score += logp[i, prev, w].item()
                    prev = w
                if n < max_len:
                    score += logp[i, prev, END].item()
                if score > best:
                    best, best_seq = score, list(seq)
        assert blocked.tokens[i] == best_seq
        assert not repeats_an_ngram(blocked.tokens[i], 2)


def test_sampling_follows_the_model_distribution():
    from capcli.decode import sample

    v = 7
    logp = torch.full((1, v, v), -1e9)
    logp[0, START, 4], logp[0, START, 5], logp[0, START, 6] = math.log(0.6), math.log(0.3), math.log(0.1)
    logp[0, 4:7, END] = 0.0  # one word, then <end>
    feats = torch.zeros(3000, 2, 1)
    table = logp.expand(3000, v, v)
    torch.manual_seed(0)
    s = sample(Markov(table), feats, start=START, end=END, pad=PAD, max_length=5)
    first = s.tokens[:, 0]
    freqs = [(first == w).float().mean().item() for w in (4, 5, 6)]
    assert freqs == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    assert bool(s.ended.all()) and (s.tokens[:, 1] == END).all() and s.lengths.eq(1).all()
    cold = sample(Markov(table), feats, start=START, end=END, pad=PAD, max_length=5, temperature=0.1)
    assert (cold.tokens[:, 0] == 4).float().mean() > 0.99  # near-greedy when cold
    top1 = sample(Markov(table), feats, start=START, end=END, pad=PAD, max_length=5, top_k=1)
    assert (top1.tokens[:, 0] == 4).all()
    top2 = sample(Markov(table), feats, start=START, end=END, pad=PAD, max_length=5, top_k=2)
    assert not (top2.tokens[:, 0] == 6).any() and (top2.tokens[:, 0] == 5).any()


def test_samples_that_never_end_are_cut_at_max_length():
    from capcli.decode import sample

    v = 8
    logp = torch.full((2, v, v), -1e9)
    logp[:, :, 5] = 0.0  # always "5"
    s = sample(Markov(logp), torch.zeros(2, 1, 1), start=START, end=END, pad=PAD, max_length=4)
    assert s.tokens.tolist() == [[5, 5, 5, 5]] * 2 and not s.ended.any() and s.lengths.tolist() == [4, 4]


@pytest.mark.parametrize("grouped", [True, False])
def test_images_leave_the_beam_search_when_their_beams_end(grouped, monkeypatch):
    """Images whose beams have all ended leave the batch (compaction); each image still gets what
    it gets decoded alone: tokens, scores, and attention (zeros after its own last step)."""
    import capcli.decode as decode
    from capcli.models.decoder import Decoder

    torch.manual_seed(3)
    dec = Decoder(vocab_size=30, enc_dim=8, emb_dim=8, att_dim=8, dec_dim=8, dropout=0.0).double().eval()
    with torch.no_grad():  # captions end after one, two or twelve words, by image
        dec.fc.weight.normal_(0, 1)
        dec.fc.bias[END] = 2.0
    if not grouped:
        dec.fused = False  # the plain step: features repeated per beam
    feats = torch.randn(12, 4, 8, dtype=torch.float64) * 3
    parts = []
    reassemble = decode._reassemble
    monkeypatch.setattr(decode, "_reassemble", lambda p, *a: parts.append(len(p)) or reassemble(p, *a))
    monkeypatch.setattr(decode, "COMPACT_FRACTION", 4)
    batched = beam_search(dec, feats, start=START, end=END, pad=PAD, beam_size=3, max_length=12, return_alphas=True)
    assert parts and parts[0] >= 3  # the batch shrank at least twice before its last images ended
    for i in range(len(feats)):
        one = beam_search(dec, feats[i:i + 1], start=START, end=END, pad=PAD, beam_size=3, max_length=12,
                          return_alphas=True)
        assert one.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(one.scores[0], batched.scores[i], rtol=1e-10, atol=1e-12)
        steps = one.alphas.size(1)
        torch.testing.assert_close(batched.alphas[i, :steps], one.alphas[0].to(batched.alphas.dtype),
                                   rtol=1e-10, atol=1e-12)
        assert not batched.alphas[i, steps:].any()


UNK = 3


def unk_loving_table(b: int, v: int) -> torch.Tensor:
    """A model whose likeliest first word is <unk> (then word 4), and which ends after one word."""
    logits = torch.full((b, v, v), -1e9)
    logits[:, START, UNK], logits[:, START, 4] = 0.0, -0.5
    logits[:, 3:, END] = 0.0
    logits[:, 3:, 5:] = -3.0
    return torch.log_softmax(logits, -1)


def test_unk_is_never_emitted_unless_allowed():
    """<unk> is banned like <pad> in beam search, greedy decoding and sampling; without the ban the
    same model emits it (the test can fail)."""
    from capcli.decode import beam_search, sample

    v = 9
    table = unk_loving_table(2, v)
    feats = torch.zeros(2, 1, 1)
    kw = {"start": START, "end": END, "pad": PAD, "max_length": 4}
    for beam in (1, 3):
        raw = beam_search(Markov(table), feats, beam_size=beam, **kw)
        assert all(UNK in t for t in raw.tokens)
        clean = beam_search(Markov(table), feats, beam_size=beam, banned=(UNK,), **kw)
        assert all(UNK not in t for t in clean.tokens) and all(len(t) > 0 for t in clean.tokens)
    torch.manual_seed(0)
    drawn = sample(Markov(unk_loving_table(400, v)), torch.zeros(400, 1, 1), banned=(UNK,), **kw)
    assert not (drawn.tokens == UNK).any()
    assert (sample(Markov(unk_loving_table(400, v)), torch.zeros(400, 1, 1), **kw).tokens == UNK).any()


def test_no_caption_ends_on_a_dangling_word_unless_cut_at_max_length():
    """After word 4 ("a"), <end> is the model's likeliest next token: with 4 dangling, beam search
    and sampling go on to another word first; a caption that reaches max_length on it is cut there."""
    from capcli.decode import beam_search, sample

    v = 8
    logits = torch.full((1, v, v), -1e9)
    logits[0, START, 4] = 0.0  # "a" first
    logits[0, 4, END], logits[0, 4, 6] = 0.0, -2.0  # then <end> (likely) or "dog"
    logits[0, 6, END] = 0.0
    table = torch.log_softmax(logits, -1)
    feats = torch.zeros(1, 1, 1)
    kw = {"start": START, "end": END, "pad": PAD}
    assert beam_search(Markov(table), feats, beam_size=3, max_length=5, **kw).tokens == [[4]]
    assert beam_search(Markov(table), feats, beam_size=3, max_length=5, dangling=(4,), **kw).tokens == [[4, 6]]
    assert beam_search(Markov(table), feats, beam_size=1, max_length=1, dangling=(4,), **kw).tokens == [[4]]
    torch.manual_seed(0)
    drawn = sample(Markov(table.expand(200, v, v)), torch.zeros(200, 1, 1), max_length=5, dangling=(4,), **kw)
    assert drawn.tokens[:, :3].tolist() == [[4, 6, END]] * 200


def test_sampling_several_captions_per_image_keeps_them_image_major():
    """per_image=k draws k captions of each image (rows i*k .. i*k+k-1), each from its image's
    distribution: image 0 always says word 4, image 1 word 5."""
    from capcli.decode import sample

    v = 7
    logits = torch.full((2, v, v), -1e9)
    logits[0, START, 4] = logits[1, START, 5] = 0.0
    logits[:, 4:6, END] = 0.0
    s = sample(Markov(torch.log_softmax(logits, -1)), torch.zeros(2, 1, 1), start=START, end=END, pad=PAD,
               max_length=3, per_image=3)
    assert s.tokens.tolist() == [[4, END]] * 3 + [[5, END]] * 3 and s.ended.all()


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from capcli.decode import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20000, 6)
    g = torch.Generator().manual_seed(1)
    words = draw(probs, g)
    freq = torch.bincount(words, minlength=6).float() / len(words)
    assert freq[[0, 2, 5]].sum() == 0
    assert freq[[1, 3, 4]].tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.015)


def test_draw_at_the_top_of_the_distribution_takes_the_last_possible_word(monkeypatch):
    """A uniform draw whose product with the total rounds up to the total still lands on a word of
    positive probability, not on the zero-probability words after it."""
    from capcli.decode import draw

    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=k.get("dtype")))  # u = total
    assert draw(probs).tolist() == [1]
