"""The `capcli` command: one Typer app, one thin module per command."""

from __future__ import annotations

import gc

import typer

from capcli.version import __version__
from capcli.allocator import keep_freed_memory
from capcli.cli import benchmark, caption, demo, evaluate, export, prepare, quickstart, train

app = typer.Typer(
    name="capcli",
    help="Train, evaluate, benchmark and run CNN + attention-LSTM image captioners.\n\n"
         "Start with:  capcli quickstart",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(prepare.app, name="prepare")
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("caption")(caption.caption)
app.command("export")(export.export)
app.command("push")(export.push)
app.command("demo")(demo.demo)
app.add_typer(benchmark.app, name="benchmark")
app.command("quickstart")(quickstart.quickstart)


def _version(value: bool):
    if value:
        typer.echo(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """capcli: image captioning with ConvNeXt encoders and attention LSTMs."""


def main() -> None:
    keep_freed_memory()  # reuse freed activation memory instead of page-faulting it back in
    try:
        app()
    finally:
        # Python's last full collection at exit rescans every object still alive (a model, its
        # data, the libraries), for nothing: the process's memory goes back to the OS as a whole.
        # Frozen objects are skipped.
        gc.freeze()
