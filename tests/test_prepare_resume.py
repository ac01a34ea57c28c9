"""Kill-and-resume: a rerun with the same arguments continues and ends with the same files as an
uninterrupted run; a finished dataset is not redone; other arguments are refused unless --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from capcli.data import h5writer, parallel, prepare as prep
from capcli.data.records import load_file_image
from capcli.data.sources import folder_records
from capcli.errors import UserError
from tests.conftest import invoke

FILES = ("manifest.json", "vocab.json", "skipped.json")


def make_folder(root: Path, n: int, bad: int = 3) -> Path:
    """n small JPEGs with 2 captions each (plus ``bad`` broken ones) and a captions.csv."""
    img = root / "img"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = "red green blue dog cat bird tree car street man woman sits runs on a the with".split()
    rows = ["image,caption"]
    for i in range(n):
        name = f"im{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(img / name)
        for _ in range(2):
            rows.append(f"{name},{' '.join(rng.choice(words, 6))}.")
    for j in range(bad):
        (img / f"bad{j}.jpg").write_bytes(b"garbage" * (j + 1))
        rows.append(f"bad{j}.jpg,a broken file")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def assert_same_dataset(a: Path, b: Path) -> None:
    for name in FILES:
        ja, jb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
        assert ja == jb, name
    for split in json.loads((a / "manifest.json").read_text())["splits"]:
        with h5py.File(a / f"{split}.h5") as fa, h5py.File(b / f"{split}.h5") as fb:
            assert set(fa) == set(fb) and dict(fa.attrs) == dict(fb.attrs)
            for key in fa:
                assert fa[key].shape == fb[key].shape, key
                assert np.array_equal(fa[key][()], fb[key][()]), key
            assert fa["images"].chunks == (1,) + fa["images"].shape[1:]
    leftovers = sorted(p.name for p in b.iterdir() if p.suffix in (".partial",) or p.name.endswith(
        ".progress.json") or p.name == prep.STATE_FILE)
    assert leftovers == []


def _write(recs, out, **kw):
    return prep.write_dataset(recs, out, source="folder", image_size=16, min_word_freq=1, **kw)


def test_interrupted_run_resumes_to_identical_files(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "src", 90)
    recs = lambda: folder_records(data / "img", data / "captions.csv")  # noqa: E731
    _write(recs(), tmp_path / "clean", workers=2)

    monkeypatch.setattr(h5writer, "FLUSH_RECORDS", 7)
    calls = []

    def boom(split, done, total):
        calls.append((split, done))
        if split == "train" and done >= 40:
            raise KeyboardInterrupt

    monkeypatch.setattr(h5writer, "FLUSH_SECONDS", 0.0)  # flush after every record, progress every 0.1 s
    with pytest.raises(KeyboardInterrupt):
        _write(recs(), tmp_path / "run", workers=2, progress=boom)
    progress = json.loads((tmp_path / "run" / "train.progress.json").read_text())
    assert 0 < progress["processed"] < 90 and not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setattr(h5writer, "FLUSH_SECONDS", 2.0)
    seen = []
    manifest = _write(recs(), tmp_path / "run", workers=0, progress=lambda s, d, t: seen.append((s, d)))
    assert manifest["resumed"]["train"] == progress["processed"]
    assert seen[0] == ("train", progress["processed"])  # the bar starts where the last run stopped
    assert_same_dataset(tmp_path / "clean", tmp_path / "run")


def test_unreadable_partial_file_starts_the_split_again(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "src", 30, bad=1)
    recs = lambda: folder_records(data / "img", data / "captions.csv")  # noqa: E731
    _write(recs(), tmp_path / "clean")
    monkeypatch.setattr(h5writer, "FLUSH_SECONDS", 0.0)

    def boom(split, done, total):
        if done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(recs(), tmp_path / "run", progress=boom)
    (tmp_path / "run" / "train.h5.partial").write_bytes(b"\0" * 100)  # e.g. a disk that lost it
    _write(recs(), tmp_path / "run")
    assert_same_dataset(tmp_path / "clean", tmp_path / "run")


def test_finished_is_not_redone_and_other_arguments_are_refused(tmp_path):
    data = make_folder(tmp_path / "src", 12, bad=0)
    recs = lambda: folder_records(data / "img", data / "captions.csv")  # noqa: E731
    out = tmp_path / "out"
    _write(recs(), out)
    stamp = (out / "train.h5").stat().st_mtime_ns
    again = _write(recs(), out)
    assert again["reused"] and (out / "train.h5").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"finished dataset made differently \(image_size 16 -> 24\).*--overwrite"):
        prep.write_dataset(recs(), out, source="folder", image_size=24, min_word_freq=1)
    manifest = prep.write_dataset(recs(), out, source="folder", image_size=24, min_word_freq=1, overwrite=True)
    assert not manifest.get("reused") and manifest["image_size"] == 24
    with h5py.File(out / "train.h5") as f:
        assert f["images"].shape[-1] == 24


def test_unfinished_run_with_other_arguments_is_refused(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "src", 20, bad=0)
    recs = lambda: folder_records(data / "img", data / "captions.csv")  # noqa: E731

    def boom(split, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(recs(), tmp_path / "out", progress=boom)
    with pytest.raises(UserError, match=r"unfinished `prepare` with other arguments \(captions_per_image 5 -> 3\)"):
        _write(recs(), tmp_path / "out", captions_per_image=3)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "train.h5").write_bytes(b"")
    with pytest.raises(UserError, match="no `prepare` state describes"):
        _write(recs(), tmp_path / "stale")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg: look for live members
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, runner):
    data = make_folder(tmp_path / "src", 150)
    args = ["prepare", "folder", "--images", data / "img", "--captions", data / "captions.csv",
            "--size", 16, "--min-word-freq", 1, "--workers", 2, "-q"]
    invoke(runner, [*args, "--out", tmp_path / "clean"])

    out = tmp_path / "killed"
    env = {**os.environ, parallel.TEST_DELAY_ENV: "0.04"}
    proc = subprocess.Popen([sys.executable, "-m", "capcli", *map(str, args), "--out", str(out)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        progress_file = out / "train.progress.json"
        while time.time() < deadline and proc.poll() is None:
            if progress_file.is_file() and json.loads(progress_file.read_text())["processed"] > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must die with it
        proc.wait(10)
        deadline = time.time() + 10
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "decoding workers outlived the killed prepare"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = json.loads(progress_file.read_text())["processed"]
    assert 0 < done < 150 and not (out / "manifest.json").exists()

    result = invoke(runner, [*args[:-1], "--out", out])
    assert "continued an interrupted run" in " ".join(result.output.split())
    assert_same_dataset(tmp_path / "clean", out)
    result = invoke(runner, [*args[:-1], "--out", out])
    assert "already prepared" in " ".join(result.output.split())


def test_synthetic_cli_refuses_other_arguments_unless_overwrite(tmp_path, runner):
    out = tmp_path / "syn"
    invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 12, "--size", 32, "-q"])
    result = invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 15, "--size", 32, "-q"], code=1)
    assert "images 12 -> 15" in " ".join(result.output.split()) and "--overwrite" in result.output
    invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 15, "--size", 32, "-q", "--overwrite"])
    assert sum(s["images"] for s in json.loads((out / "manifest.json").read_text())["splits"].values()) == 15


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_a_dead_decoding_worker_stops_prepare_instead_of_hanging(tmp_path, runner):
    data = make_folder(tmp_path / "src", 150)
    args = ["prepare", "folder", "--images", data / "img", "--captions", data / "captions.csv",
            "--size", 16, "--min-word-freq", 1, "--workers", 2, "-q"]
    out = tmp_path / "crashed"
    env = {**os.environ, parallel.TEST_DELAY_ENV: "0.04"}
    proc = subprocess.Popen([sys.executable, "-m", "capcli", *map(str, args), "--out", str(out)], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            progress_file = out / "train.progress.json"
            if progress_file.is_file() and json.loads(progress_file.read_text())["processed"] > 0:
                break
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert proc.poll() is None and workers, "prepare ended before a worker could be killed"
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer or a codec segfault does
        stdout, stderr = proc.communicate(timeout=60)  # no hang
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 1
    assert "decoding worker died" in " ".join((stdout + stderr).split())
    assert "Traceback" not in stdout + stderr
    # and the rerun resumes to a complete dataset
    invoke(runner, [*args[:-1], "--out", out])
    assert (out / "manifest.json").is_file()


def _dies_at(victim: str, source, size: int, policy: str):
    """A loader whose process dies at one image, as under the OOM killer (after a moment, so that
    the images before it are written first)."""
    if str(source) == victim:
        time.sleep(0.5)
        os._exit(3)
    return load_file_image(source, size, policy)


def test_a_worker_that_dies_mid_run_is_a_one_line_error_and_a_rerun_resumes(tmp_path, monkeypatch):
    from functools import partial

    data = make_folder(tmp_path / "src", 90)
    recs = lambda: folder_records(data / "img", data / "captions.csv")  # noqa: E731
    _write(recs(), tmp_path / "clean")
    victim = str([r for r in recs() if r.split == "train"][40].source)
    monkeypatch.setattr(h5writer, "FLUSH_SECONDS", 0.0)  # flush after every record
    t0 = time.monotonic()
    with pytest.raises(parallel.WorkerDied) as died:
        _write(recs(), tmp_path / "run", workers=2, loader=partial(_dies_at, victim))
    assert time.monotonic() - t0 < 30  # no hang
    assert "decoding worker died" in str(died.value) and "\n" not in str(died.value)
    done = json.loads((tmp_path / "run" / "train.progress.json").read_text())["processed"]
    assert 0 < done <= 40
    monkeypatch.setattr(h5writer, "FLUSH_SECONDS", 2.0)
    manifest = _write(recs(), tmp_path / "run", workers=2)
    assert manifest["resumed"]["train"] == done
    assert_same_dataset(tmp_path / "clean", tmp_path / "run")
