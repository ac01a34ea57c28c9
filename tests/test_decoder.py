"""The decoder against a step-by-step computation written out here, in its reference form
(``fused=False``) and its fused one (capcli.models.fast), and the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from capcli.models.decoder import Decoder
from capcli.models.fast.inference import InferenceStep, gate_table
from capcli.models.loss import caption_loss


def manual_forward(dec: Decoder, feats, captions):
    """Show-Attend-Tell one step at a time, from the parameters, with no shared code paths."""
    a = dec.attention
    mean = feats.mean(1)
    h = mean @ dec.init_h.weight.T + dec.init_h.bias
    c = mean @ dec.init_c.weight.T + dec.init_c.bias
    enc = feats @ a.enc_att.weight.T + a.enc_att.bias  # (N, P, A)
    logits, alphas = [], []
    for t in range(captions.size(1) - 1):
        dec_proj = h @ a.dec_att.weight.T + a.dec_att.bias
        e = (torch.relu(enc + dec_proj[:, None]) @ a.full_att.weight.T).squeeze(2) + a.full_att.bias
        alpha = torch.exp(e) / torch.exp(e).sum(1, keepdim=True)
        ctx = (alpha[:, :, None] * feats).sum(1)
        gate = torch.sigmoid(h @ dec.f_beta.weight.T + dec.f_beta.bias)
        x = torch.cat([dec.embedding.weight[captions[:, t]], gate * ctx], 1)
        gates = x @ dec.lstm.weight_ih.T + dec.lstm.bias_ih + h @ dec.lstm.weight_hh.T + dec.lstm.bias_hh
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits.append(h @ dec.fc.weight.T + dec.fc.bias)
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    dec = Decoder(vocab_size=23, enc_dim=16, emb_dim=8, att_dim=12, dec_dim=10, dropout=0.5).double().eval()
    feats = torch.randn(4, 9, 16, dtype=torch.float64)
    captions = torch.randint(4, 23, (4, 7))
    captions[:, 0] = 1
    return dec, feats, captions


@pytest.fixture(params=[False, True], ids=["reference", "fused"])
def both(request, setup):
    """The setup's decoder as the reference code (the definition) and as the fused fast path."""
    dec, feats, captions = setup
    dec.fused = request.param
    return dec, feats, captions


def test_batched_forward_equals_step_by_step(both):
    dec, feats, captions = both
    logits, alphas = dec(feats, captions, tf_ratio=1.0)
    ref_logits, ref_alphas = manual_forward(dec, feats, captions)
    assert logits.shape == (4, 6, 23) and alphas.shape == (4, 6, 9)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas, ref_alphas, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(4, 6, dtype=torch.float64))


def test_free_running_feeds_back_argmax(both):
    dec, feats, captions = both
    logits, _ = dec(feats, captions, tf_ratio=0.0)
    # rebuild the inputs the model must have read: <start>, then its own argmax at each step
    fed = torch.cat([captions[:, :1], logits.argmax(-1)[:, :-1]], 1)
    ref, _ = manual_forward(dec, feats, torch.cat([fed, captions[:, -1:]], 1))
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    # and it differs from teacher forcing after the first step
    tf_logits, _ = dec(feats, captions, tf_ratio=1.0)
    torch.testing.assert_close(logits[:, 0], tf_logits[:, 0])
    assert not torch.allclose(logits, tf_logits)


def test_scheduled_ratio_mixes(both):
    dec, feats, captions = both
    torch.manual_seed(1)
    mixed, _ = dec(feats, captions, tf_ratio=0.5)
    tf, _ = dec(feats, captions, tf_ratio=1.0)
    free, _ = dec(feats, captions, tf_ratio=0.0)
    assert mixed.shape == tf.shape
    assert not torch.allclose(mixed, tf) and not torch.allclose(mixed, free)


