"""`capcli prepare ...`: turn a source of images + captions into a dataset dir."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command
from capcli.report import console, err_console, make_progress, table

app = typer.Typer(
    help="Turn images + captions into a capcli dataset dir (HDF5 + vocab.json + manifest.json).\n\n"
         "An interrupted run continues where it stopped when rerun with the same arguments; a finished "
         "one is not redone (use --overwrite). Unreadable images are skipped and listed in skipped.json.",
    no_args_is_help=True)


class Resize(str, Enum):
    squash = "squash"
    crop = "crop"


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Dataset dir to write.")]
SizeOpt = Annotated[int, typer.Option("--size", min=16, max=1024, help="Side of the stored square images, px.")]
ResizeOpt = Annotated[Resize, typer.Option(
    "--resize", help="squash: stretch to a square, as the paper's code did; crop: shorter side to --size, "
                     "centre crop.")]
CapsOpt = Annotated[int, typer.Option(
    "--captions-per-image", min=1, help="Captions sampled per image for training (all references are kept "
                                        "for evaluation).")]
MinFreqOpt = Annotated[int, typer.Option("--min-word-freq", min=1, help="Words rarer than this in train become <unk>.")]
MaxLenOpt = Annotated[int, typer.Option("--max-length", min=1, help="Longest caption kept, in tokens (longer: cut).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Image decoding processes (0 = in this process). Default: every CPU this "
                             "process may use.", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a finished or unfinished dataset in --out.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling the training captions of each image.")]


def summary_table(manifest: dict, out: Path):
    rows = []
    for split, s in manifest["splits"].items():
        lens = s.get("caption_length", {})
        rows.append((split, str(s["images"]), str(s["captions"]), str(s.get("references", "")),
                     f"{100 * s.get('unk_share', 0):.2f}%",
                     f"{lens.get('p50', 0):.0f} / {lens.get('p90', 0):.0f} / {lens.get('p99', 0):.0f}",
                     str(s.get("skipped", 0))))
    reasons = manifest.get("skipped_reasons") or {}
    skipped = f"skipped {manifest.get('skipped', 0)}"
    if reasons:
        skipped += " (" + ", ".join(f"{v} {k}" for k, v in reasons.items()) + ")"
    rate = manifest.get("images_per_s")
    speed = f", {rate:.0f} images/s" if rate else ""
    t = table(f"Dataset {out} ({manifest['source']}, {manifest['image_size']} px {manifest.get('resize', 'squash')}, "
              f"vocabulary {manifest['vocab']['size']}, {skipped}{speed})",
              ["split", "images", "captions", "references", "<unk>", "length p50/p90/p99", "skipped"], rows)
    return t


def run_with_progress(quiet: bool, fn, **kwargs) -> dict:
    """Call ``fn(progress=..., **kwargs)`` under a progress bar showing images/s and the ETA."""
    with make_progress(quiet) as bar:
        tasks: dict[str, int] = {}
        first: dict[str, tuple[int, float]] = {}

        def progress(split: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if split not in tasks:
                tasks[split] = bar.add_task(f"{split:>6}", total=total, completed=done, info="")
                first[split] = (done, now)
            d0, t0 = first[split]
            rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
            unit = "captions" if split == "tokens" else "images"
            bar.update(tasks[split], completed=done, info=f"{rate:.0f} {unit}/s" if rate else "")

        return fn(progress=progress, **kwargs)


def _report(manifest: dict, out: Path, quiet: bool) -> None:
    if manifest.get("reused"):
        err_console.print(f"{out} is already prepared with these arguments; nothing to do "
                          "(--overwrite redoes it)", highlight=False)
    elif any(manifest.get("resumed", {}).values()):
        done = ", ".join(f"{s} {n}" for s, n in manifest["resumed"].items() if n)
        err_console.print(f"continued an interrupted run (already done: {done})", highlight=False)
    if not quiet:
        console.print(summary_table(manifest, out))
    if manifest.get("skipped"):
        console.print(f"{manifest['skipped']} image(s) skipped; reasons in {out / 'skipped.json'}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


def _write(records, out: Path, quiet: bool, *, source: str, size: int, resize: Resize, captions_per_image: int,
           min_word_freq: int, max_length: int, workers: Optional[int], overwrite: bool, seed: int,
           extra: dict) -> None:
    from capcli.data.prepare import write_dataset
    from capcli.runtime import usable_cpus

    manifest = run_with_progress(
        quiet, write_dataset, records=records, out_dir=out, source=source, image_size=size,
        resize_policy=resize.value, captions_per_image=captions_per_image, min_word_freq=min_word_freq,
        max_length=max_length, workers=usable_cpus() if workers is None else workers, seed=seed,
        extra_manifest=extra, overwrite=overwrite)
    _report(manifest, out, quiet)


@app.command("coco")
@command
def coco(
    images: Annotated[Path, typer.Option("--images", help="COCO images root (holding train2014/, val2014/ "
                                                          "or train2017/, val2017/).")],
    annotations: Annotated[Path, typer.Option("--annotations", help="COCO 'annotations' dir with captions_*.json "
                                                                    "(or one such file).")],
    out: OutOpt = Path("data/coco"),
    karpathy: Annotated[Optional[Path], typer.Option("--karpathy", help="Karpathy dataset_coco.json: use its "
                                                     "train/restval/val/test split (restval -> train).")] = None,
    size: SizeOpt = 256,
    resize: ResizeOpt = Resize.squash,
    captions_per_image: CapsOpt = 5,
    min_word_freq: MinFreqOpt = 5,
    max_length: MaxLenOpt = 50,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """MS COCO (2014 or 2017) from the official caption annotation files.

    Split with --karpathy: that file's train/restval/val/test (restval -> train).
    Split without it: SHA-1 of the COCO image id, first 8 hex digits mod 100: 0-89 train, 90-94 val, 95-99 test.
    (About 6k val and 6k test images on COCO 2014; a photo gets the same split in 2014 and 2017 files;
    adding images never moves existing ones.)

    Examples:
      capcli prepare coco --images coco --annotations coco/annotations --karpathy dataset_coco.json --out data/coco
      capcli prepare coco --images ../shared/data/coco-mini --annotations ../shared/data/coco-mini/annotations --out data/coco-mini --size 224 --resize crop
    """
    from capcli.data.sources import coco_records

    info: dict = {}
    records = coco_records(images, annotations, karpathy, info=info)
    _write(records, out, quiet, source="coco", size=size, resize=resize, captions_per_image=captions_per_image,
           min_word_freq=min_word_freq, max_length=max_length, workers=workers, overwrite=overwrite, seed=seed,
           extra=info)


@app.command("karpathy")
@command
def karpathy(
    json_file: Annotated[Path, typer.Option("--json", help="Karpathy split file: dataset_coco.json, "
                                                           "dataset_flickr8k.json or dataset_flickr30k.json.")],
    images: Annotated[Path, typer.Option("--images", help="Images root (COCO: holding train2014/ and val2014/; "
                                                          "Flickr: the folder of .jpg files).")],
    out: OutOpt = Path("data/karpathy"),
    size: SizeOpt = 256,
    resize: ResizeOpt = Resize.squash,
    captions_per_image: CapsOpt = 5,
    min_word_freq: MinFreqOpt = 5,
    max_length: MaxLenOpt = 50,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """COCO, Flickr8k or Flickr30k from a Karpathy split file (its raw sentences and its split;
    restval goes to train).

    Examples:
      capcli prepare karpathy --json dataset_flickr8k.json --images Flickr8k_Dataset --out data/flickr8k
      capcli prepare karpathy --json dataset_coco.json --images coco --out data/coco --workers 16
    """
    from capcli.data.sources import karpathy_records

    info: dict = {}
    records = karpathy_records(json_file, images, info=info)
    source = info.get("dataset") or "karpathy"
    _write(records, out, quiet, source=f"karpathy-{source}" if source != "karpathy" else source, size=size,
           resize=resize, captions_per_image=captions_per_image, min_word_freq=min_word_freq,
           max_length=max_length, workers=workers, overwrite=overwrite, seed=seed, extra=info)


@app.command("folder")
@command
def folder(
    images: Annotated[Path, typer.Option("--images", help="Folder the image paths in the captions file are relative to.")],
    captions: Annotated[Path, typer.Option("--captions", help="captions.csv (header: image,caption[,split]), .tsv, "
                                                              "or .jsonl ({\"image\": ..., \"caption\": ...} per line); "
                                                              "one row per (image, caption).")],
    out: OutOpt = Path("data/folder"),
    size: SizeOpt = 256,
    resize: ResizeOpt = Resize.squash,
    captions_per_image: CapsOpt = 5,
    min_word_freq: MinFreqOpt = 5,
    max_length: MaxLenOpt = 50,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Your own photos with a captions file: one row per (image, caption), optional split column.

    Split column values: train, restval (-> train), val, test.
    Without one: SHA-1 of the image path as written, first 8 hex digits mod 100: 0-89 train, 90-94 val, 95-99 test.
    (Adding images never moves existing ones; in tiny sets the highest-hash train images fill an empty val/test.)

    Examples:
      capcli prepare folder --images photos --captions photos/captions.csv --out data/photos
      capcli prepare folder --images Flickr8k_Dataset --captions captions.txt.csv --out data/f8k --min-word-freq 3
    """
    from capcli.data.sources import folder_records

    info: dict = {}
    records = folder_records(images, captions, info=info)
    _write(records, out, quiet, source="folder", size=size, resize=resize, captions_per_image=captions_per_image,
           min_word_freq=min_word_freq, max_length=max_length, workers=workers, overwrite=overwrite, seed=seed,
           extra=info)


@app.command("synthetic")
@command
def synthetic(
    out: OutOpt = Path("data/synthetic"),
    images: Annotated[int, typer.Option("--images", "-n", min=3, help="Number of scenes.")] = 1000,
    size: SizeOpt = 96,
    seed: Annotated[int, typer.Option("--seed", help="Scenes are a pure function of (seed, index).")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Rendering processes (0 = in this process).")] = 0,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Render the built-in data set of shape scenes (no download needed).

    Examples:
      capcli prepare synthetic --out data/synthetic --images 1000 --size 96
    """
    from capcli.data.prepare import write_dataset
    from capcli.data.synthetic import records, render

    manifest = run_with_progress(quiet, write_dataset, records=records(images, seed), out_dir=out,
                                 source="synthetic", image_size=size, loader=render, min_word_freq=1,
                                 max_length=20, workers=workers, seed=seed, overwrite=overwrite)
    _report(manifest, out, quiet)
