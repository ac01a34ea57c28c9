"""Files that are whole or absent, and JSON Lines logs that survive a kill.

Every file capcli writes for later (checkpoints, JSON results, dataset metadata, caption outputs,
model folders) goes to a temporary name beside its destination and is renamed into place, so a
kill or a full disk never leaves half a file under the real name. Logs that grow (metrics.jsonl,
streamed caption rows) are appended a line at a time; a line torn by a kill is cut off when the
log is read back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from capcli.errors import is_disk_full


def _naming(path: Path) -> OSError:
    """A full disk's error naming the file being written (a failed write names none)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def temporary_name(path: Path) -> Path:
    """``.NAME.tmpPID`` beside ``path``: hidden, unique to this process, on the same filesystem
    (so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (a file or a folder); renamed onto ``path``
    when the block ends without an exception, removed otherwise (also on Ctrl-C)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if is_disk_full(exc) and exc.filename in (None, str(tmp)):  # name the file meant, not its stand-in
            raise _naming(path) from exc
        raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` for a whole new file, renamed into place when the block ends."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON holds it: NaN and infinities become null, tuples lists, paths and
    NumPy scalars plain values. Anything else that JSON cannot hold is a TypeError."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # NumPy (and 0-d tensor) scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return json_safe(item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, newline: bool = False) -> Path:
    """Write ``data`` as JSON, whole or not at all; NaN/inf become null (see :func:`json_safe`)."""
    text = json.dumps(json_safe(data), indent=indent, ensure_ascii=False)
    return write_text(path, text + "\n" if newline else text)


def read_jsonl(path: str | Path, *, until: Callable[[dict], bool] | None = None, repair: bool = True) -> list[dict]:
    """The records of a JSON Lines log, up to the first line that a kill tore (unfinished, not
    JSON, not an object) or, with ``until``, the first record for which ``until(record)`` is true.
    With ``repair`` the file is cut back to the records returned, so that appending continues a
    whole log. A missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return []
    records: list[dict] = []
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n") or not isinstance(record, dict) or (until is not None and until(record)):
                break
            records.append(record)
            good += len(line)
    if repair and good < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class JsonlLog:
    """Records appended to a JSON Lines file, flushed at every :meth:`append`, so that a kill loses
    at most the line being written (which :func:`read_jsonl` then drops)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: IO | None = None

    def append(self, records: list[dict]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        try:
            self._f.write("".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
            self._f.flush()
        except OSError as exc:  # a full disk: the log keeps what reached it (a torn last line is cut when read)
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass  # the same write failing again: drop it, the first error says what happened
            if exc.filename is None and is_disk_full(exc):
                raise _naming(self.path) from exc
            raise

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
