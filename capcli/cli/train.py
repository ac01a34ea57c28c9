"""`capcli train CONFIG.yaml [key=value ...]` and `capcli train --resume runs/NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command, resolve_device
from capcli.errors import UserError
from capcli.report import console, make_progress


@command(torch=True)
def train(
    config: Annotated[Optional[str], typer.Argument(help="YAML config path, or a shipped one: tiny, convnext_small.")] = None,
    overrides: Annotated[Optional[List[str]], typer.Argument(help="key=value overrides, e.g. train.lr=1e-4", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue runs/NAME from checkpoints/last.pt.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Train a captioner from a YAML config with key=value overrides.

    Examples:
      capcli train tiny data.dir=data/synthetic
      capcli train convnext_small model.encoder=convnext_tiny train.lr=4e-4 train.teacher_forcing=false
      capcli train lite0_cpu data.dir=data/flickr8k model.pretrained=lite0.safetensors
                                                     (20 minutes: cross-entropy, then self-critical)
      capcli train lite0_cpu data.dir=data/flickr8k train.scst_after=0      (cross-entropy alone)
      capcli train --resume runs/tiny
      torchrun --nproc_per_node 4 -m capcli train convnext_small     (one process per GPU)
    """
    from capcli.config import load_config
    from capcli.runtime import launched_rank
    from capcli.training.trainer import train as run_training

    overrides = list(overrides or [])
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    if resume is None and config is None:
        raise UserError("give a config (e.g. `capcli train tiny`) or --resume runs/NAME")
    if resume is not None and (config is not None or overrides):
        raise UserError("--resume continues a run with its saved config; drop the config and overrides")
    cfg = load_config(config, overrides) if resume is None else None
    if launched_rank() != 0:  # torchrun: rank 0 speaks for the run
        quiet = True
    dev = resolve_device(device)

    with make_progress(quiet) as bar:
        summary = run_training(cfg, dev, resume=resume, progress=training_progress(bar, quiet))

    if launched_rank() != 0:
        return
    run_dir = Path(summary["run_dir"])
    console.print(finished_line(summary))
    console.print(f"run dir: {run_dir}  (checkpoints/best.pt, checkpoints/last.pt, metrics.jsonl, config.yaml)")


def finished_line(summary: dict) -> str:
    metric, best = summary["best_metric"], summary["best_score"]
    label = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}.get(metric, metric)
    shown = "-" if best is None else f"{100 * best:.2f}" if metric == "bleu4" else f"{best:.3f}"
    line = (f"finished ({summary['stop_reason']}) after {summary['epochs_run']} epoch(s), "
            f"{summary['seconds']:.0f} s; best val {label} {shown} at epoch {summary['best_epoch']}")
    if summary["stop_reason"] in ("signal", "max_minutes"):
        line += f"; `capcli train --resume {summary['run_dir']}` continues it"
    return line


def training_progress(bar, quiet: bool = False, prefix: str = ""):
    """The trainer's progress events -> progress bars and one line per validation."""
    state: dict = {}

    def say(text: str) -> None:
        if not quiet:
            bar.console.print(f"{prefix}{text}", highlight=False)

    def progress(event: str, **info) -> None:
        if event == "start":
            say(f"run dir {info['run_dir']} | device {info['device']} x{info['world']} | "
                f"{info['train_images']} train / {info['val_images']} val images | "
                f"{info['workers']} loader worker(s){' | cached features' if info['cached'] else ''}")
        elif event == "cache":
            state["cache"] = bar.add_task(f"{prefix}cache {info['split']} features", total=info["images"],
                                          info="frozen encoder, once")
        elif event == "cache_step":
            bar.update(state["cache"], completed=info["done"])
        elif event == "epoch_start":
            state["task"] = bar.add_task(f"{prefix}epoch {info['epoch'] + 1}/{info['epochs']}",
                                         total=info["steps"], completed=info["done"],
                                         info=f"tf {info['tf_ratio']:.2f}")
        elif event == "step":
            bar.update(state["task"], completed=info["step"], info=" ".join(
                [f"loss {info['loss']:.3f}"]
                + ([f"top5 {100 * info['top5']:.1f}%", f"tf {info['tf_ratio']:.2f}"] if "top5" in info else [])
                + ([f"reward {info['reward']:.3f} baseline {info['baseline']:.3f} ended {100 * info['ended']:.0f}%"]
                   if "reward" in info else [])
                + [f"{info['samples_per_s']:.0f} samples/s"]))
        elif event == "validate":
            state["val"] = bar.add_task(f"{prefix}  validate", total=info["images"], info="free-running decode")
        elif event == "validate_step":
            bar.update(state["val"], completed=info["done"])
        elif event in ("stage", "stop"):
            say(info["message"])
        elif event == "lr_cut":
            say("no better validation score for a while: learning rates now "
                + ", ".join(f"{lr:.3g}" for lr in info["lrs"]))
        elif event == "epoch_end":
            r = info["record"]
            if "val_bleu4" in r:
                top5 = "-" if r["val_top5"] is None else f"{100 * r['val_top5']:.1f}%"
                loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
                reward = f" reward {r['train_reward']:.3f}" if "train_reward" in r else ""
                say(f"epoch {r['epoch']}: train loss {r['train_loss']:.3f}{reward} | val loss {loss} top5 {top5} "
                    f"BLEU-4 {100 * r['val_bleu4']:.2f} CIDEr {r['val_cider']:.3f} | "
                    f"{r['samples_per_s']:.0f} samples/s | {r['elapsed_s']:.0f} s | "
                    f"e.g. \"{r['val_samples'][0] if r['val_samples'] else ''}\"")

    return progress
