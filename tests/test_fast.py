"""The fast paths (capcli.models.fast) can be turned off, and a whole model gives the same
captions, scores and features with them on and off. Each piece is also tested against its
reference on its own: test_decoder.py (recurrence, inference step), test_decode.py (beam search
with the fused step), test_fold.py, test_encoder.py (chunks, depthwise gradients)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from capcli.models import fast
from capcli.models.decoder import Decoder
from capcli.models.encoder import Encoder
from capcli.models.fast.depthwise import DepthwiseConv2d


@pytest.fixture
def reference_only():
    fast.set_enabled(False)
    try:
        yield
    finally:
        fast.set_enabled(True)


def test_models_built_with_the_fast_paths_off_use_the_reference(reference_only):
    dec = Decoder(vocab_size=20, enc_dim=8, emb_dim=4, att_dim=4, dec_dim=6)
    enc = Encoder("convnext_atto", pretrained=False, grid=1)
    assert not dec.fused and not enc.fast
    assert dec.stepper(rows=100, steps=100) == dec.step
    assert not any(isinstance(m, DepthwiseConv2d) for m in enc.backbone.modules())  # timm's own convolutions


def test_fast_paths_are_on_by_default_and_off_with_the_environment_variable():
    assert fast.enabled() and Decoder(20, 8, 4, 4, 6).fused
    assert any(isinstance(m, DepthwiseConv2d) for m in Encoder("convnext_atto", grid=1).backbone.modules())
    code = "from capcli.models import fast; from capcli.models.decoder import Decoder; " \
           "print(fast.enabled(), Decoder(20, 8, 4, 4, 6).fused)"
    for value, want in (("0", "False False"), ("1", "True True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CAPCLI_FAST": value},
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, out.stderr


def test_encoder_features_are_the_same_with_the_fast_paths_off():
    """BatchNorm folded and a CPU's batch in chunks (fast) against timm's backbone in one call."""
    torch.manual_seed(0)
    enc = Encoder("resnet18", pretrained=False, finetune=False, grid=2).eval()
    for m in enc.backbone.modules():  # running statistics that folding must carry
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (11, 3, 48, 48), dtype=torch.uint8)
    with torch.inference_mode():
        got = enc.regions(images)
        enc.fast = False
        want = enc.regions(images)
    assert enc._folded._module is not None and enc._folded._module is not enc.backbone  # it did fold
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_trained_model_captions_and_scores_the_same_with_the_fast_paths_off(tiny_run, tiny_data):
    from capcli import Captioner
    from capcli.data.dataset import CaptionDataset
    from capcli.decode import DecodeOptions
    from capcli.evaluate import evaluate_model

    cap = Captioner.load(tiny_run, device="cpu")
    test = CaptionDataset(tiny_data, "test")
    images = [test[i]["image"] for i in range(len(test))]
    on = cap.caption(images, beam=3)
    on_scores = evaluate_model(cap.model, test, torch.device("cpu"), DecodeOptions(beam_size=3), meteor=False)
    cap.model.decoder.fused = cap.model.encoder.fast = False
    assert cap.caption(images, beam=3) == on
    off_scores = evaluate_model(cap.model, test, torch.device("cpu"), DecodeOptions(beam_size=3), meteor=False)
    assert [c["caption"] for c in off_scores["captions"]] == [c["caption"] for c in on_scores["captions"]]
    assert off_scores["loss"] == pytest.approx(on_scores["loss"], rel=1e-5)
    assert off_scores["top5"] == pytest.approx(on_scores["top5"], rel=1e-6)
