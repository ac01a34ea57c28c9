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


FormatOpt = Annotated[str, typer.Option(
    "--format", help="safetensors: the weights for capcli and PyTorch; onnx: those, and the model as ONNX graphs "
    "(encoder, decoder_init, decoder_step) for onnxruntime and other runtimes (pip install \"capcli\\[onnx]\").")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", help="With --format onnx: int8 adds a dynamically quantised decoder (decoder_*.int8.onnx).")]


def _onnx_extra(fmt: str, quantize: str | None, quiet: bool):
    """The ONNX writer for export_model, or None for --format safetensors."""
    from capcli.errors import UserError

    if fmt not in ("safetensors", "onnx"):
        raise UserError(f"--format {fmt}: use safetensors or onnx")
    if quantize is not None and fmt != "onnx":
        raise UserError("--quantize makes int8 ONNX graphs: add --format onnx")
    if fmt == "safetensors":
        return None
    from capcli.onnx import exporter

    return exporter(quantize, progress=None if quiet else lambda line: err_console.print(f"{line} ...", highlight=False))


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


@command(torch=True)
def export(
    run: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created; must be new or empty unless --overwrite).",
                                            show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR if it already holds a model folder.")] = False,
    fmt: FormatOpt = "safetensors",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Write a self-contained model folder (safetensors, JSON, model card) to share a model.

    The folder holds model.safetensors (the weights, nothing pickled), config.json (config,
    preprocessing, decoding defaults), vocab.json and a README.md model card (scores from the run's
    eval-*/eval.json, training data facts, usage). `capcli caption`, `capcli evaluate` and
    `Captioner.load` read it like a run dir. --format onnx adds encoder.onnx, decoder_init.onnx and
    decoder_step.onnx (checked with onnx.checker; their names, shapes and opset in config.json),
    which `--backend onnxruntime` and runtimes without PyTorch run. The export runs on the CPU
    (--device is unused).

    Examples:
      capcli export runs/tiny models/tiny
      capcli export runs/coco/checkpoints/best.pt models/coco --overwrite
      capcli export runs/coco models/coco-onnx --format onnx --quantize int8
      capcli caption models/tiny photo.jpg
      capcli caption models/coco-onnx photo.jpg --backend onnxruntime
    """
    from capcli.store.folder import export_model

    folder = export_model(run, out_dir, overwrite=overwrite, extra=_onnx_extra(fmt, quantize, quiet))
    files = ", ".join(f"{p.name} ({_size(p)})" for p in sorted(folder.iterdir()) if p.is_file())
    if quiet:
        console.print(str(folder), highlight=False)
        return
    console.print(f"wrote {folder}: {files}", highlight=False)
    console.print(f"use it: capcli caption {folder} photo.jpg   or   Captioner.load(\"{folder}\")", highlight=False)
    if fmt == "onnx":
        console.print(f"        capcli caption {folder} photo.jpg --backend onnxruntime"
                      + (" [--int8]" if quantize else ""), highlight=False, markup=False)


@command(torch=True)
def push(
    run: RunArg,
    repo: Annotated[str, typer.Option("--repo", help="Hub model repo, user/name (created if missing).",
                                      show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token with write access "
                                                 "(default: HF_TOKEN or the `hf auth login` token).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    fmt: FormatOpt = "safetensors",
    quantize: QuantizeOpt = None,
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
      capcli push runs/coco --repo alice/coco-onnx --format onnx --quantize int8   (the ONNX graphs too)
      capcli caption hf-hub:alice/capcli-tiny photo.jpg
    """
    from capcli.store.folder import push_model

    url = push_model(run, repo, private=private, token=token, commit_message=message,
                     progress=None if quiet else lambda line: err_console.print(f"{line} ...", highlight=False),
                     extra=_onnx_extra(fmt, quantize, quiet))
    if quiet:
        console.print(url, highlight=False)
        return
    console.print(f"pushed to {url}", highlight=False)
    console.print(f"use it: capcli caption hf-hub:{repo} photo.jpg", highlight=False)
