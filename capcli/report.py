"""Rich tables, progress bars and JSON writing: everything the commands show or write for people."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def make_progress(quiet: bool = False) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err_console, disable=quiet, transient=False)


def _json_default(obj: Any):
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temporary name, then rename); NaN/inf become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=_json_default, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) if not isinstance(v, str) else v for v in r))
    return t


def metrics_table(scores: dict, title: str = "Scores") -> Table:
    """BLEU shown x100 as papers do; the JSON keeps fractions."""
    rows = []
    for key, label, scale in (("bleu1", "BLEU-1", 100), ("bleu2", "BLEU-2", 100), ("bleu3", "BLEU-3", 100),
                              ("bleu4", "BLEU-4", 100), ("meteor", "METEOR", 100), ("rouge_l", "ROUGE-L", 100),
                              ("cider", "CIDEr-D", 1), ("sacrebleu", "sacreBLEU", 1), ("loss", "loss (teacher-forced)", 1),
                              ("top5", "top-5 acc (teacher-forced)", 100), ("images", "images", 1),
                              ("beam_size", "beam", 1), ("captions_per_s", "captions/s", 1)):
        if key not in scores:
            continue
        v = scores[key]
        if v is None:
            why = scores.get(f"{key}_skipped")
            rows.append((label, f"skipped ({why})" if why else "-"))
        elif isinstance(v, float):
            rows.append((label, f"{v * scale:.2f}" if scale == 100 else f"{v:.3f}"))
        else:
            rows.append((label, str(v)))
    return table(title, ["metric", "value"], rows)
