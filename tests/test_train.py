"""The training recipe as a library: schedules, exact resume (at an epoch boundary and mid-epoch),
whole-run budgets, the feature cache (train and val), two-stage fine-tuning, validation cadence,
TensorBoard files, DDP."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from capcli.config import load_config
from capcli.errors import UserError
from capcli.training.trainer import Trainer, train
from capcli.runtime import resolve_num_workers
from capcli.training.schedules import LRSchedule, tf_ratio
from tests.conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def cfg_for(data, runs, *extra):
    return load_config("tiny", [f"data.dir={data}", f"run.dir={runs}", *TINY_OVERRIDES,
                                "data.val_max_images=3", *extra])


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ schedules

def test_teacher_forcing_ratios_per_step():
    t = load_config("tiny").train
    assert tf_ratio(t, 7, 100) == 1.0  # default: always the ground truth
    assert tf_ratio(load_config("tiny", ["train.teacher_forcing=false"]).train, 7, 100) == 0.0
    assert tf_ratio(load_config("tiny", ["train.teacher_forcing=0.25"]).train, 7, 100) == 0.25
    lin = load_config("tiny", ["train.tf_schedule=linear", "train.tf_start=1.0", "train.tf_end=0.2"]).train
    assert [round(tf_ratio(lin, s, 5), 6) for s in range(5)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    old = load_config("tiny", ["train.teacher_forcing=scheduled", "train.tf_end=0.2"]).train  # as before
    assert [tf_ratio(old, s, 5) for s in range(5)] == [tf_ratio(lin, s, 5) for s in range(5)]
    # Bengio et al. 2015: k / (k + exp(i / k)), rescaled to start at tf_start and approach tf_end
    inv = load_config("tiny", ["train.tf_schedule=inverse_sigmoid", "train.tf_k=10", "train.tf_end=0"]).train
    for step in (0, 5, 30, 80):
        assert tf_ratio(inv, step, 100) == pytest.approx((10 / (10 + math.exp(step / 10))) / (10 / 11))
    auto = load_config("tiny", ["train.tf_schedule=inverse_sigmoid", "train.tf_end=0"]).train
    assert tf_ratio(auto, 0, 1000) == pytest.approx(1.0)
    assert tf_ratio(auto, 500, 1000) == pytest.approx(0.5, abs=1e-6)  # midway at mid-run (tf_k: 0)
    ratios = [tf_ratio(auto, s, 1000) for s in range(0, 1000, 50)]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))


@pytest.mark.parametrize("override, needle", [
    ("train.teacher_forcing=1.5", "train.teacher_forcing"),
    ("train.teacher_forcing=sometimes", "train.teacher_forcing"),
    ("train.tf_schedule=cosine", "constant, linear, inverse_sigmoid"),
    ("train.lr_schedule=cosin", "Did you mean 'cosine'"),
    ("train.tf_end=-0.1", "train.tf_end"),
    ("train.lr=-1e-3", "train.lr must be positive"),
    ("train.val_every=0", "train.val_every"),
    ("train.val_every=fortnightly", "train.val_every"),
    ("train.finetune_after=2", "train.finetune_after"),  # tiny has 1 epoch: no fine-tuning would remain
    ("data.num_workers=-2", "data.num_workers"),
])
def test_bad_schedule_values_are_one_line_errors(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config("tiny", ["train.epochs=1", override])


def test_tf_schedule_needs_the_default_teacher_forcing():
    with pytest.raises(UserError, match="tf_start"):
        load_config("tiny", ["train.tf_schedule=linear", "train.teacher_forcing=0.5"])


def _optimizer(lrs=(1e-3, 1e-4)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def test_cosine_with_warmup_per_group():
    t = load_config("tiny", ["train.lr_schedule=cosine", "train.warmup_steps=4", "train.min_lr_ratio=0.1"]).train
    opt = _optimizer()
    sched = LRSchedule(t, opt, total_steps=104)
    got = []
    for step in (0, 3, 4, 54, 104):
        sched.step(step)
        got.append([g["lr"] for g in opt.param_groups])
    assert got[0] == pytest.approx([1e-3 / 4, 1e-4 / 4])  # warm-up from 1/4
    assert got[1] == pytest.approx([1e-3, 1e-4])  # warm-up done
    assert got[2] == pytest.approx([1e-3, 1e-4])  # cosine starts at the full rate
    assert got[3] == pytest.approx([1e-3 * 0.55, 1e-4 * 0.55])  # half-way: 0.1 + 0.9 * 0.5
    assert got[4] == pytest.approx([1e-4, 1e-5])  # the floor: min_lr_ratio


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_a_budget_bounds_the_decay_by_time_and_a_stage_has_its_own_schedule(kind):
    """With a time budget the decay reaches its floor as the seconds it spans pass, however few
    steps that is; a stage starting at step 100 warms up from there; the seconds used survive a
    checkpoint."""
    t = load_config("tiny", [f"train.lr_schedule={kind}", "train.min_lr_ratio=0.1"]).train
    opt = _optimizer()
    sched = LRSchedule(t, opt, total_steps=10_000, seconds=60.0)
    half = 0.1 + 0.9 * (0.5 if kind == "cosine" else 0.5)  # both shapes are at 0.55 half-way
    for used, factor in ((0.0, 1.0), (30.0, half), (60.0, 0.1), (90.0, 0.1)):
        sched.used = used
        sched.step(0)  # the first of 10,000 steps: by steps alone the rate would not have moved
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor, 1e-4 * factor])
    sched.used = 15.0
    sched.step(0)
    quarter = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi / 4)) if kind == "cosine" else 0.75)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * quarter)
    again = LRSchedule(t, _optimizer(), total_steps=10_000)
    again.load_state_dict(sched.state_dict())
    assert (again.seconds, again.used) == (60.0, 15.0)
    stage = LRSchedule(t, _optimizer(), total_steps=50, warmup=10, start_step=100)
    stage.step(100)
    assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 10)  # the stage's first step
    stage.step(109)
    assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # warmed up, decay not begun
    stage.step(150)
    assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # its 50 steps: the floor


def test_plateau_cuts_the_rates_after_patience_and_survives_a_checkpoint():
    t = load_config("tiny", ["train.lr_schedule=plateau"]).train  # x0.8 after 8 bad validations
    opt = _optimizer()
    sched = LRSchedule(t, opt, total_steps=10)
    cuts = [sched.validated(improved) for improved in [True] + [False] * 16]
    assert cuts.count(True) == 2 and cuts[8] and cuts[16]
    sched.step(0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.64, 1e-4 * 0.64])
    again = LRSchedule(t, _optimizer(), total_steps=10)
    again.load_state_dict(sched.state_dict())
    assert again.scale == sched.scale and again.bad == sched.bad
    assert sched.validated(True) is False and sched.bad == 0


def test_num_workers_auto_fits_the_cpus(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_num_workers("auto") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_num_workers("auto") == 8
    assert resolve_num_workers(3) == 3


# ------------------------------------------------------------------------------------ resume

def test_exact_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    full = train(cfg_for(tiny_data, tmp_path, "run.name=full", "train.epochs=2"), CPU)
    part = cfg_for(tiny_data, tmp_path, "run.name=part", "train.epochs=2")
    part.train.epochs = 1
    train(part, CPU)
    ckpt_path = tmp_path / "part" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"]["train"]["epochs"] = 2  # as if the run had been stopped after epoch 1 of 2
    torch.save(ckpt, ckpt_path)
    resumed = train(None, CPU, resume=tmp_path / "part")
    assert resumed["epochs_run"] == 1 and full["epochs_run"] == 2
    assert_same_weights(weights(tmp_path / "full" / "checkpoints" / "last.pt"), weights(ckpt_path))
    assert [r["epoch"] for r in records(tmp_path / "part")] == [1, 2]
    assert records(tmp_path / "part")[1]["train_loss"] == records(tmp_path / "full")[1]["train_loss"]


def test_resume_from_the_middle_of_an_epoch_is_exact(tiny_data, tmp_path):
    """A run stopped mid-epoch (here by SIGTERM after step 2 of 3) resumes with the rest of the same
    epoch order and ends with the weights of an uninterrupted run, under scheduled teacher forcing
    and a cosine learning rate."""
    extra = ["train.epochs=2", "train.tf_schedule=linear", "train.tf_end=0.3", "train.lr_schedule=cosine",
             "train.warmup_steps=2"]
    full = train(cfg_for(tiny_data, tmp_path, "run.name=full", *extra), CPU)
    trainer = Trainer(cfg_for(tiny_data, tmp_path, "run.name=part", *extra), CPU)

    def stop_after_two(event, **info):
        if event == "step" and info["epoch"] == 1 and info["step"] == 2:
            trainer.signals.received = "SIGTERM"  # what the signal handler does

    trainer.emit = stop_after_two
    stopped = trainer.fit()
    assert stopped["stop_reason"] == "signal"
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 2)
    resumed = train(None, CPU, resume=tmp_path / "part")
    assert resumed["stop_reason"] == "epochs"
    assert_same_weights(weights(tmp_path / "full" / "checkpoints" / "last.pt"),
                        weights(tmp_path / "part" / "checkpoints" / "last.pt"))
    a, b = records(tmp_path / "full")[-1], records(tmp_path / "part")[-1]
    for key in ("train_loss", "train_top5", "val_bleu4", "lr", "tf_ratio", "step"):
        assert a[key] == b[key], key
    assert full["history"][-1]["epoch"] == 2


# ------------------------------------------------------------------------------------ budgets

def test_budget_covers_the_whole_run_and_ends_validated(tiny_data, tmp_path):
    """A budget too small for one epoch: the run stops stepping early, validates what it has,
    writes last.pt and best.pt, and ends within the budget; --resume continues the same epoch."""
    cfg = cfg_for(tiny_data, tmp_path, "run.name=budget", "train.epochs=2", "train.max_minutes=0.2")
    trainer = Trainer(cfg, CPU)
    trainer.budget.clock = lambda: time.perf_counter() + 2.0 * trainer.step  # each step costs 2 s more
    summary = trainer.fit()
    assert summary["stop_reason"] == "max_minutes"
    assert 0 < trainer.step < trainer.steps_per_epoch  # stopped inside the first epoch
    assert trainer.budget.elapsed() <= 12.0  # inside the budget on its clock
    run = tmp_path / "budget"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    rec = records(run)[-1]
    assert "val_bleu4" in rec and 0 < rec["epoch"] < 1
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] == trainer.step
    ckpt["config"]["train"]["max_minutes"] = 0.0
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    assert train(None, CPU, resume=run)["stop_reason"] == "epochs"
    assert records(run)[-1]["epoch"] == 2


def test_budget_counts_the_feature_cache(tiny_data, tmp_path):
    """The cache pass is inside the budget: spent there, the run stops before training and the
    next run continues the partial cache instead of starting over."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("features"))
    cfg = cfg_for(data, tmp_path, "run.name=c", "model.finetune=false", "train.max_minutes=1e-6")
    summary = train(cfg, CPU)
    assert summary["stop_reason"] == "max_minutes" and summary["epochs_run"] == 0
    partial = list((data / "features").glob("*/train.h5.partial"))
    assert len(partial) == 1
    import h5py

    with h5py.File(partial[0]) as f:
        done = int(f.attrs["done"])
    assert 0 < done < 48
    messages = []
    train(cfg_for(data, tmp_path, "run.name=c2", "model.finetune=false"), CPU,
          progress=lambda e, **i: messages.append((e, i)))
    first = next(i for e, i in messages if e == "cache_step")
    assert first["done"] == done  # continued where it stopped
    assert list((data / "features").glob("*/train.h5")) and not list((data / "features").glob("*/*.partial"))


