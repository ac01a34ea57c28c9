"""The paper's study as a grid: every combination of a few config values (encoders x learning
rates x teacher forcing), each trained and then scored on one split without teacher forcing.

A grid file (YAML)::

    config: convnext_small                 # base config: a path or a shipped name
    overrides: [data.dir=data/coco]        # applied to every run
    grid:                                  # key -> values; runs = the cartesian product
      model.encoder: [convnext_tiny, convnext_small]
      train.lr: [4.0e-4, 1.0e-4]
      train.teacher_forcing: [true, false]
    evaluate: {split: test, beam: 3}
    name: study                            # runs go to run.dir/name/<combination>

Finished combinations (an ``eval.json`` in their run dir) are not redone, so a stopped study
continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

import torch
import yaml

from capcli.config import load_config, resolve_config_path
from capcli.decode import DecodeOptions
from capcli.errors import UserError
from capcli.evaluate import evaluate_checkpoint, run_eval_path
from capcli.store import checkpoint
from capcli.training.trainer import train

GRID_DIR = Path(__file__).parent.parent / "configs" / "grids"


def load_grid(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file() and (GRID_DIR / f"{p.stem}.yaml").is_file() and len(p.parts) == 1:
        p = GRID_DIR / f"{p.stem}.yaml"
    if not p.is_file():
        shipped = ", ".join(sorted(g.stem for g in GRID_DIR.glob("*.yaml")))
        raise UserError(f"grid file {path} not found; give a YAML path or a shipped grid: {shipped}")
    try:
        grid = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"grid file {p} is not valid YAML: {exc}") from exc
    unknown = set(grid) - {"config", "overrides", "grid", "evaluate", "name"}
    if unknown:
        raise UserError(f"grid file {p}: unknown keys {sorted(unknown)}; use config, overrides, grid, evaluate, name")
    if not isinstance(grid.get("grid"), dict) or not grid["grid"]:
        raise UserError(f"grid file {p} needs a 'grid:' mapping of config keys to lists of values")
    for key, values in grid["grid"].items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid file {p}: grid.{key} must be a non-empty list")
    grid.setdefault("config", "tiny")
    grid.setdefault("overrides", [])
    grid.setdefault("evaluate", {})
    grid.setdefault("name", p.stem)
    resolve_config_path(grid["config"])  # fail early on a bad base config
    return grid


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _label(key: str, value) -> str:
    """A short run-name part: a name as it is (convnext_tiny), a number or flag with the key's
    initials (lr0.0004, tftrue)."""
    if isinstance(value, str) and value.lower() not in ("true", "false", "scheduled"):
        return value
    last = key.split(".")[-1]
    short = "".join(w[0] for w in last.split("_")) if "_" in last else last
    return f"{short}{_value(value)}"


def combinations(grid: dict, extra: list[str] | None = None) -> list[tuple[str, list[str], list[str]]]:
    """(run name, overrides, the grid's values as text) for every combination, each validated."""
    keys = list(grid["grid"])
    out = []
    for values in itertools.product(*(grid["grid"][k] for k in keys)):
        pairs = [f"{k}={_value(v)}" for k, v in zip(keys, values)]
        name = "-".join(_label(k, v) for k, v in zip(keys, values)).replace("/", "_")
        overrides = [*grid["overrides"], *(extra or []), *pairs]
        load_config(grid["config"], overrides)  # every combination is checked before any training
        out.append((name, overrides, [_value(v) for v in values]))
    return out


def run_study(grid: dict, device: torch.device, *, extra: list[str] | None = None,
              progress: Callable[..., None] | None = None) -> list[dict]:
    """Train and score every combination; returns one row per combination."""
    emit = progress or (lambda *a, **k: None)
    split = grid["evaluate"].get("split", "test")
    options = DecodeOptions(beam_size=int(grid["evaluate"].get("beam", 3)))
    rows = []
    combos = combinations(grid, extra)
    for i, (name, overrides, values) in enumerate(combos):
        cfg = load_config(grid["config"], [*overrides, f"run.name={name}", "run.overwrite=true"])
        cfg.run.dir = str(Path(cfg.run.dir) / grid["name"])
        run_dir = Path(cfg.run.dir) / name
        eval_path = run_eval_path(run_dir, split)
        emit("run_start", index=i, total=len(combos), name=name)
        if eval_path.is_file():
            scores = json.loads(eval_path.read_text())
            reused = True
        else:
            last = run_dir / "checkpoints" / "last.pt"
            if last.is_file():  # a stopped study: finish this run, unless its epochs are done
                if checkpoint.load(last)["epoch"] < cfg.train.epochs:
                    train(None, device, resume=run_dir, progress=progress)
            else:
                train(cfg, device, progress=progress)
            scores, _ = evaluate_checkpoint(run_dir / "checkpoints" / "best.pt", device, options, data=cfg.data.dir,
                                            split=split, meteor=False, output=eval_path)
            reused = False
        row = {"run": name, "run_dir": str(run_dir), "reused": reused,
               **dict(zip(grid["grid"], values)),
               **{k: scores.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l",
                                             "top5", "loss", "captions_per_s")}}
        rows.append(row)
        emit("run_end", index=i, total=len(combos), row=row)
    return rows
