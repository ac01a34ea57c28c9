"""`capcli caption CHECKPOINT PATH...`: captions for files, folders and globs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command, resolve_device
from capcli.errors import UserError
from capcli.report import console, make_progress, table, write_json


@command
def caption(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint .pt or run dir (uses its best.pt).")],
    paths: Annotated[List[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    beam: Annotated[int, typer.Option("--beam", min=1, max=50, help="Beam size (1 = greedy).")] = 3,
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Longest caption in words.")] = 50,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images captioned at once.")] = 16,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write captions to .json or .csv.")] = None,
    attention_maps: Annotated[Optional[Path], typer.Option("--attention-maps", help="Folder for attention heat-map PNGs.")] = None,
    block_ngrams: Annotated[int, typer.Option("--block-ngrams", min=0, help="Never repeat an n-gram of this size within a caption (0 = off; 3 is common).")] = 0,
    sample: Annotated[bool, typer.Option("--sample", help="Draw captions from the model instead of beam search: varied captions.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01, help="With --sample: below 1 safer, above 1 more varied.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="With --sample: draw among the k likeliest words only (0 = all).")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="With --sample: the same seed draws the same captions.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Caption images with a trained model.

    Examples:
      capcli caption runs/tiny examples/images/
      capcli caption runs/tiny/checkpoints/best.pt "photos/**/*.jpg" --beam 5 --output captions.csv
      capcli caption runs/tiny photo.jpg --attention-maps maps/
      capcli caption runs/tiny photos/ --sample --temperature 0.7 --top-k 20 --seed 1
      capcli caption runs/tiny photos/ --beam 5 --block-ngrams 3
    """
    from capcli.caption import caption_files
    from capcli.data.images import find_images
    from capcli.training.runtime import autocast_dtype
    from capcli.models.captioner import captioner_from_checkpoint

    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--output {output}: use a .json or .csv file name")
    if sample and attention_maps is not None:
        raise UserError("--attention-maps draws the attention of beam search; drop --sample (or the maps)")
    if not sample and (temperature != 1.0 or top_k or seed is not None):
        raise UserError("--temperature, --top-k and --seed shape sampled captions; add --sample")
    if sample:
        import torch

        if seed is not None:
            torch.manual_seed(seed)
    dev = resolve_device(device)
    model, vocab, cfg, ckpt = captioner_from_checkpoint(checkpoint, dev)
    files = find_images(paths)
    if not files:
        raise UserError(f"no image files found in {' '.join(paths)}; give files, folders or globs "
                        "(jpg, png, bmp, gif, webp, tiff)")
    data = ckpt.get("data", {})
    image_size = int(data.get("image_size", 256))
    with make_progress(quiet or len(files) < 2) as bar:
        task = bar.add_task("caption", total=len(files), info=f"beam {beam}")
        rows = caption_files(model, vocab, files, dev, image_size=image_size, resize=data.get("resize", "squash"),
                             beam_size=beam, max_length=max_length, batch_size=batch_size,
                             attention_dir=attention_maps, amp_dtype=autocast_dtype(cfg.train.amp, dev),
                             block_ngrams=block_ngrams,
                             sample={"temperature": temperature, "top_k": top_k} if sample else None,
                             progress=lambda done, n: bar.update(task, completed=done))
    how = f"sampled at temperature {temperature:g}" + (f", top-{top_k}" if top_k else "") if sample else f"beam {beam}"
    console.print(table(f"Captions ({checkpoint}, {how})", ["file", "caption"],
                        [(r["file"], r["caption"] if r["caption"] is not None else f"[red]error: {r['error']}")
                         for r in rows]))
    if output is not None:
        if output.suffix.lower() == ".json":
            write_json(output, rows)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["file", "caption", "error", "attention_map"], extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        console.print(f"wrote {output}")
    if attention_maps is not None:
        console.print(f"attention maps in {attention_maps}")
    if all(r["caption"] is None for r in rows):
        raise UserError("no image could be read; see the errors above")