def test_loss_masks_padding_and_adds_attention_penalty():
    torch.manual_seed(0)
    n, t, v, p = 2, 4, 6, 3
    logits = torch.randn(n, t, v)
    targets = torch.tensor([[5, 4, 2, 0], [3, 2, 0, 0]])
    lengths = torch.tensor([4, 3])  # <start> + words + <end>: 3 and 2 real targets
    alphas = torch.full((n, t, p), 1.0 / p)
    loss, ce, mask = caption_loss(logits, targets, alphas, lengths, alpha_c=1.0)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    picked = [(-F.log_softmax(logits[0, i], -1)[targets[0, i]]).item() for i in range(3)] + \
             [(-F.log_softmax(logits[1, i], -1)[targets[1, i]]).item() for i in range(2)]
    assert math.isclose(ce.item(), sum(picked) / 5, rel_tol=1e-6)
    # attention over real steps: image 0 sums to 3 * 1/3 = 1 per region -> 0 penalty; image 1: 2/3
    penalty = ((1 - 1.0) ** 2 * 3 + (1 - 2 / 3) ** 2 * 3) / 6
    assert math.isclose(loss.item(), ce.item() + penalty, rel_tol=1e-6)
    loss0, _, _ = caption_loss(logits, targets, alphas, lengths, alpha_c=0.0)
    assert math.isclose(loss0.item(), ce.item(), rel_tol=1e-6)


# ----------------------------------------------------------------------------- the fused training pass

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def weighted_sum(logits, alphas):
    """A loss that reaches every logit and every attention weight with its own weight."""
    g = torch.Generator().manual_seed(3)
    wl = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    wa = torch.randn(alphas.shape, generator=g, dtype=alphas.dtype)
    return (logits * wl).sum() + (alphas * wa).sum()


def grads_of(dec, feats, run):
    """Gradients of weighted_sum(run()) for every parameter and the features, by name."""
    dec.zero_grad(set_to_none=True)
    feats.grad = None
    weighted_sum(*run()).backward()
    return {"feats": feats.grad.clone(), **{k: p.grad.clone() for k, p in dec.named_parameters()}}


def test_gradients_equal_autograd_through_the_manual_computation(both):
    dec, feats, captions = both
    feats.requires_grad_()
    fast = grads_of(dec, feats, lambda: dec(feats, captions, tf_ratio=1.0))
    ref = grads_of(dec, feats, lambda: manual_forward(dec, feats, captions))
    assert fast.keys() == ref.keys()
    for name in ref:
        # full_att.bias shifts every score equally: its true gradient is 0, both sides give rounding noise
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def reference_scheduled(dec, feats, captions, ratio):
    """Scheduled sampling written step by step through the modules (Decoder.step / Decoder.logits),
    drawing as the decoder does: per step the dropout of the logits, then (for 0 < ratio < 1) one
    uniform per caption."""
    enc_proj = dec.attention.project(feats)
    h, c = dec.init_state(feats)
    token, logits, alphas = captions[:, 0], [], []
    for t in range(captions.size(1) - 1):
        h, c, alpha = dec.step(token, feats, enc_proj, h, c)
        logit = dec.logits(h)
        logits.append(logit)
        alphas.append(alpha)
        token = logit.argmax(-1)
        if ratio > 0:
            token = torch.where(torch.rand(captions.size(0)) < ratio, captions[:, t + 1], token)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


@pytest.mark.parametrize("ratio", [0.5, 0.0])
@pytest.mark.parametrize("train", [False, True])
def test_scheduled_sampling_equals_the_step_by_step_loop(both, ratio, train):
    dec, feats, captions = both
    dec.train(train)  # with dropout on, the fed-back argmax depends on the dropout draws too
    feats.requires_grad_()
    torch.manual_seed(7)
    logits, alphas = dec(feats, captions, tf_ratio=ratio)
    torch.manual_seed(7)
    ref_logits, ref_alphas = reference_scheduled(dec, feats, captions, ratio)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas, ref_alphas, rtol=1e-10, atol=1e-10)
    torch.manual_seed(7)
    fast = grads_of(dec, feats, lambda: dec(feats, captions, tf_ratio=ratio))
    torch.manual_seed(7)
    ref = grads_of(dec, feats, lambda: reference_scheduled(dec, feats, captions, ratio))
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_step_gives_what_the_training_pass_gives(both):
    """Beam search decodes with step() and logits(): the training pass must agree with them."""
    dec, feats, captions = both
    logits, alphas = dec(feats, captions)
    enc_proj = dec.attention.project(feats)
    h, c = dec.init_state(feats)
    for t in range(captions.size(1) - 1):
        h, c, alpha = dec.step(captions[:, t], feats, enc_proj, h, c)
        torch.testing.assert_close(dec.logits(h), logits[:, t], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alpha, alphas[:, t], rtol=1e-10, atol=1e-10)


