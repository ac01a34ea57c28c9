"""Checkpoints: atomic writes, weights-only loading, run dirs as checkpoint paths."""

import pytest
import torch

from capcli.store import checkpoint
from capcli.errors import UserError


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}, "vocab": [], "config": {}}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "vocab": [], "config": {}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_pickled_modules_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": torch.nn.Linear(2, 2), "vocab": [], "config": {}}, path)  # a whole module
    with pytest.raises(UserError, match="not a readable capcli checkpoint"):
        checkpoint.load(path)


def test_other_files_are_not_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UserError, match="lacks model/vocab/config"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_run_dir_resolves_to_best_then_last(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    checkpoint.save({"model": {}, "vocab": ["last"], "config": {}}, ck / "last.pt")
    assert checkpoint.load(tmp_path / "run")["vocab"] == ["last"]
    checkpoint.save({"model": {}, "vocab": ["best"], "config": {}}, ck / "best.pt")
    assert checkpoint.load(tmp_path / "run")["vocab"] == ["best"]


def test_rng_state_round_trip():
    from capcli.runtime import rng_state, set_rng_state

    state = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
