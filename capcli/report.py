"""Rich tables and progress bars: everything the commands show people. (Files are written by
:mod:`capcli.store.files`.)"""

from __future__ import annotations

import time
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Outside a terminal (a log file, a pipe, CI) there is no screen width to fit: tables and lines
# take the width they need instead of rich's default 80 columns, which folds long names.
LOG_WIDTH = 400


def _console(stderr: bool) -> Console:
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


console = _console(stderr=False)
err_console = _console(stderr=True)


def make_progress(quiet: bool = False):
    """Progress bars on a terminal; elsewhere (a log file) :class:`PlainProgress` lines."""
    if not err_console.is_terminal:
        return PlainProgress(err_console, disable=quiet)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err_console, disable=quiet, transient=False)


class PlainProgress:
    """The part of rich's ``Progress`` that capcli uses, as occasional plain lines for logs: a
    task's line when it starts, at most every ``every`` seconds while it runs, and when it is done.
    Rich's own bars, redirected, print nothing until the end and then every bar at once."""

    def __init__(self, console: Console, disable: bool = False, every: float = 30.0):
        self.console, self.disable, self.every = console, disable, every
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> bool:
        for task_id, task in self._tasks.items():
            if not task["finished"] and task["completed"]:
                self._line(task_id, final=True)
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": total, "completed": completed,
                                "fields": fields, "start": time.perf_counter(), "last": 0.0, "finished": False}
        self._line(task_id)
        return task_id

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, advance: float | None = None, **fields) -> None:
        task = self._tasks[task_id]
        if description is not None:
            task["description"] = description
        if total is not None:
            task["total"] = total
        if advance is not None:
            task["completed"] += advance
        if completed is not None:
            task["completed"] = completed
        task["fields"].update(fields)
        done = task["total"] is not None and task["completed"] >= task["total"]
        if done and not task["finished"]:
            self._line(task_id, final=True)
        elif time.perf_counter() - task["last"] >= self.every:
            self._line(task_id)

    def _line(self, task_id: int, final: bool = False) -> None:
        task = self._tasks[task_id]
        now = time.perf_counter()
        task["last"] = now
        task["finished"] = task["finished"] or final
        if self.disable:
            return
        done, total = task["completed"], task["total"]
        count = f"{done:g}/{total:g}" if total is not None else f"{done:g}"
        info = task["fields"].get("info", "")
        self.console.print(f"{task['description']}: {count} {info} [{now - task['start']:.0f} s]".rstrip(),
                           highlight=False, markup=False)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]):
    """A titled table. The title is its own line above the table, so a long title never folds
    into the columns' width (rich wraps a table's own title to the table)."""
    from rich.console import Group
    from rich.text import Text

    t = Table()
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) if not isinstance(v, str) else v for v in r))
    return Group(Text(title, style="italic"), t) if title else t


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
