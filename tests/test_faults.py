"""Faults that cost a night of training, each ending cleanly: kill -9 anywhere then --resume gives
the uninterrupted run's weights and metrics; SIGTERM saves and exits 0; NaN/inf steps are skipped
and counted, too many in a row stop the run with a cause; out of memory names a batch that fits;
a full disk is a one-line error naming the path and the bytes, with what was written kept."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from capcli.config import load_config
from capcli.training.trainer import Trainer, train
from capcli.training.objectives import XEObjective
from tests.conftest import TINY_OVERRIDES, invoke

CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cfg_for(data, runs, *extra):
    return load_config("tiny", [f"data.dir={data}", f"run.dir={runs}", *TINY_OVERRIDES,
                                "data.val_max_images=3", *extra])


def train_cmd(data, runs, name, *extra):
    return [sys.executable, "-m", "capcli", "train", "tiny", f"data.dir={data}", f"run.dir={runs}",
            f"run.name={name}", *TINY_OVERRIDES, "data.val_max_images=3", "run.overwrite=true", *extra,
            "--device", "cpu", "-q"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(recs):  # what a resumed run must reproduce (timings differ)
    keys = ("epoch", "step", "train_loss", "train_top5", "val_loss", "val_top5", "val_bleu4", "val_cider")
    return [{k: r.get(k) for k in keys} for r in recs]


# ------------------------------------------------------------------------------------ kill -9, SIGTERM

@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_run(tiny_data, tmp_path):
    """Killed with SIGKILL at several moments (start-up, mid-epoch, validation, checkpoint
    writes), resumed each time: the weights and the metrics equal an uninterrupted run's."""
    extra = ["train.epochs=3", "train.batch_size=10"]  # 24 steps an epoch
    t0 = time.perf_counter()
    subprocess.run(train_cmd(tiny_data, tmp_path, "full", *extra), env=ENV, check=True, capture_output=True,
                   timeout=300)
    whole = time.perf_counter() - t0  # about 10 s on a quiet 2-core machine; the kills scale with it
    run = tmp_path / "part"
    kills = 0
    for share in (0.3, 0.45, 0.6, 0.75, 0.9):  # of the whole run: import, cache, epochs, validation, saves
        delay = share * whole
        resume = (run / "checkpoints" / "last.pt").is_file()
        cmd = [sys.executable, "-m", "capcli", "train", "--resume", str(run), "--device", "cpu", "-q"] if resume \
            else train_cmd(tiny_data, tmp_path, "part", *extra)
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        break
    else:  # still not finished: let the last resume run to the end
        subprocess.run([sys.executable, "-m", "capcli", "train", "--resume", str(run), "--device", "cpu", "-q"],
                       env=ENV, check=True, capture_output=True, timeout=300)
    assert kills >= 2  # the test did interrupt the run
    assert same_weights(weights(tmp_path / "full" / "checkpoints" / "last.pt"), weights(run / "checkpoints" / "last.pt"))
    assert comparable(records(run)) == comparable(records(tmp_path / "full"))
    assert not list((run / "checkpoints").glob(".*.tmp*"))  # no half-written checkpoint left behind


