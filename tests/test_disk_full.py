"""A real full disk: each writing command, run on a tmpfs too small for its output, ends with exit
status 1 and one line naming the file (never a traceback or a crash), keeps what it wrote, and
continues from there once there is room.

The tmpfs is mounted for each test (Linux, as root: CI runs so); elsewhere the tests are skipped.
tests/test_faults.py simulates ENOSPC in Python; these meet HDF5's and torch's own writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, TINY_OVERRIDES

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MESSAGE = re.compile(r"Error: disk full writing (\S+): it needs about [\d.]+ \w+, [\d.]+ \w+ free there; ")
MB = 1 << 20


class Tmpfs:
    """A tmpfs mounted at ``path``: :meth:`resize` it (a remount keeps its files), or :meth:`fill`
    it but for ``leave`` bytes with a file that :meth:`make_room` deletes."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def _mount(self, *args: str) -> None:
        subprocess.run(["mount", *args, str(self.path)], check=True, capture_output=True, text=True, timeout=30)

    def mount(self, size: int) -> None:
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs")

    def resize(self, size: int) -> None:
        self._mount("-o", f"remount,size={size}")

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, leave: int) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, self.free() - leave)
        finally:
            os.close(fd)

    def make_room(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path):
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs Linux and root")
    disk = Tmpfs(tmp_path / "disk")
    disk.path.mkdir()
    try:
        disk.mount(MB)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(exc, 'stderr', None) or exc}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk.path)], capture_output=True, timeout=30)


def capcli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capcli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)


def disk_full_path(result: subprocess.CompletedProcess) -> str:
    """The path the one-line disk-full error names, once checked that it is the only error, with
    exit status 1, no traceback and no crash."""
    out = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}\n{out}"
    for sign in ("Traceback", "Exception ignored", "Segmentation fault", "Fatal Python error"):
        assert sign not in out, out
    errors = [line for line in out.splitlines() if "Error:" in line]
    assert len(errors) == 1, out
    found = MESSAGE.match(errors[0].strip())
    assert found, errors[0]
    return found.group(1)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_prepare_on_a_full_disk_keeps_the_flushed_images_and_continues(disk):
    disk.resize(2 * MB)  # 800 training images of 3 KB: full after the first flush (512 records)
    out = disk.path / "syn"
    args = ["prepare", "synthetic", "--out", out, "--images", 1000, "--size", 32, "-q"]
    assert disk_full_path(capcli(*args)) == str(out / "train.h5")
    progress = json.loads((out / "train.progress.json").read_text())
    assert 0 < progress["kept"] < 800 and (out / "train.h5.partial").is_file()

    disk.resize(16 * MB)
    result = ok(capcli(*args))
    assert f"already done: train {progress['processed']}" in " ".join(result.stderr.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 800
    with h5py.File(out / "train.h5") as f:
        assert f["images"].shape == (800, 3, 32, 32) and f.attrs["complete"]


def test_feature_cache_on_a_full_disk_keeps_what_it_cached_and_continues(disk, tmp_path):
    disk.resize(16 * MB)
    data = disk.path / "data"
    ok(capcli("prepare", "synthetic", "--out", data, "--images", 200, "--size", 64, "-q"))
    # 160 training images of 2x2 regions (2.5 KB each, 80 KB a batch of 32): the room the cache file
    # asks for when it is made (about 105 KB) and a little more, so that a few batches fit
    disk.fill(leave=260 << 10)
    args = ["train", "tiny", f"data.dir={data}", f"run.dir={tmp_path / 'runs'}", "run.name=c", *TINY_OVERRIDES,
            "model.grid=2", "model.finetune=false", "data.val_max_images=3", "--device", "cpu", "-q"]
    path = Path(disk_full_path(capcli(*args)))
    assert path.name == "train.h5.partial" and path.parent.parent == data / "features"
    disk.make_room()
    with h5py.File(path, "r+") as f:
        done = int(f.attrs["done"])
        assert 0 < done < 160
        f["regions"][0] = 7.0  # a mark: the rerun must keep the cached images, not encode them again

    ok(capcli(*args))
    with h5py.File(path.with_name("train.h5")) as f:
        assert f.attrs["complete"] and int(f.attrs["done"]) == 160
        assert np.all(f["regions"][0] == 7.0) and not np.all(f["regions"][done] == 7.0)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one_and_resumes(disk, tiny_data, tiny_run):
    import torch

    size = (tiny_run / "checkpoints" / "last.pt").stat().st_size
    disk.resize(int(2.5 * size) + MB)  # epoch 1's last.pt and best.pt fit; epoch 2's last.pt does not
    run = disk.path / "ck"
    result = capcli("train", "tiny", f"data.dir={tiny_data}", f"run.dir={disk.path}", "run.name=ck", *TINY_OVERRIDES,
                    "train.epochs=2", "data.val_max_images=3", "--device", "cpu", "-q")
    assert disk_full_path(result) == str(run / "checkpoints" / "last.pt")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp*"))

    disk.resize(5 * size)
    ok(capcli("train", "--resume", run, "--device", "cpu", "-q"))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_captions_on_a_full_disk_keep_the_rows_and_resume(disk, tiny_run):
    images = REPO / "examples" / "images"
    out = disk.path / "caps.json"
    disk.fill(leave=4096)  # one page: the streamed rows fit, the whole output written at the end does not
    args = ["caption", tiny_run, images, "--batch-size", 2, "--output", out, "--device", "cpu", "-q"]
    assert disk_full_path(capcli(*args)) == str(out)
    stream = disk.path / "caps.json.partial.jsonl"
    assert len(stream.read_text().splitlines()) == len(list(images.glob("*.png"))) and not out.exists()

    disk.make_room()
    ok(capcli(*args, "--resume"))
    assert len(json.loads(out.read_text())) == len(list(images.glob("*.png"))) and not stream.exists()


def test_a_caption_row_log_on_a_full_disk_fails_in_one_error(disk):
    from capcli.caption import RowLog
    from capcli.errors import UserError

    log = RowLog(disk.path / "rows.jsonl")
    log.append([{"file": "a.png", "caption": "a cat"}])
    disk.fill(leave=0)
    with pytest.raises(UserError, match=f"disk full writing {re.escape(str(log.path))}: .*--resume"):
        log.append([{"file": f"{i}.png", "caption": "a cat " * 20} for i in range(200)])
    log.close()  # the unwritten rows are dropped, not written (and failed) again
    disk.make_room()
    rows = log.read()  # what reached the disk, the torn last line cut off
    assert "a.png" in rows and len(rows) < 201 and all(r["caption"] for r in rows.values())