# ------------------------------------------------------------------------------------ frozen, two stages

def test_frozen_encoder_caches_train_and_val_features(tiny_data, tmp_path):
    from capcli.data.dataset import CaptionDataset
    from capcli.decode import DecodeOptions
    from capcli.evaluate import evaluate_model
    from capcli.api import load_model

    cached = train(cfg_for(tiny_data, tmp_path, "run.name=cached", "model.finetune=false"), CPU)
    plain = train(cfg_for(tiny_data, tmp_path, "run.name=plain", "model.finetune=false",
                          "train.cache_features=false"), CPU)
    folder = next((tiny_data / "features").glob("convnext_atto-*"))
    assert (folder / "train.h5").is_file() and (folder / "val-first3.h5").is_file()
    import h5py

    model, *_ = load_model(tmp_path / "cached" / "checkpoints" / "last.pt")
    ds = CaptionDataset(tiny_data, "train")
    with h5py.File(folder / "train.h5") as f, torch.no_grad():
        regions = torch.from_numpy(f["regions"][:4]).float()
        direct = model.encoder.regions(torch.stack([ds[i]["image"] for i in range(4)]))
    torch.testing.assert_close(regions, direct, rtol=2e-3, atol=2e-3)  # float16 on disk
    # the same training and validation, up to float16 rounding of the features
    a, b = cached["history"][0], plain["history"][0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-2)
    val = CaptionDataset(tiny_data, "val", max_images=3)
    with_cache = evaluate_model(model, val, CPU, DecodeOptions(beam_size=1), features=folder / "val-first3.h5", meteor=False)
    without = evaluate_model(model, val, CPU, DecodeOptions(beam_size=1), meteor=False)
    assert with_cache["loss"] == pytest.approx(without["loss"], rel=1e-2)


