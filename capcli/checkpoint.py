"""Checkpoints: plain containers of tensors and Python scalars, written atomically and read with
``torch.load(weights_only=True)`` (no pickled modules, no code execution on load)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from capcli.errors import UserError


def save(state: dict, path: str | Path) -> None:
    """Write to a temporary name in the same folder and rename: a kill never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a run dir: take its best checkpoint, else the last
        for name in ("checkpoints/best.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give a .pt file or a run dir (runs/NAME)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable capcli checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vocab" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a capcli checkpoint (it lacks model/vocab/config)")
    return ckpt


def rng_state() -> dict:
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),  # tuple of ints; weights_only-safe as a list
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