# the parameters every capcli decoder has saved (vocab 23, enc 16, emb 8, att 12, dec 10)
CHECKPOINT_LAYOUT = {
    "attention.enc_att.weight": (12, 16), "attention.enc_att.bias": (12,),
    "attention.dec_att.weight": (12, 10), "attention.dec_att.bias": (12,),
    "attention.full_att.weight": (1, 12), "attention.full_att.bias": (1,),
    "embedding.weight": (23, 8),
    "lstm.weight_ih": (40, 24), "lstm.weight_hh": (40, 10), "lstm.bias_ih": (40,), "lstm.bias_hh": (40,),
    "init_h.weight": (10, 16), "init_h.bias": (10,), "init_c.weight": (10, 16), "init_c.bias": (10,),
    "f_beta.weight": (16, 10), "f_beta.bias": (16,),
    "fc.weight": (23, 10), "fc.bias": (23,),
}


def test_checkpoints_of_the_earlier_layout_load(both):
    dec, feats, captions = both
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == CHECKPOINT_LAYOUT
    g = torch.Generator().manual_seed(5)
    saved = {k: 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in CHECKPOINT_LAYOUT.items()}
    dec.load_state_dict(saved)  # strict: same keys, same shapes
    logits, alphas = dec(feats, captions)
    ref_logits, ref_alphas = manual_forward(dec, feats, captions)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas, ref_alphas, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=CUDA),
                                          pytest.param("cuda", torch.float16, marks=CUDA)])
def test_autocast_keeps_dtypes_and_stays_near_full_precision(device, dtype, fused):
    torch.manual_seed(0)
    dec = Decoder(vocab_size=50, enc_dim=32, emb_dim=16, att_dim=24, dec_dim=20, dropout=0.0).to(device)
    dec.fused = fused
    feats = torch.randn(6, 7, 32, device=device)
    captions = torch.randint(4, 50, (6, 9), device=device)
    captions[:, 0] = 1

    def run(amp: bool, ratio: float):
        dec.zero_grad(set_to_none=True)
        f = feats.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            logits, alphas = dec(f, captions, tf_ratio=ratio)
        (logits.float().logsumexp(-1).mean() + (alphas.float() ** 2).sum()).backward()
        return logits, alphas, {"feats": f.grad, **{k: p.grad for k, p in dec.named_parameters()}}

    for ratio in (1.0, 0.0):
        logits, alphas, grads = run(True, ratio)
        # as the modules give them under autocast: low-precision logits, float32 attention
        # (its softmax runs in float32, so the weights still sum to 1 to float32 precision)
        assert logits.dtype == dtype and alphas.dtype == torch.float32
        torch.testing.assert_close(alphas.sum(-1), torch.ones(6, 8, device=device))
        assert all(torch.isfinite(g).all() for g in grads.values())
    # teacher forcing reads the same tokens at either precision: compare with float32
    logits, alphas, grads = run(True, 1.0)
    ref_logits, ref_alphas, ref_grads = run(False, 1.0)
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    assert (logits.float() - ref_logits).abs().max() <= tol * ref_logits.abs().max()
    assert (alphas - ref_alphas).abs().max() <= tol * ref_alphas.abs().max()
    for name, ref in ref_grads.items():
        if name != "attention.full_att.bias":  # a true gradient of 0: rounding noise only
            assert (grads[name].float() - ref).abs().max() <= tol * ref.abs().max(), name


