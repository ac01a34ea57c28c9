"""`capcli prepare ...`: turn a source of images + captions into a dataset dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command
from capcli.report import console, make_progress, table

app = typer.Typer(help="Turn images + captions into a capcli dataset dir (HDF5 + vocab.json + manifest.json).",
                  no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Dataset dir to write.")]
SizeOpt = Annotated[int, typer.Option("--size", min=16, max=1024, help="Side of the stored square images, px.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Image decoding processes (0 = in this process).")]


def summary_table(manifest: dict, out: Path):
    rows = []
    for split, s in manifest["splits"].items():
        lens = s.get("caption_length", {})
        rows.append((split, str(s["images"]), str(s["captions"]), str(s.get("references", "")),
                     f"{100 * s.get('unk_share', 0):.2f}%",
                     f"{lens.get('p50', 0):.0f} / {lens.get('p90', 0):.0f} / {lens.get('p99', 0):.0f}"))
    t = table(f"Dataset {out} ({manifest['source']}, {manifest['image_size']} px, "
              f"vocabulary {manifest['vocab']['size']}, skipped {manifest.get('skipped', 0)})",
              ["split", "images", "captions", "references", "<unk>", "length p50/p90/p99"], rows)
    return t


def run_with_progress(quiet: bool, fn, **kwargs) -> dict:
    with make_progress(quiet) as bar:
        tasks: dict[str, int] = {}

        def progress(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"{split:>5}", total=total, info="")
            bar.update(tasks[split], completed=done)

        return fn(progress=progress, **kwargs)


@app.command("synthetic")
@command
def synthetic(
    out: OutOpt = Path("data/synthetic"),
    images: Annotated[int, typer.Option("--images", "-n", min=3, help="Number of scenes.")] = 1000,
    size: SizeOpt = 96,
    seed: Annotated[int, typer.Option("--seed", help="Scenes are a pure function of (seed, index).")] = 0,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Render the built-in data set of shape scenes (no download needed).

    Example:  capcli prepare synthetic --out data/synthetic --images 1000 --size 96
    """
    from capcli.data.prepare import write_dataset
    from capcli.data.synthetic import records, render

    manifest = run_with_progress(quiet, write_dataset, records=records(images, seed), out_dir=out,
                                 source="synthetic", image_size=size, loader=render, min_word_freq=1,
                                 max_length=20, workers=workers, seed=seed)
    if not quiet:
        console.print(summary_table(manifest, out))
    console.print(f"wrote {out}")