def test_a_fresh_run_in_a_reused_dir_keeps_nothing_of_the_old_one(tiny_data, tmp_path):
    """run.overwrite=true (or a first attempt killed before its first checkpoint, then started
    again): the new run's records, checkpoints and event files are its own, never appended to."""
    run = tmp_path / "reused"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 99, "train_loss": 9.9}) + "\n")
    (run / "checkpoints" / "best.pt").write_bytes(b"stale")
    (run / "tensorboard" / "events.out.tfevents.1.stale").write_bytes(b"stale")
    subprocess.run(train_cmd(tiny_data, tmp_path, "reused", "train.epochs=1", "log.tensorboard=true"), env=ENV,
                   check=True, capture_output=True, timeout=300)
    recs = records(run)
    assert [(r["epoch"], r["step"]) for r in recs] == [(1, recs[0]["step"])] and recs[0]["step"] != 99
    assert (run / "checkpoints" / "best.pt").read_bytes() != b"stale"
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=False)["step"] == recs[0]["step"]
    assert not (run / "tensorboard" / "events.out.tfevents.1.stale").exists()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_sigterm_saves_last_pt_and_exits_zero(tiny_data, tmp_path):
    """A scheduler's pre-emption: SIGTERM during an epoch ends the run within seconds, exit 0,
    with last.pt saved where it stood; --resume ends where an uninterrupted run ends."""
    extra = ["train.epochs=3", "train.batch_size=5"]  # 48 steps an epoch: the signal lands inside one
    full = subprocess.run(train_cmd(tiny_data, tmp_path, "full", *extra), env=ENV, capture_output=True, timeout=300)
    assert full.returncode == 0
    run = tmp_path / "part"
    proc = subprocess.Popen(train_cmd(tiny_data, tmp_path, "part", *extra), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # epoch 1 done: in epoch 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert time.monotonic() - t0 < 10
    assert "finished (signal)" in out and "--resume" in out
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    subprocess.run([sys.executable, "-m", "capcli", "train", "--resume", str(run), "--device", "cpu", "-q"],
                   env=ENV, check=True, capture_output=True, timeout=300)
    assert same_weights(weights(tmp_path / "full" / "checkpoints" / "last.pt"), weights(run / "checkpoints" / "last.pt"))
    assert comparable(records(run)) == comparable(records(tmp_path / "full"))


# ------------------------------------------------------------------------------------ NaN / inf

def nan_on(monkeypatch, bad_steps: set[int]):
    """The objective's loss becomes NaN on the given (0-based) calls."""
    calls = {"n": 0}
    forward = XEObjective.forward

    def patched(self, batch, tf_ratio=1.0, feats=None):
        out = forward(self, batch, tf_ratio, feats)
        if self.training and calls["n"] in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += self.training
        return out

    monkeypatch.setattr(XEObjective, "forward", patched)


def test_nan_steps_are_skipped_and_counted(tiny_data, tmp_path, monkeypatch):
    nan_on(monkeypatch, {1, 3})
    summary = train(cfg_for(tiny_data, tmp_path, "run.name=nan", "train.epochs=1"), CPU)
    rec = summary["history"][-1]
    assert rec["skipped_steps"] == 2 and rec["step"] == 6
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan" / "checkpoints" / "last.pt").values()
               if v.is_floating_point())
    assert rec["train_loss"] == rec["train_loss"]  # finite: skipped steps are not in the epoch's numbers


def test_too_many_bad_steps_stop_the_run_with_a_cause(runner, tiny_data, tmp_path, monkeypatch):
    nan_on(monkeypatch, set(range(6, 100)))  # fine for the first epoch, then NaN forever
    result = invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=bad",
                             *TINY_OVERRIDES, "train.epochs=3", "train.max_bad_steps=3", "data.val_max_images=3",
                             "--device", "cpu"], code=1)
    assert "NaN/inf for 3 steps in a row" in result.output and "train.lr" in result.output
    assert "Traceback" not in result.output
    kept = torch.load(tmp_path / "bad" / "checkpoints" / "last.pt", weights_only=True)
    assert kept["epoch"] == 1  # the last good checkpoint stays


# ------------------------------------------------------------------------------------ out of memory

def test_out_of_memory_names_a_batch_size_that_fits(runner, tiny_data, tmp_path, monkeypatch):
    forward = XEObjective.forward

    def patched(self, batch, tf_ratio=1.0, feats=None):
        images = batch["captions"].shape[0]
        if images > 2:  # pretend more than two images do not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch, tf_ratio, feats)

    monkeypatch.setattr(XEObjective, "forward", patched)
    result = invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=oom",
                             *TINY_OVERRIDES, "--device", "cpu"], code=1)
    assert "out of memory at train.batch_size=40 (8 images a step)" in result.output
    assert "train.batch_size=10 (2 images) fits" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    monkeypatch.setattr(XEObjective, "forward", forward)
    invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=oom2",
                    *TINY_OVERRIDES, "train.batch_size=10", "--device", "cpu", "-q"])  # and it does


# ------------------------------------------------------------------------------------ disk full

