"""`capcli caption CHECKPOINT PATH...`: captions for files, folders and globs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from capcli.cli.common import (AllowUnkOpt, BackendOpt, BlockNgramsOpt, DanglingOpt, DebugOpt, DeviceOpt, Int8Opt,
                               ModelAmpOpt, QuietOpt, backend_device, command, dangling_words, resolve_device)
from capcli.errors import UserError
from capcli.report import console, make_progress, table


@command(torch=True)
def caption(
    model: Annotated[str, typer.Argument(help="A trained captioner: run dir (its best.pt), checkpoint file, model folder (capcli export) or hf-hub:user/name.")],
    paths: Annotated[List[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    beam: Annotated[int, typer.Option("--beam", min=1, max=50, help="Beam size (1 = greedy).")] = 3,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=1, help="Longest caption in words (default: the model's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images captioned at once (default: 32 on a CPU, 128 on a GPU).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Image-decoding worker processes (default: what this process's CPUs allow).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write captions to .jsonl (streamed as made), .json or .csv.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run: skip the files --output already has.")] = False,
    attention_maps: Annotated[Optional[Path], typer.Option("--attention-maps", help="Folder for attention heat-map PNGs.")] = None,
    block_ngrams: BlockNgramsOpt = None,
    allow_unk: AllowUnkOpt = False,
    dangling: DanglingOpt = None,
    sample: Annotated[bool, typer.Option("--sample", help="Draw captions from the model instead of beam search: varied captions.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01, help="With --sample: below 1 safer, above 1 more varied.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="With --sample: draw among the k likeliest words only (0 = all).")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="With --sample: the same seed draws the same captions.")] = None,
    amp: ModelAmpOpt = None,
    backend: BackendOpt = "torch",
    int8: Int8Opt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Caption images with a trained model.

    Rows stream to --output as they are made; a stopped run continues with --resume. Under
    torchrun the files are split across the processes and rank 0 merges their rows in input order.

    Examples:
      capcli caption runs/tiny examples/images/
      capcli caption runs/tiny/checkpoints/best.pt "photos/**/*.jpg" --beam 5 --output captions.csv
      capcli caption runs/tiny photo.jpg --attention-maps maps/
      capcli caption my_model/ photos/ --output captions.jsonl --resume        (a model folder; continue a stopped run)
      capcli caption hf-hub:user/coco-captioner photos/ --beam 5 --block-ngrams 0 --allow-unk   (the raw model)
      capcli caption runs/tiny photos/ --sample --temperature 0.7 --top-k 20 --seed 1
      capcli caption runs/coco photos/ --amp bf16 --output captions.jsonl        (bf16 on an AMX CPU: faster)
      capcli caption models/coco photos/ --backend onnxruntime         (a folder exported with --format onnx)
      torchrun --nproc_per_node 4 -m capcli caption runs/coco photos/ --output captions.jsonl
    """
    from capcli.api import Captioner
    from capcli.caption import OUTPUT_SUFFIXES, caption_files
    from capcli.data.images import find_images
    from capcli.runtime import cleanup_distributed, resolve_num_workers, setup_distributed

    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--output {output}: use a .jsonl, .json or .csv file name")
    if resume and output is None:
        raise UserError("--resume continues the run that --output names; give --output")
    if sample and attention_maps is not None:
        raise UserError("--attention-maps draws the attention of beam search; drop --sample (or the maps)")
    if not sample and (temperature != 1.0 or top_k or seed is not None):
        raise UserError("--temperature, --top-k and --seed shape sampled captions; add --sample")
    d, dev = setup_distributed(resolve_device(backend_device(backend, device)))
    if d.world > 1 and output is None:
        raise UserError("under torchrun give --output: each process streams its rows there and rank 0 merges them")
    quiet = quiet or not d.main
    try:
        captioner = Captioner.load(model, dev, amp=amp, backend=backend, int8=int8)
        files = find_images(paths)
        if not files:
            raise UserError(f"no image files found in {' '.join(paths)}; give files, folders or globs "
                            "(jpg, png, bmp, gif, webp, tiff)")
        options = captioner.decode_options(beam=beam, max_length=max_length, block_ngrams=block_ngrams, seed=seed,
                                           sample={"temperature": temperature, "top_k": top_k} if sample else None,
                                           allow_unk=allow_unk, dangling=dangling_words(dangling))
        with make_progress(quiet or len(files) < 2) as bar:
            task = bar.add_task("caption", total=len(files), info=f"beam {beam}" if not sample else "sampling")
            rows = caption_files(captioner, files, options, output=output, resume=resume, dist=d,
                                 progress=lambda done, n: bar.update(task, completed=done), batch_size=batch_size,
                                 num_workers=resolve_num_workers("auto" if workers is None else workers, d),
                                 attention_dir=attention_maps)
    finally:
        cleanup_distributed(d)
    if rows is None:  # not rank 0
        return
    failed = sum(r["caption"] is None for r in rows)
    how = f"sampled at temperature {temperature:g}" + (f", top-{top_k}" if top_k else "") if sample else f"beam {beam}"
    if len(rows) <= 50 and not quiet:
        console.print(table(f"Captions ({model}, {how})", ["file", "caption"],
                            [(r["file"], r["caption"] if r["caption"] is not None else f"error: {r['error']}")
                             for r in rows]))
    console.print(f"{len(rows) - failed} image(s) captioned, {failed} unreadable ({how})"
                  + (f"; wrote {output}" if output is not None else ""), highlight=False)
    if attention_maps is not None:
        console.print(f"attention maps in {attention_maps}")
    if rows and failed == len(rows):
        raise UserError("no image could be read; see the errors above")
