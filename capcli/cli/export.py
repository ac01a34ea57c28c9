"""`capcli export RUN DIR` (a self-contained model folder) and `capcli push RUN --repo user/name`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command
from capcli.report import console, err_console

RunArg = Annotated[str, typer.Argument(
    help="The model: a run dir (its best.pt), a checkpoint .pt, a model folder or hf-hub:user/name.",
    show_default=False)]


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


@command(torch=True)
def export(
    run: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created; must be new or empty unless --overwrite).",
                                            show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR if it already holds a model folder.")] = False,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Write a self-contained model folder (safetensors, JSON, model card) to share a model.

    The folder holds model.safetensors (the weights, nothing pickled), config.json (config,
    preprocessing, decoding defaults), vocab.json and a README.md model card (scores from the run's
    eval-*/eval.json, training data facts, usage). `capcli caption`, `capcli evaluate` and
    `Captioner.load` read it like a run dir. The export runs on the CPU (--device is unused).

    Examples:
      capcli export runs/tiny models/tiny
      capcli export runs/coco/checkpoints/best.pt models/coco --overwrite
      capcli caption models/tiny photo.jpg
    """
    from capcli.store.folder import MODEL_FILES, export_model

    folder = export_model(run, out_dir, overwrite=overwrite)
    files = ", ".join(f"{name} ({_size(folder / name)})" for name in MODEL_FILES)
    if quiet:
        console.print(str(folder), highlight=False)
        return
    console.print(f"wrote {folder}: {files}", highlight=False)
    console.print(f"use it: capcli caption {folder} photo.jpg   or   Captioner.load(\"{folder}\")", highlight=False)


@command(torch=True)
def push(
    run: RunArg,
    repo: Annotated[str, typer.Option("--repo", help="Hub model repo, user/name (created if missing).",
                                      show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token with write access "
                                                 "(default: HF_TOKEN or the `hf auth login` token).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Export a model and upload it to the Hugging Face Hub.

    Writes the model folder of `capcli export` and uploads it to the model repo user/name (created
    if missing); anyone can then use it as hf-hub:user/name. Needs a login: `hf auth login` (or
    `huggingface-cli login`), HF_TOKEN, or --token. --device is unused.

    Examples:
      capcli push runs/tiny --repo alice/capcli-tiny
      capcli push runs/coco --repo my-org/convnext-captioner --private --message "epoch 20, CIDEr 1.02"
      capcli caption hf-hub:alice/capcli-tiny photo.jpg
    """
    from capcli.store.folder import push_model

    url = push_model(run, repo, private=private, token=token, commit_message=message,
                     progress=None if quiet else lambda line: err_console.print(f"{line} ...", highlight=False))
    if quiet:
        console.print(url, highlight=False)
        return
    console.print(f"pushed to {url}", highlight=False)
    console.print(f"use it: capcli caption hf-hub:{repo} photo.jpg", highlight=False)