def test_finetune_after_trains_frozen_then_the_encoder(tiny_data, tmp_path):
    from capcli.models.captioner import CaptionModel

    cfg = cfg_for(tiny_data, tmp_path, "run.name=two", "train.epochs=2", "train.finetune_after=1",
                  "model.finetune_stages=1")
    torch.manual_seed(cfg.seed)
    start = CaptionModel(cfg.model, 10).encoder.backbone.state_dict()
    events = []
    trainer = Trainer(cfg, CPU, progress=lambda e, **i: events.append(e))
    trainer.cfg.train.epochs = 1  # stop after the frozen epoch, to look at it
    trainer.fit()
    after_one = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    enc = {k[len("encoder.backbone."):]: v for k, v in after_one["model"].items() if k.startswith("encoder.backbone.")}
    assert_same_weights(start, enc)  # frozen for the first epoch
    assert len(after_one["optimizer"]["param_groups"]) == 1
    after_one["config"]["train"]["epochs"] = 2
    torch.save(after_one, tmp_path / "two" / "checkpoints" / "last.pt")
    events.clear()
    train(None, CPU, resume=tmp_path / "two", progress=lambda e, **i: events.append(e))
    assert "stage" in events  # the encoder was unfrozen at epoch 2
    final = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    groups = final["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["decoder", "encoder"] and groups[1]["lr"] == cfg.train.encoder_lr
    changed = {k for k, v in final["model"].items()
               if k.startswith("encoder.backbone.") and not torch.equal(v, start[k[len("encoder.backbone."):]])}
    assert changed and all(k.startswith("encoder.backbone.stages.3.") for k in changed)  # its last stage only


# ------------------------------------------------------------------------------------ cadence, logs

def test_validation_every_n_steps_and_at_the_end(tiny_data, tmp_path):
    summary = train(cfg_for(tiny_data, tmp_path, "run.name=steps", "train.val_every=4 steps", "train.epochs=2"), CPU)
    recs = records(tmp_path / "steps")
    validated = [(r["step"], r["epoch"]) for r in recs if "val_bleu4" in r]
    assert validated == [(4, pytest.approx(4 / 6, abs=1e-3)), (8, pytest.approx(1 + 2 / 6, abs=1e-3)), (12, 2)]
    assert [r["epoch"] for r in recs if "val_bleu4" not in r] == [1]  # epoch 1 ended between validations
    assert summary["epochs_run"] == 2


def test_tensorboard_event_files(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cfg_for(tiny_data, tmp_path, "run.name=tb", "log.tensorboard=true", "train.epochs=2"), CPU)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/bleu4", "val/cider", "val/top5", "lr/decoder", "train/tf_ratio",
            "train/samples_per_s"} <= tags
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [6, 12]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in records(tmp_path / "tb")], rel=1e-6)


