"""Options every command shares, device resolution, and the error boundary (exit 1, one line)."""

from __future__ import annotations

import functools
import logging
import traceback
from typing import Annotated

import typer

from capcli.errors import UserError, is_disk_full
from capcli.report import err_console

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]


def resolve_device(spec: str):
    """'auto' -> cuda if available else cpu (see :func:`capcli.training.runtime.resolve_device`;
    imported when called, so that `--help` does not load torch)."""
    from capcli.training.runtime import resolve_device as resolve

    return resolve(spec)


def fail(message: str) -> None:
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)


def _file_in_the_way(path) -> str:
    """Which part of ``path`` is a file although a folder is needed there, as a fix to print."""
    from pathlib import Path

    p = Path(str(path))
    for part in [p, *p.parents]:
        if part.is_file():
            return f"{part} is a file, not a folder; choose an output path outside it"
    return "a file is in the way of a folder there; choose another path"


def command(fn):
    """Turn user errors into a one-line message and exit 1 (full traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        logging.basicConfig(level=logging.WARNING)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except UserError as exc:
            if debug:
                traceback.print_exc()
            fail(str(exc))
            raise typer.Exit(1)
        except (FileExistsError, NotADirectoryError) as exc:  # a file where a folder must be
            if debug:
                traceback.print_exc()
            fail(f"{exc.filename}: {_file_in_the_way(exc.filename)}")
            raise typer.Exit(1)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            if debug:
                traceback.print_exc()
            fail(f"{exc.strerror or type(exc).__name__}: {exc.filename}")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            fail("interrupted")
            raise typer.Exit(130)
        except Exception as exc:  # a bug: say so in one line, the traceback is one flag away
            if debug:
                traceback.print_exc()
            if is_disk_full(exc):  # a write that no writer guarded
                fail(f"disk full writing {exc.filename or 'a file'}: free some space and rerun")
            elif not debug:
                fail(f"{type(exc).__name__}: {exc} (an internal error; rerun with --debug for the traceback)")
            raise typer.Exit(1)

    return wrapper
