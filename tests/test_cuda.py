"""The CUDA path: training under each precision, the feature cache, exact resume, decoding and the
benchmarks on a GPU. Skipped where there is no CUDA device; `scripts/gpu_check.sh` runs them."""

from __future__ import annotations

import json

import pytest
import torch

from capcli.config import load_config
from tests.conftest import TINY_OVERRIDES

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU = torch.device("cuda")


def cfg_for(data, runs, *extra):
    return load_config("tiny", [f"data.dir={data}", f"run.dir={runs}", *TINY_OVERRIDES,
                                "data.val_max_images=3", *extra])


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_under_each_precision(tiny_data, tmp_path, amp):
    from capcli.training.trainer import train

    summary = train(cfg_for(tiny_data, tmp_path, f"run.name={amp}", f"train.amp={amp}", "train.epochs=2"), GPU)
    losses = [r["train_loss"] for r in summary["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    ckpt = torch.load(tmp_path / amp / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    assert bool(ckpt["scaler"]) == (amp == "fp16")  # a loss scaler only for fp16


def test_frozen_encoder_cache_on_the_gpu(tiny_data, tmp_path):
    from capcli.training.trainer import train

    summary = train(cfg_for(tiny_data, tmp_path, "run.name=frozen", "model.finetune=false", "train.amp=bf16"), GPU)
    assert summary["history"][0]["val_bleu4"] is not None
    assert list((tiny_data / "features").glob("*/train-bf16.h5"))  # made under bf16 autocast


def test_exact_resume_on_the_gpu(tiny_data, tmp_path):
    from capcli.training.trainer import Trainer, train

    full = train(cfg_for(tiny_data, tmp_path, "run.name=full", "train.epochs=2", "train.amp=off"), GPU)
    trainer = Trainer(cfg_for(tiny_data, tmp_path, "run.name=part", "train.epochs=2", "train.amp=off"), GPU)
    trainer.emit = lambda e, **i: setattr(trainer.signals, "received", "SIGTERM") if (
        e == "step" and i["epoch"] == 1 and i["step"] == 2) else None
    trainer.fit()
    train(None, GPU, resume=tmp_path / "part")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # cuDNN may pick non-deterministic kernels: report how far apart, demand near-equality
    assert worst < 1e-4, f"largest weight difference after a GPU resume: {worst}"
    assert full["history"][-1]["epoch"] == 2


def test_decoder_and_beam_search_match_the_cpu():
    from capcli.decode import beam_search
    from capcli.models.decoder import Decoder

    torch.manual_seed(0)
    dec = Decoder(vocab_size=50, enc_dim=64, emb_dim=32, att_dim=32, dec_dim=48, dropout=0.0).eval()
    feats = torch.randn(4, 9, 64)
    caps = torch.randint(4, 50, (4, 8))
    caps[:, 0] = 1
    cpu_logits, _ = dec(feats, caps)
    gpu_logits, _ = dec.to(GPU)(feats.to(GPU), caps.to(GPU))
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_logits, alphas = dec(feats.to(GPU), caps.to(GPU))
    assert torch.isfinite(bf16_logits).all() and torch.allclose(alphas.float().sum(-1), torch.ones(4, 7, device=GPU), atol=1e-2)
    gpu = beam_search(dec, feats.to(GPU), start=1, end=2, beam_size=3, max_length=10)
    cpu = beam_search(dec.cpu(), feats, start=1, end=2, beam_size=3, max_length=10)
    assert gpu.tokens == cpu.tokens


def test_benchmarks_measure_gpu_memory():
    from capcli.bench.decode import bench_decode
    from capcli.bench.train import bench_train

    row = bench_train("convnext_atto", image_size=64, batch=10, mode="finetune", steps=2, warmup=1, device=GPU,
                      amp="bf16")
    assert row["peak_mem_kind"] == "cuda_max_allocated" and row["peak_mem_mb"] > 0 and row["amp"] == "bf16"
    row = bench_decode("convnext_atto", beam=3, images=8, max_length=8, vocab=100, image_size=64, device=GPU)
    assert row["captions_per_s"] > 0 and row["peak_mem_kind"] == "cuda_max_allocated"


def test_evaluate_and_caption_commands_on_the_gpu(runner, tiny_data, tiny_run, tmp_path):
    from tests.conftest import invoke

    out = tmp_path / "eval.json"
    invoke(runner, ["evaluate", tiny_run, "--data", tiny_data, "--split", "test", "--beam", 2,
                    "--output", out, "--device", "cuda", "-q"])
    assert json.loads(out.read_text())["captions_per_s"] > 0
    from tests.conftest import REPO

    invoke(runner, ["caption", tiny_run, REPO / "examples" / "images", "--device", "cuda", "-q",
                    "--output", tmp_path / "c.json"])
    assert all(r["caption"] is not None for r in json.loads((tmp_path / "c.json").read_text()))