@pytest.mark.parametrize("use_table", [True, False])
def test_inference_step_equals_step(use_table):
    """The fused no-gradient step (beam search, sampling) computes what Decoder.step does."""
    torch.manual_seed(3)
    dec = Decoder(vocab_size=40, enc_dim=16, emb_dim=8, att_dim=12, dec_dim=10, dropout=0.5).double().eval()
    feats = torch.randn(6, 9, 16, dtype=torch.float64)
    proj = dec.attention.project(feats)
    h, c = dec.init_state(feats)
    fast = InferenceStep(dec, gate_table(dec) if use_table else None)
    h2, c2 = h, c
    for t in range(4):
        tokens = torch.randint(4, 40, (6,))
        h, c, a = dec.step(tokens, feats, proj, h, c)
        h2, c2, a2 = fast(tokens, feats, proj, h2, c2)
        for x, y in ((h, h2), (c, c2), (a, a2)):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_bytes", [1, 1 << 40], ids=["cpu-blocks-of-one-image", "one-pass"])
def test_grouped_inference_step_equals_step_on_repeated_features(block_bytes, monkeypatch):
    """Beam search's rows: k rows of h per image, the image's features given once. The attention
    MLP formed image block by image block in one reused buffer (a CPU) or in one pass (else)
    equals the plain step over features repeated per row."""
    monkeypatch.setattr(InferenceStep, "CPU_BLOCK_BYTES", block_bytes)
    torch.manual_seed(4)
    dec = Decoder(vocab_size=40, enc_dim=16, emb_dim=8, att_dim=12, dec_dim=10).double().eval()
    images, k = 3, 4
    feats = torch.randn(images, 9, 16, dtype=torch.float64)
    proj = dec.attention.project(feats)
    feats_k, proj_k = feats.repeat_interleave(k, 0), proj.repeat_interleave(k, 0)
    h, c = (torch.randn(images * k, 10, dtype=torch.float64) for _ in range(2))
    fast = InferenceStep(dec)
    h2, c2 = h, c
    for t in range(3):
        tokens = torch.randint(4, 40, (images * k,))
        h, c, a = dec.step(tokens, feats_k, proj_k, h, c)
        h2, c2, a2 = fast(tokens, feats, proj, h2, c2)
        for x, y in ((h, h2), (c, c2), (a, a2)):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not split evenly"):
        fast(tokens[:5], feats, proj, h[:5], c[:5])


def test_gate_table_is_held_only_inside_derived_weights():
    torch.manual_seed(0)
    dec = Decoder(vocab_size=30, enc_dim=8, emb_dim=6, att_dim=8, dec_dim=5).eval()
    torch.testing.assert_close(gate_table(dec)[7], dec.lstm.weight_ih[:, :6] @ dec.embedding.weight[7])
    with dec.derived_weights():
        table = dec._gate_table
        torch.testing.assert_close(table, gate_table(dec))
        assert dec.stepper(rows=1, steps=1).table is table  # made once for every batch of the block
    assert dec._gate_table is None
    assert dec.stepper(rows=1, steps=1).table is None  # a short decode: one product per step instead
    assert dec.stepper(rows=30, steps=1).table is not None  # a long one makes its own
    dec.fused = False
    with dec.derived_weights():
        assert dec._gate_table is None and dec.stepper(rows=30, steps=1) == dec.step  # the reference step


