"""Checkpoints (``runs/NAME/checkpoints/*.pt``): plain containers of tensors and Python values,
written atomically and read with ``torch.load(weights_only=True)`` (no pickled modules, no code
execution on load). What a training checkpoint holds is listed in the README (*Data formats*)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from capcli.errors import UserError, disk_space
from capcli.store.files import atomic_path


def save(state: dict, path: str | Path) -> None:
    """Write to a temporary name in the same folder and rename: a kill never leaves a broken file."""
    path = Path(path)
    with atomic_path(path) as tmp, disk_space(path, lambda: _tensor_bytes(state), "the previous checkpoint is intact: free "
                                              "some space, then `capcli train --resume RUN` continues from it"):
        with open(tmp, "wb") as f:
            out = _Writes(f)
            try:
                torch.save(state, out)
            except RuntimeError as exc:
                if out.error is not None:  # torch words a failed write as its own RuntimeError
                    raise out.error from exc
                raise


class _Writes:
    """A file for ``torch.save`` that keeps the OSError of a failed write (a full disk): torch
    reports it only as a RuntimeError of its own, without the errno."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _tensor_bytes(obj) -> int:
    """About what ``obj`` takes on disk: the bytes of every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 64


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
    except pickle.UnpicklingError as exc:  # weights_only refused something: never unpickled
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc)) or re.findall(r"global ([\w.]+)", str(exc))
        what = f" ({found[0]})" if found else ""
        raise UserError(f"{path} is not a readable capcli checkpoint: refused, it holds pickled Python objects{what} "
                        "that would run code when loaded (capcli checkpoints hold only tensors and plain "
                        "values); use a checkpoint written by `capcli train` or a folder from `capcli export`, "
                        "and only from a source you trust") from exc
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise UserError(f"{path} is not a readable capcli checkpoint (it is truncated or damaged, or another "
                        f"format: {type(exc).__name__}: {first}); use the run's other checkpoint "
                        "(checkpoints/last.pt or best.pt) or train again") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vocab" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a capcli checkpoint (it lacks model/vocab/config)")
    _check_fields(path, ckpt)
    return ckpt


def _check_fields(path: Path, ckpt: dict) -> None:
    """The types a capcli checkpoint's fields have, so that a foreign or edited file is named here
    rather than failing later."""
    version = ckpt.get("capcli_version", "?")
    problem = None
    if not isinstance(ckpt["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in ckpt["model"].items()):
        problem = "its model is not a state dict of tensors"
    elif not isinstance(ckpt["vocab"], (list, tuple)) or not all(isinstance(t, str) for t in ckpt["vocab"]):
        problem = "its vocab is not a list of tokens"
    elif not isinstance(ckpt["config"], dict):
        problem = "its config is not a mapping"
    if problem:
        raise UserError(f"{path} is not a capcli checkpoint ({problem}; made by capcli {version}); give a "
                        "checkpoint written by `capcli train`")

