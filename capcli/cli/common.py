"""Options every command shares, device resolution, and the error boundary (exit 1, one line)."""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from capcli.errors import UserError, holds_open, is_disk_full
from capcli.report import err_console
from capcli.text import BLOCK_NGRAMS

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
ModelAmpOpt = Annotated[Optional[str], typer.Option(
    "--amp", help="Precision: auto | off | bf16 | fp16 (default: the model's train.amp). auto: bf16 "
                  "(fp16 where bf16 is missing) on CUDA, float32 on a CPU. bf16 also runs on a CPU, faster "
                  "where it has AMX (recent Xeons); its captions may differ slightly from float32's.")]


BlockNgramsOpt = Annotated[Optional[int], typer.Option(
    "--block-ngrams", min=0, help=f"Never repeat an n-gram of this size within a caption (0 = off; default "
    f"{BLOCK_NGRAMS}, chosen by measurement on Flickr8k val: docs/performance.md, Decoding defaults).")]
AllowUnkOpt = Annotated[bool, typer.Option(
    "--allow-unk", help="Let <unk> (a word outside the vocabulary) appear in captions; by default it never does.")]
DanglingOpt = Annotated[Optional[str], typer.Option(
    "--dangling", help="Comma-separated words a caption may not end on (default: English articles, prepositions "
    "and conjunctions such as a, the, of, with, and); 'none' allows any.")]


BackendOpt = Annotated[str, typer.Option(
    "--backend", help="torch | onnxruntime: run the ONNX graphs of a model folder exported with --format onnx "
    "(CPU; pip install \"capcli\\[onnx]\"), through the same decoding code.")]
Int8Opt = Annotated[bool, typer.Option(
    "--int8", help="With --backend onnxruntime: its int8 decoder (exported with --quantize int8).")]


def backend_device(backend: str, device: str) -> str:
    """The device a backend runs on: onnxruntime on the CPU (``auto`` means it there)."""
    if backend not in ("torch", "onnxruntime"):
        raise UserError(f"--backend {backend}: use torch or onnxruntime")
    return "cpu" if backend == "onnxruntime" and device == "auto" else device


def dangling_words(value: str | None) -> tuple[str, ...] | None:
    """``--dangling``: None (the default list), () for 'none', else the words given."""
    if value is None:
        return None
    if value.strip().lower() in ("none", ""):
        return ()
    return tuple(w.strip().lower() for w in value.split(",") if w.strip())


def resolve_device(spec: str):
    """'auto' -> cuda if available else cpu (see :func:`capcli.runtime.resolve_device`)."""
    from capcli.runtime import resolve_device as resolve

    return resolve(spec)


def fail(message: str) -> None:
    from rich.markup import escape

    # escaped: a message may hold brackets (pip install "capcli[tensorboard]", a list of keys)
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _file_in_the_way(path) -> str:
    """Which part of ``path`` is a file although a folder is needed there, as a fix to print."""
    from pathlib import Path

    p = Path(str(path))
    for part in [p, *p.parents]:
        if part.is_file():
            return f"{part} is a file, not a folder; choose an output path outside it"
    return "a file is in the way of a folder there; choose another path"


_STACK_IMPORTED = False


def import_torch_stack() -> None:
    """Import torch and timm with Python's cyclic garbage collector paused, then freeze what they
    made (``gc.freeze``): a few hundred thousand objects (functions, types, dicts) that live as
    long as the process, which the collector would otherwise rescan whenever the heap has grown by
    a quarter (docs/performance.md). Objects made afterwards are collected as usual. Once per
    process (a test session invokes many commands)."""
    global _STACK_IMPORTED
    if _STACK_IMPORTED:
        return
    _STACK_IMPORTED = True
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import timm  # noqa: F401  (imports torch, torchvision and, through them, torch._dynamo)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _end_if_a_file_is_held_open(exc: BaseException) -> None:
    """A full disk can leave a file that HDF5 can neither close nor let Python drop without
    crashing the process (:func:`capcli.errors.hold_open`): end the process now, the message
    printed, instead of letting the interpreter's exit close it."""
    if holds_open(exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def command(fn=None, *, torch: bool = False):
    """Turn user errors into a one-line message and exit 1 (full traceback with --debug).
    ``torch=True``: the command runs a model; torch and timm are imported first
    (:func:`import_torch_stack`). Use as ``@command`` or ``@command(torch=True)``."""
    if fn is None:
        return functools.partial(command, torch=torch)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        logging.basicConfig(level=logging.WARNING)
        try:
            if torch:
                import_torch_stack()
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except UserError as exc:
            if debug:
                traceback.print_exc()
            fail(str(exc))
            _end_if_a_file_is_held_open(exc)
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
                fail(f"disk full writing {getattr(exc, 'filename', None) or 'a file'}: free some space and rerun")
            elif not debug:
                fail(f"{type(exc).__name__}: {exc} (an internal error; rerun with --debug for the traceback)")
            _end_if_a_file_is_held_open(exc)
            raise typer.Exit(1)

    return wrapper
