"""`capcli benchmark encoders|train|decode` through the command line on tiny settings, and the
FLOP counting against a count by hand."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

from capcli.bench.harness import encoder_gflops, time_fn
from capcli.cli.main import app
from capcli.models.encoder import Encoder

runner = CliRunner()
TINY = "test_convnext"  # timm's test variant: 0.2 M parameters
ROW_KEYS = {"encoder", "params_m", "gflops", "images_per_s", "train_samples_per_s", "peak_mem_mb"}


def invoke(*args: str):
    return runner.invoke(app, ["benchmark", *args, "--device", "cpu", "--quiet"])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def hand_gflops(name: str, size: int) -> float:
    """2 FLOPs per multiply-add of every Conv2d and Linear (all a ConvNeXt multiplies)."""
    model = timm.create_model(name, num_classes=0, global_pool="").eval()
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        out_features = module.weight.shape[0]
        positions = output.numel() // out_features  # output pixels (conv) or tokens (linear)
        total += 2 * positions * module.weight.numel()

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model.forward_features(torch.zeros(1, 3, size, size))
    return total / 1e9


def test_encoders_table_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    data_dir = tmp_path / "data"  # only the manifest is read: the image size comes from it
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text(json.dumps({"image_size": 32, "splits": {}}))
    result = ok(invoke("encoders", "--encoders", "convnext_atto", "--data", str(data_dir),
                       "--batch", "1", "--train-batch", "5", "--steps", "1", "--warmup", "0",
                       "--output", str(out), "--plot", str(png)))
    assert "convnext_atto" in result.stdout and "GFLOPs" in result.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"rows", "settings", "env"}
    assert [r["encoder"] for r in data["rows"]] == ["convnext_atto"]
    for row in data["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["images_per_s"] > 0 and row["train_samples_per_s"] > 0 and row["gflops"] > 0
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
        assert row["image_size"] == 32 and row["device"] == "cpu"
    atto = data["rows"][0]
    backbone = timm.create_model("convnext_atto", num_classes=0, global_pool="")
    assert atto["params_m"] == pytest.approx(sum(p.numel() for p in backbone.parameters()) / 1e6)
    assert atto["gflops"] == pytest.approx(hand_gflops("convnext_atto", 32), rel=0.1)
    assert data["settings"]["image_size"] == 32 and data["settings"]["image_size_from"] == str(data_dir)
    assert data["settings"]["train_batch"] == 5
    assert data["settings"]["peak_mem_kind"] in ("cpu_peak_rss_delta", "cpu_maxrss_delta", None)
    assert {"torch", "timm", "device_name", "cpu_count"} <= set(data["env"])
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_gflops_scale_with_image_area():
    enc = Encoder("convnext_atto", pretrained=False, grid=7, finetune=False)
    small, large = encoder_gflops(enc, 64), encoder_gflops(enc, 128)
    assert 3.6 < large / small < 4.4
    # timm lists convnext_atto at 0.55 GMACs for 224 px: FlopCounterMode counts 2 FLOPs per MAC
    assert encoder_gflops(enc, 224) == pytest.approx(2 * 0.55, rel=0.1)


@pytest.mark.parametrize("mode", ["finetune", "frozen", "cached"])
def test_train_modes(tmp_path, mode):
    out = tmp_path / "train.json"
    ok(invoke("train", "--encoder", TINY, "--image-size", "32", "--batch", "10", "--mode", mode,
              "--steps", "1", "--warmup", "0", "--vocab", "20", "--max-length", "4", "--output", str(out)))
    data = json.loads(out.read_text())
    assert data["samples_per_s"] > 0 and data["step_ms"] > 0
    assert data["mode"] == mode and data["batch"] == 10 and data["images_per_step"] == 2
    assert data["samples_per_s"] == pytest.approx(data["images_per_s"] * 5)
    assert "torch" in data["env"]


def test_decode_random_weights(tmp_path):
    out = tmp_path / "decode.json"
    ok(invoke("decode", "--encoder", TINY, "--beam", "2", "--images", "3", "--batch", "2",
              "--max-length", "3", "--vocab", "20", "--image-size", "32", "--output", str(out)))
    data = json.loads(out.read_text())
    assert data["captions_per_s"] > 0 and data["images"] == 3 and data["beam"] == 2
    assert 0 <= data["mean_words"] <= 3 and 0 <= data["ended_fraction"] <= 1
    assert data["weights"] == "random" and "max_length" in data["note"]


def test_decode_checkpoint(tmp_path):
    from capcli.config import Config
    from capcli.models.captioner import CaptionModel

    cfg = Config()
    cfg.model.encoder, cfg.model.pretrained = TINY, False
    itos = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)]
    model = CaptionModel(cfg.model, len(itos), pretrained=False)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "vocab": itos,
                "data": {"image_size": 32}}, ckpt)
    out = tmp_path / "decode.json"
    ok(invoke("decode", "--checkpoint", str(ckpt), "--beam", "1", "--images", "2", "--max-length", "3",
              "--output", str(out)))
    data = json.loads(out.read_text())
    assert data["weights"] == "checkpoint" and data["encoder"] == TINY
    assert data["vocab"] == len(itos) and data["image_size"] == 32 and data["note"] is None
    mismatch = invoke("decode", "--checkpoint", str(ckpt), "--encoder", "convnext_atto")
    assert mismatch.exit_code == 1 and "does not match" in mismatch.output


@pytest.mark.parametrize("args", [
    ["encoders", "--encoders", "convnext_atoo"],
    ["train", "--encoder", "convnext_atoo"],
    ["decode", "--encoder", "convnext_atoo"],
])
def test_unknown_encoder_is_a_one_line_error(args):
    result = invoke(*args)
    assert result.exit_code == 1
    assert "unknown encoder 'convnext_atoo'" in result.output and "convnext_atto" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_data_dir_without_manifest(tmp_path):
    result = invoke("encoders", "--encoders", TINY, "--data", str(tmp_path))
    assert result.exit_code == 1 and "manifest.json" in result.output
    assert "Traceback" not in result.output


def test_batch_smaller_than_captions_per_image():
    result = invoke("train", "--encoder", TINY, "--batch", "3")
    assert result.exit_code == 1 and "caption-image pairs" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_time_fn_counts_only_timed_iterations():
    calls = []
    timing = time_fn(lambda: calls.append(1), warmup=2, iters=3, device="cpu")
    assert len(calls) == 5 and timing["iters"] == 3
    assert 0 <= timing["min_s"] <= timing["median_s"] and timing["total_s"] >= 0


def test_too_small_image_names_the_size_it_takes():
    # convnext_atto downsamples by 32: a 16 px image has no pixels left for the last stages
    result = invoke("train", "--encoder", "convnext_atto", "--image-size", "16")
    assert result.exit_code == 1 and "--image-size 224" in result.output
    assert "Traceback" not in result.output


def test_vit_runs_at_any_size(tmp_path):
    # token models are built with a dynamic image size, so 64 px works for a 224 px ViT
    out = tmp_path / "vit.json"
    result = invoke("train", "--encoder", "vit_tiny_patch16_224", "--image-size", "64", "--steps", "1",
                    "--warmup", "0", "--batch", "5", "--mode", "frozen", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["samples_per_s"] > 0