def enospc(path="x"):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_on_a_checkpoint_keeps_the_previous_one(runner, tiny_data, tmp_path, monkeypatch):
    save = torch.save
    calls = {"n": 0}

    def full_disk_on_the_third(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 wrote last.pt and best.pt; epoch 2's last.pt finds the disk full
            raise enospc(f)
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_on_the_third)
    args = ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=disk", *TINY_OVERRIDES,
            "train.epochs=2", "data.val_max_images=3", "--device", "cpu"]
    result = invoke(runner, args, code=1)
    assert "disk full writing" in result.output and "last.pt" in result.output
    assert "MB" in result.output and "--resume" in result.output and "Traceback" not in result.output
    assert torch.load(tmp_path / "disk" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not list((tmp_path / "disk" / "checkpoints").glob(".*.tmp*"))
    monkeypatch.setattr(torch, "save", save)
    invoke(runner, ["train", "--resume", tmp_path / "disk", "--device", "cpu", "-q"])
    full = train(cfg_for(tiny_data, tmp_path, "run.name=full", "train.epochs=2"), CPU)
    assert full["history"][-1]["train_loss"] == records(tmp_path / "disk")[-1]["train_loss"]


def test_disk_full_in_the_feature_cache_continues_on_rerun(runner, tiny_data, tmp_path, monkeypatch):
    import shutil

    import h5py

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("features"))
    setitem = h5py.Dataset.__setitem__
    writes = {"n": 0}

    def fill_up(self, key, value):
        if self.name == "/regions":
            writes["n"] += 1
            if writes["n"] == 2:
                raise enospc(self.file.filename)
        return setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fill_up)
    args = ["train", "tiny", f"data.dir={data}", f"run.dir={tmp_path}", "run.name=c", *TINY_OVERRIDES,
            "model.finetune=false", "data.val_max_images=3", "--device", "cpu"]
    result = invoke(runner, args, code=1)
    assert "disk full writing" in result.output and "train.h5.partial" in result.output
    assert "cached so far are kept" in result.output
    with h5py.File(next((data / "features").glob("*/train.h5.partial"))) as f:
        assert int(f.attrs["done"]) == 32  # the first batch (32 images) stays
    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    events = []
    trainer = Trainer(cfg_for(data, tmp_path, "run.name=c2", "model.finetune=false"), CPU,
                      progress=lambda e, **i: events.append((e, i)))
    trainer.fit()
    assert next(i for e, i in events if e == "cache_step")["done"] == 32  # continued, not redone


def test_disk_full_while_captioning_keeps_the_rows_for_resume(runner, tiny_run, tmp_path, monkeypatch):
    from capcli.caption import RowLog
    from tests.conftest import REPO

    images = REPO / "examples" / "images"
    out = tmp_path / "caps.jsonl"
    append = RowLog.append
    calls = {"n": 0}

    class FullDisk:  # a file whose writes find the disk full
        def __init__(self, path):
            self.path = path

        def write(self, text):
            raise enospc(self.path)

        def flush(self):
            pass

        def close(self):
            pass

    def full_after_one(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's write finds the disk full
            real, self._f = self._f, FullDisk(self.path)
            try:
                return append(self, rows)
            finally:
                self._f = real
        return append(self, rows)

    monkeypatch.setattr(RowLog, "append", full_after_one)
    result = invoke(runner, ["caption", tiny_run, images, "--batch-size", 2, "--output", out, "--device", "cpu"],
                    code=1)
    assert "disk full writing" in result.output and "caps.jsonl" in result.output and "--resume" in result.output
    assert len(out.read_text().splitlines()) == 2  # the first batch's rows
    monkeypatch.setattr(RowLog, "append", append)
    invoke(runner, ["caption", tiny_run, images, "--batch-size", 2, "--output", out, "--resume", "--device", "cpu",
                    "-q"])
    assert len(out.read_text().splitlines()) == len(list(images.glob("*.png")))


def test_disk_full_while_preparing_continues_on_rerun(runner, tmp_path, monkeypatch):
    import h5py

    out = tmp_path / "syn"
    create = h5py.File.__init__
    calls = {"n": 0}

    def full_on_the_second_split(self, name, mode="r", *a, **k):
        if str(name).endswith(".h5.partial") and mode == "w":
            calls["n"] += 1
            if calls["n"] == 2:
                raise enospc(name)
        return create(self, name, mode, *a, **k)

    monkeypatch.setattr(h5py.File, "__init__", full_on_the_second_split)
    result = invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 40, "--size", 32], code=1)
    assert "disk full writing" in result.output and "continues" in result.output
    assert len(list(out.glob("*.h5"))) == 1  # the first split is complete and kept
    monkeypatch.setattr(h5py.File, "__init__", create)
    invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 40, "--size", 32, "--quiet"])
    assert json.loads((out / "manifest.json").read_text())["splits"]
