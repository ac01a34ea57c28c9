"""The training loop as a library: teacher-forcing schedule, budget stop + resume, exact resume,
frozen encoder."""

from __future__ import annotations

import json

import pytest
import torch

from capcli.config import load_config
from capcli.train import tf_ratio, train
from tests.conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def cfg_for(data, runs, *extra):
    return load_config("tiny", [f"data.dir={data}", f"run.dir={runs}", *TINY_OVERRIDES,
                                "data.val_max_images=3", *extra])


def test_teacher_forcing_schedule():
    cfg = load_config("tiny", ["train.epochs=5", "train.teacher_forcing=scheduled",
                               "train.tf_start=1.0", "train.tf_end=0.2"])
    assert [round(tf_ratio(cfg, e), 6) for e in range(5)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert tf_ratio(load_config("tiny", ["train.teacher_forcing=false"]), 3) == 0.0
    assert tf_ratio(load_config("tiny"), 3) == 1.0


def test_exact_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    full = train(cfg_for(tiny_data, tmp_path, "run.name=full", "train.epochs=2"), CPU)
    # first epoch only, then continue the same run to 2 epochs via --resume
    part = cfg_for(tiny_data, tmp_path, "run.name=part", "train.epochs=2")
    part.train.epochs = 1
    train(part, CPU)
    ckpt_path = tmp_path / "part" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"]["train"]["epochs"] = 2  # as if the run had been stopped after epoch 1 of 2
    torch.save(ckpt, ckpt_path)
    resumed = train(None, CPU, resume=tmp_path / "part")
    assert resumed["epochs_run"] == 1 and full["epochs_run"] == 2
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ckpt_path, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_wall_clock_budget_stops_cleanly_and_resumes(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path, "run.name=budget", "train.epochs=2", "train.max_minutes=0.00001")
    summary = train(cfg, CPU)
    assert summary["stop_reason"] == "max_minutes" and summary["epochs_run"] == 0
    ckpt = torch.load(tmp_path / "budget" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 1  # one step done, the epoch to be rerun
    ckpt["config"]["train"]["max_minutes"] = 0.0
    torch.save(ckpt, tmp_path / "budget" / "checkpoints" / "last.pt")
    summary = train(None, CPU, resume=tmp_path / "budget")
    assert summary["stop_reason"] == "epochs" and summary["epochs_run"] == 2
    assert torch.load(tmp_path / "budget" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_frozen_encoder_does_not_change(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path, "run.name=frozen", "model.finetune=false")
    from capcli.models.captioner import Captioner

    torch.manual_seed(cfg.seed)
    before = Captioner(cfg.model, 10).encoder.state_dict()
    train(cfg, CPU)
    ckpt = torch.load(tmp_path / "frozen" / "checkpoints" / "last.pt", weights_only=True)
    enc = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    for key, value in before.items():
        if key.startswith("feature_norm."):  # learns with the decoder
            continue
        torch.testing.assert_close(enc[key], value, rtol=0, atol=0, msg=key)
    assert len(ckpt["optimizer"]["param_groups"]) == 1  # decoder only


@pytest.mark.parametrize("mode", ["false", "scheduled"])
def test_free_running_and_scheduled_training_run(tiny_data, tmp_path, mode):
    summary = train(cfg_for(tiny_data, tmp_path, f"run.name={mode}", f"train.teacher_forcing={mode}",
                            "train.tf_end=0.5"), CPU)
    record = summary["history"][0]
    assert record["tf_ratio"] == (0.0 if mode == "false" else 1.0)
    assert record["train_loss"] > 0


def test_frozen_encoder_feature_cache(tiny_data, tmp_path):
    from capcli.data.dataset import CaptionDataset
    from capcli.models.captioner import captioner_from_checkpoint

    cached = train(cfg_for(tiny_data, tmp_path, "run.name=cached", "model.finetune=false"), CPU)
    plain = train(cfg_for(tiny_data, tmp_path, "run.name=plain", "model.finetune=false",
                          "train.cache_features=false"), CPU)
    model, *_ = captioner_from_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt")
    files = list((tiny_data / "features").glob("convnext_atto-*/train.h5"))
    assert len(files) == 1
    import h5py

    ds = CaptionDataset(tiny_data, "train")
    with h5py.File(files[0]) as f, torch.no_grad():
        regions = torch.from_numpy(f["regions"][:4]).float()
        direct = model.encoder.regions(torch.stack([ds[i]["image"] for i in range(4)]))
    torch.testing.assert_close(regions, direct, rtol=2e-3, atol=2e-3)  # float16 on disk
    # the same training, up to float16 rounding of the features
    assert cached["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], rel=1e-2)


def test_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    """DDP through torchrun with the gloo backend: two ranks share the epoch, rank 0 writes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "capcli", "train",
           "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=ddp", *TINY_OVERRIDES,
           "train.epochs=2", "data.val_max_images=3", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("finished (epochs)") == 1  # only rank 0 reports
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    # each rank takes half of the training images (DistributedSampler pads to an even split),
    # 8 images (40 pairs) a step
    n = json.loads((tiny_data / "manifest.json").read_text())["splits"]["train"]["images"]
    assert lines[0]["step"] == -(-(-(-n // 2)) // 8)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