def test_results_png_draws_each_validation(tiny_data, tmp_path):
    """results.png holds the run's curves, redrawn at each validation: a point of every series
    that has a value (colours of capcli.training.curves.PANELS), and missing values left out."""
    from PIL import Image

    from capcli.training.curves import PANEL_H, PANEL_W, PANELS, draw_curves

    train(cfg_for(tiny_data, tmp_path, "run.name=png", "train.epochs=2"), CPU)
    img = Image.open(tmp_path / "png" / "results.png")
    assert img.format == "PNG" and img.size == (4 * PANEL_W, 2 * PANEL_H)  # against epochs, then minutes
    colours = {c for _, series, _ in PANELS for key, _, c in series if key != "train_reward"}  # no scst here
    assert colours <= {c for _, c in img.getcolors(1 << 20)}  # every series drawn
    blank = draw_curves([{"epoch": 1, "train_loss": float("nan"), "val_bleu4": None}], tmp_path / "blank.png")
    assert not colours & {c for _, c in Image.open(blank).getcolors(1 << 20)}  # nothing to draw, no crash


def test_results_png_marks_the_switch_to_scst_and_learning_rate_changes(tmp_path):
    """The curves against epochs (top row) and minutes (bottom row): the sampled reward of
    self-critical rows is drawn, their policy loss is not, and the switch (a dashed line) and each
    change of the learning rate (a triangle) are marked in both rows."""
    from PIL import Image

    from capcli.training.curves import LR_COLOUR, PANEL_H, PANELS, SWITCH_COLOUR, draw_curves, lr_changes, switch_index

    def row(epoch, objective, lr, **values):
        return {"epoch": epoch, "elapsed_s": 120.0 * epoch, "objective": objective, "lr": lr, "val_cider": 0.4 + epoch / 10,
                "val_bleu4": 0.15, "val_loss": 3.0, "val_top5": 0.6, "train_top5": 0.6, **values}

    records = [row(1, "xe", 4e-4, train_loss=3.5), row(2, "xe", 2e-4, train_loss=3.2),
               row(2.5, "scst", 1e-4, train_loss=-0.02, train_reward=0.3), row(3, "scst", 1e-4, train_loss=0.01, train_reward=0.35)]
    assert switch_index(records) == 2 and lr_changes(records) == [1, 2]
    img = Image.open(draw_curves(records, tmp_path / "r.png")).convert("RGB")
    reward = next(c for key, _, c in PANELS[3][1] if key == "train_reward")
    loss = PANELS[0][1][0][2]
    for half in (img.crop((0, 0, img.width, PANEL_H)), img.crop((0, PANEL_H, img.width, 2 * PANEL_H))):
        colours = {c for _, c in half.getcolors(1 << 20)}
        assert {SWITCH_COLOUR, LR_COLOUR, reward, loss} <= colours
    # the policy losses are left out: without them the picture is the same
    bare = draw_curves([{k: v for k, v in r.items() if not (k == "train_loss" and r["objective"] == "scst")}
                        for r in records], tmp_path / "bare.png")
    assert Image.open(bare).convert("RGB").tobytes() == img.tobytes()
    xe_only = draw_curves(records[:2], tmp_path / "xe.png")
    assert SWITCH_COLOUR not in {c for _, c in Image.open(xe_only).convert("RGB").getcolors(1 << 20)}


def test_tensorboard_missing_is_a_one_line_error_before_any_work(runner, tiny_data, tmp_path, monkeypatch):
    """tensorboard is an optional extra: without it, log.tensorboard=true stops at once with the
    install command, and no run dir is made."""
    import sys

    from tests.conftest import invoke

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as when it is missing
    result = invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=notb",
                             *TINY_OVERRIDES, "log.tensorboard=true", "--device", "cpu"], code=1)
    assert 'pip install "capcli[tensorboard]"' in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "notb").exists()


# ------------------------------------------------------------------------------------ DDP

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
    lines = records(tmp_path / "ddp")
    assert [r["epoch"] for r in lines] == [1, 2]
    # each rank takes half of the training images (padded to an even split), 8 images (40 pairs) a step
    n = json.loads((tiny_data / "manifest.json").read_text())["splits"]["train"]["images"]
    assert lines[0]["step"] == -(-(-(-n // 2)) // 8)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
