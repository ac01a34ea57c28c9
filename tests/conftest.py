"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# a run small enough for seconds on a CPU: 32 px scenes, convnext_atto (a 1x1 feature map), one epoch
TINY_OVERRIDES = ["model.grid=1", "model.emb_dim=32", "model.att_dim=32", "model.dec_dim=48",
                  "train.epochs=1", "train.batch_size=40", "train.log_every=1"]


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, args: list[str], code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code} != {code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, runner) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    invoke(runner, ["prepare", "synthetic", "--out", out, "--images", 60, "--size", 32, "--quiet"])
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, runner, tiny_data) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={runs}", "run.name=t",
                    *TINY_OVERRIDES, "--device", "cpu", "--quiet"])
    return runs / "t"
