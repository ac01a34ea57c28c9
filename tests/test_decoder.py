"""The decoder's batched forward against a step-by-step computation written out here, and the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from capcli.models.decoder import Decoder, caption_loss


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


def test_batched_forward_equals_step_by_step(setup):
    dec, feats, captions = setup
    logits, alphas = dec(feats, captions, tf_ratio=1.0)
    ref_logits, ref_alphas = manual_forward(dec, feats, captions)
    assert logits.shape == (4, 6, 23) and alphas.shape == (4, 6, 9)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas, ref_alphas, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(4, 6, dtype=torch.float64))


def test_free_running_feeds_back_argmax(setup):
    dec, feats, captions = setup
    logits, _ = dec(feats, captions, tf_ratio=0.0)
    # rebuild the inputs the model must have read: <start>, then its own argmax at each step
    fed = torch.cat([captions[:, :1], logits.argmax(-1)[:, :-1]], 1)
    ref, _ = manual_forward(dec, feats, torch.cat([fed, captions[:, -1:]], 1))
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    # and it differs from teacher forcing after the first step
    tf_logits, _ = dec(feats, captions, tf_ratio=1.0)
    torch.testing.assert_close(logits[:, 0], tf_logits[:, 0])
    assert not torch.allclose(logits, tf_logits)


def test_scheduled_ratio_mixes(setup):
    dec, feats, captions = setup
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