@pytest.mark.parametrize("ratio", [1.0, 0.0])
@pytest.mark.parametrize("lengths", [[5, 7, 2, 4], [7, 7, 7, 3], [2, 3, 4, 5], [7, 7, 6, 7], [7, 7, 7, 7]])
def test_known_lengths_run_each_caption_its_own_steps(setup, ratio, lengths):
    """With ``lengths`` every caption runs only its own steps (sorted, the batch shrinking): the
    scores, attention and every gradient of a loss over the real steps equal the full pass's."""
    dec, feats, captions = setup
    lengths = torch.tensor(lengths)  # counting <start> and <end>; captions are (4, 7): 6 steps at most
    real = torch.arange(6).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (N, T) the real steps
    feats.requires_grad_()

    def masked(run):
        def go():
            logits, alphas = run()
            return logits * real.unsqueeze(2), alphas * real.unsqueeze(2)
        return go

    full_logits, full_alphas = masked(lambda: dec(feats, captions, tf_ratio=ratio))()
    logits, alphas = dec(feats, captions, tf_ratio=ratio, lengths=lengths)
    assert torch.isfinite(logits).all() and torch.isfinite(alphas).all()
    torch.testing.assert_close(logits * real.unsqueeze(2), full_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas * real.unsqueeze(2), full_alphas, rtol=1e-10, atol=1e-10)
    assert (alphas[~real] == 0).all()  # after a caption's end: placeholders, no attention
    ref = grads_of(dec, feats, masked(lambda: dec(feats, captions, tf_ratio=ratio)))
    fast = grads_of(dec, feats, masked(lambda: dec(feats, captions, tf_ratio=ratio, lengths=lengths)))
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_known_lengths_leave_the_training_loss_unchanged(setup):
    """The cross-entropy + attention loss of a padded batch is the same whether the decoder runs
    the padding steps or skips them."""
    dec, feats, captions = setup
    lengths = torch.tensor([5, 7, 2, 4])
    targets = captions[:, 1:]
    logits, alphas = dec(feats, captions)
    full = caption_loss(logits, targets, alphas, lengths)[0]
    logits, alphas = dec(feats, captions, lengths=lengths)
    short = caption_loss(logits, targets, alphas, lengths)[0]
    torch.testing.assert_close(short, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths", [None, [5, 7, 2, 4], [7, 7, 7, 3], [2, 3, 4, 5], [7, 7, 7, 7]])
def test_teacher_forced_pass_without_gradients_equals_the_training_pass(setup, lengths):
    """Without gradients on a CPU (evaluation's loss and top-5) teacher forcing runs through the
    row-major InferenceStep instead of the training recurrence: the same logits and attention,
    placeholders included (zeros after a caption's end), in the caller's row order."""
    dec, feats, captions = setup
    lengths = None if lengths is None else torch.tensor(lengths)
    with torch.enable_grad():
        ref_logits, ref_alphas = dec(feats, captions, lengths=lengths)  # the training recurrence
    from capcli.models.fast import inference

    calls = []
    real_step = inference.teacher_forced
    try:
        inference.teacher_forced = lambda *a: calls.append(1) or real_step(*a)
        with torch.no_grad():
            logits, alphas = dec(feats, captions, lengths=lengths)
            dec(feats, captions, tf_ratio=0.5, lengths=lengths)  # not teacher forcing: the recurrence
    finally:
        inference.teacher_forced = real_step
    assert calls == [1]
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas, ref_alphas.detach(), rtol=1e-10, atol=1e-10)


def test_inference_step_forms_the_attention_mlp_in_float32_on_a_cpu_under_autocast(monkeypatch):
    """Under CPU autocast the products run in bf16, but relu(enc_proj + query) . w runs in float32
    (the CPU's elementwise kernels are faster there, and it is closer to full precision), from a
    cast of enc_proj made once per decode."""
    torch.manual_seed(4)
    dec = Decoder(vocab_size=40, enc_dim=16, emb_dim=8, att_dim=12, dec_dim=10, dropout=0.0).eval()
    feats = torch.randn(6, 9, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        proj = dec.attention.project(feats)
        step = InferenceStep(dec)
        query = torch.randn(6, 2, 1, 12).bfloat16()
        assert proj.dtype == torch.bfloat16
        ref = torch.mv(torch.relu(proj.float().unsqueeze(1) + query.float()).view(-1, 12),
                       dec.attention.full_att.weight.view(-1))
        for block in (1 << 20, 1):  # all images in one block, and a block per image
            monkeypatch.setattr(InferenceStep, "CPU_BLOCK_BYTES", block)
            out = step._scores(proj, query)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # float32 rounding only
        cast = step._float32(proj)
        assert step._float32(proj) is cast  # cast once, not at every step
        copy = proj.clone()  # another tensor (a compacted batch): cast afresh
        assert step._float32(copy) is not cast
        torch.testing.assert_close(step._float32(copy), proj.float(), rtol=0, atol=0)
