"""The one exception type that commands turn into a one-line message and exit status 1."""


class UserError(Exception):
    """A problem with the user's input (a path, a config key, a data set) that they can fix.

    The message names the input and the fix; the CLI prints it without a traceback.
    """


def is_disk_full(exc: BaseException) -> bool:
    """An error for a full disk: an OSError with errno ENOSPC (or EDQUOT), also as h5py words
    HDF5's own failed writes (an OSError or a RuntimeError naming errno 28)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, (OSError, RuntimeError)) and "No space left" in str(exc)


def hold_open(exc: BaseException, obj: object) -> None:
    """Keep ``obj``, a file that must not be closed, alive as long as ``exc``: HDF5 cannot close a
    file whose metadata a full disk kept it from writing, nor drop any object of it, without
    crashing the process (HDF5 2.0; see :mod:`capcli.data.h5writer`). The command line ends the
    process on such an error, without closing anything (:func:`holds_open`)."""
    exc.__dict__.setdefault("held_open", []).append(obj)


def holds_open(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from or during, holds a file open (:func:`hold_open`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__dict__.get("held_open"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class disk_space:  # noqa: N801 - used as a context manager, like contextlib's
    """Turn a full disk while writing ``path`` into a one-line UserError naming the path, about how
    many bytes the write needs and how many are free, and how to continue (``then``).
    ``needed_bytes`` may be a function, called only when the disk is full (an estimate that costs
    work, such as serialising rows, is then never made on the way of a write that succeeds)."""

    def __init__(self, path, needed_bytes, then: str = "free some space and rerun"):
        self.path, self.needed, self.then = path, needed_bytes, then

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not is_disk_full(exc):
            return False
        import shutil
        from pathlib import Path

        where = Path(self.path)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = f", {_size(shutil.disk_usage(where).free)} free there"
        except OSError:
            free = ""
        needed = self.needed() if callable(self.needed) else self.needed
        raise UserError(f"disk full writing {self.path}: it needs about {_size(needed)}{free}; "
                        f"{self.then}") from exc
