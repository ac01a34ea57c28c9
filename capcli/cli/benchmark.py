"""`capcli benchmark ...`: speed, size and quality side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import (BackendOpt, DebugOpt, DeviceOpt, Int8Opt, QuietOpt, backend_device, command,
                               resolve_device)
from capcli.errors import UserError
from capcli.report import console, make_progress, table
from capcli.store.files import write_json

app = typer.Typer(help="Benchmarks: encoders, decoding, training steps, preparing, the paper's study grid.",
                  no_args_is_help=True)

AmpOpt = Annotated[str, typer.Option("--amp", help="Precision: auto | off | bf16 | fp16. auto: bf16 (fp16 where bf16 is missing) on CUDA, float32 on a CPU; bf16 also runs on a CPU (fast with AMX or AVX512-BF16).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Timed iterations.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up iterations first.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0 = torch's default; fewer can be faster on a busy machine).")]


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _tracker(bar, task, label: str):
    """A bench.ProgressFn that shows ``label phase`` and done/total on one rich task."""

    def update(phase: str, done: int, total: int) -> None:
        bar.update(task, description=f"{label} {phase}", completed=done, total=total)

    return update


def _pairs_table(title: str, result: dict, keys: list[tuple[str, str, int]]):
    rows = [(label, _num(result.get(key), digits) if isinstance(result.get(key), (int, float))
             and not isinstance(result.get(key), bool) else str(result.get(key, "-")))
            for key, label, digits in keys]
    return table(title, ["", "value"], rows)


@app.command("encoders")
@command(torch=True)
def encoders(
    encoders: Annotated[Optional[str], typer.Option("--encoders", help="Comma-separated timm names (default: convnext_atto,convnext_femto,convnext_pico on CPU; convnext_tiny,convnext_small,convnext_base on CUDA).")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=16, help="Square input size (default: --data's size, else 224).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per inference step.")] = 32,
    train_batch: Annotated[Optional[int], typer.Option("--train-batch", min=1, help="Caption-image pairs per training step (default: --batch x 5).")] = None,
    steps: StepsOpt = 10,
    warmup: WarmupOpt = 3,
    grid: Annotated[int, typer.Option("--grid", min=1, help="Feature grid side (7 = 49 regions, as the paper).")] = 7,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset dir: benchmark at its image size.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file for the rows.")] = Path("benchmark.json"),
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write a PNG scatter of images/s against parameters.")] = None,
    amp: AmpOpt = "auto",
    threads: ThreadsOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Compare encoders: parameters, GFLOPs, images/s, training pairs/s, peak memory.

    GFLOPs are per image (a multiply-add counts 2 FLOPs); images/s is encoder inference; training
    pairs/s is caption-image pairs per second of a finetuning step (encoder + decoder, 5 random
    captions of 16 words per image). Random weights, random data.

    Examples:
      capcli benchmark encoders
      capcli benchmark encoders --encoders convnext_atto,convnext_nano --image-size 96 --batch 16 --plot bench.png
      capcli benchmark encoders --encoders convnext_tiny,convnext_base --data data/coco --device cuda
    """
    from capcli.bench.encoders import CPU_ENCODERS, GPU_ENCODERS, bench_encoder
    from capcli.bench.harness import device_name, env_info, load_average, set_threads
    from capcli.bench.plot import plot_encoders
    from capcli.models.encoder import check_encoder_names

    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot}: give a .png file name")
    dev = resolve_device(device)
    set_threads(threads)
    names = [n.strip() for n in (encoders or "").split(",") if n.strip()]
    if encoders is not None and not names:
        raise UserError("--encoders is empty; give comma-separated timm names, e.g. convnext_atto,convnext_femto")
    names = names or list(GPU_ENCODERS if dev.type == "cuda" else CPU_ENCODERS)
    check_encoder_names(names)  # fail on a typo before minutes of benchmarking
    size_from = "--image-size" if image_size else "default"
    if data is not None:
        from capcli.data.dataset import read_manifest

        manifest = read_manifest(data)
        if not image_size:
            if not manifest.get("image_size"):
                raise UserError(f"{data}/manifest.json has no image_size; give --image-size")
            image_size, size_from = int(manifest["image_size"]), str(data)
    image_size = image_size or 224

    env = env_info(dev)  # load_avg_1m before the runs; load_avg_1m_end after them
    rows = []
    with make_progress(quiet) as bar:
        for name in names:
            task = bar.add_task(name, total=None, info=f"{image_size}px")
            rows.append(bench_encoder(name, image_size=image_size, batch=batch, device=dev, amp=amp,
                                            grid=grid, steps=steps, warmup=warmup, train_batch=train_batch,
                                            progress=_tracker(bar, task, name)))
            bar.update(task, description=f"{name} done")
    settings = {"encoders": names, "image_size": image_size, "image_size_from": size_from, "batch": batch,
                "train_batch": train_batch or batch * 5, "captions_per_image": 5, "caption_words": 16,
                "vocab": 1000, "steps": steps, "warmup": warmup, "grid": grid, "amp": rows[0]["amp"],
                "device": str(dev), "threads": threads or None, "weights": "random",
                "peak_mem_kind": rows[0]["peak_mem_kind"],
                "gflops_counts": "FlopCounterMode, multiply-add = 2 FLOPs, one image"}
    env["load_avg_1m_end"] = load_average()
    write_json(output, {"rows": rows, "settings": settings, "env": env})
    kind = rows[0]["peak_mem_kind"] or "not measured"
    console.print(table(
        f"Encoders at {image_size}px on {dev} (batch {batch}; peak memory: {kind})",
        ["encoder", "params (M)", "GFLOPs", "images/s", "train samples/s", "peak MB"],
        [(r["encoder"], _num(r["params_m"], 2), _num(r["gflops"], 3), _num(r["images_per_s"], 1),
          _num(r["train_samples_per_s"], 1), _num(r["peak_mem_mb"], 0)) for r in rows]))
    console.print(f"wrote {output}")
    if plot is not None:
        plot_encoders(rows, plot, title=f"{device_name(dev)}, {image_size}px, batch {batch}")
        console.print(f"wrote {plot}")


@app.command("train")
@command(torch=True)
def train(
    encoder: Annotated[str, typer.Option("--encoder", help="timm model name, e.g. convnext_tiny.")],
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Square input size.")] = 224,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Caption-image pairs per step (images = batch // captions per image).")] = 32,
    mode: Annotated[str, typer.Option("--mode", help="finetune (encoder + decoder) | frozen (encoder under no_grad) | cached (decoder on precomputed features).")] = "finetune",
    steps: StepsOpt = 10,
    warmup: WarmupOpt = 3,
    captions_per_image: Annotated[int, typer.Option("--captions-per-image", min=1, help="Captions per image.")] = 5,
    vocab: Annotated[int, typer.Option("--vocab", min=5, help="Vocabulary size of the random captions.")] = 1000,
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Longest random caption in words; lengths are drawn uniformly from half of it up.")] = 20,
    grid: Annotated[int, typer.Option("--grid", min=1, help="Feature grid side.")] = 7,
    tf_ratio: Annotated[float, typer.Option("--tf-ratio", min=0.0, max=1.0, help="Teacher-forcing ratio (1 = always the ground-truth word).")] = 1.0,
    channels_last: Annotated[str, typer.Option("--channels-last", help="Encoder memory format: auto (convnets) | true | false.")] = "auto",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the result to this JSON file.")] = None,
    amp: AmpOpt = "auto",
    threads: ThreadsOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Training-step throughput in caption-image pairs per second: the trainer's own step.

    A step is forward, loss, backward and Adam on random images and captions; --batch counts
    caption-image pairs, so each step encodes --batch // --captions-per-image images.

    Examples:
      capcli benchmark train --encoder convnext_tiny --image-size 224 --batch 32 --mode finetune
      capcli benchmark train --encoder convnext_base --mode cached --batch 160 --steps 20 --output train.json
      capcli benchmark train --encoder convnext_atto --image-size 96 --mode frozen --device cpu
    """
    from capcli.bench.harness import env_info, load_average, set_threads
    from capcli.bench.train import MODES, bench_train

    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    cl = {"auto": "auto", "true": True, "false": False}.get(channels_last.lower())
    if cl is None:
        raise UserError(f"--channels-last {channels_last!r}: use auto, true or false")
    dev = resolve_device(device)
    set_threads(threads)
    env = env_info(dev)
    with make_progress(quiet) as bar:
        task = bar.add_task(encoder, total=None, info=f"{mode}, batch {batch}")
        result = bench_train(encoder, image_size=image_size, batch=batch, mode=mode, steps=steps,
                                   warmup=warmup, device=dev, amp=amp, captions_per_image=captions_per_image,
                                   vocab=vocab, max_length=max_length, grid=grid, tf_ratio=tf_ratio,
                                   channels_last=cl, progress=_tracker(bar, task, encoder))
    console.print(_pairs_table(f"Training steps: {encoder}, {mode}, {image_size}px on {dev}", result, [
        ("samples_per_s", "caption-image pairs/s", 1), ("images_per_s", "images/s", 1),
        ("step_ms", "step ms (median)", 1), ("peak_mem_mb", f"peak MB ({result['peak_mem_kind']})", 0),
        ("batch", "pairs per step", 0), ("images_per_step", "images per step", 0), ("tf_ratio", "teacher forcing", 2),
        ("channels_last", "channels_last", 0), ("amp", "amp", 0)]))
    if output is not None:
        write_json(output, {**result, "env": {**env, "load_avg_1m_end": load_average()}})
        console.print(f"wrote {output}")


@app.command("decode")
@command(torch=True)
def decode(
    encoder: Annotated[Optional[str], typer.Option("--encoder", help="timm model name (default: the checkpoint's).")] = None,
    beam: Annotated[int, typer.Option("--beam", min=1, max=50, help="Beam size (1 = greedy).")] = 3,
    images: Annotated[int, typer.Option("--images", min=1, help="Images to caption.")] = 64,
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Longest caption in words.")] = 20,
    vocab: Annotated[int, typer.Option("--vocab", min=5, help="Vocabulary size of the random decoder.")] = 1000,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=16, help="Square input size (default: the checkpoint's, else 224).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Images captioned at once (default: caption's, 32 on a CPU, 128 on a GPU).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up batches first.")] = 1,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Trained weights: .pt or run dir (default: random weights).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the result to this JSON file.")] = None,
    amp: AmpOpt = "auto",
    backend: BackendOpt = "torch",
    int8: Int8Opt = False,
    block_ngrams: Annotated[int, typer.Option("--block-ngrams", min=0, help="Never repeat an n-gram of this size (0 = off, the default here; caption's default is 3).")] = 0,
    threads: ThreadsOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Captioning throughput (encoder + beam search) in images captioned per second.

    With random weights the decoder rarely emits <end>, so captions run to --max-length: the
    worst case.

    Examples:
      capcli benchmark decode --encoder convnext_atto --beam 3 --images 64 --max-length 20 --vocab 50
      capcli benchmark decode --encoder convnext_tiny --beam 5 --images 512 --vocab 10000 --device cuda
      capcli benchmark decode --checkpoint runs/tiny/checkpoints/best.pt --beam 5 --output decode.json
      capcli benchmark decode --checkpoint models/coco-onnx --backend onnxruntime --int8 --beam 3
      capcli benchmark decode --encoder convnext_atto --backend onnxruntime --beam 5   (a random model, exported first)
    """
    from capcli.bench.decode import bench_decode
    from capcli.bench.harness import env_info, load_average, set_threads

    dev = resolve_device(backend_device(backend, device))
    set_threads(threads)
    env = env_info(dev)
    with make_progress(quiet) as bar:
        label = encoder or (checkpoint.name if checkpoint else "decode")
        task = bar.add_task(label, total=images, info=f"beam {beam}")
        result = bench_decode(encoder, beam=beam, images=images, max_length=max_length, vocab=vocab,
                                    image_size=image_size, device=dev, checkpoint=checkpoint, batch=batch,
                                    warmup=warmup, amp=amp, progress=_tracker(bar, task, label),
                                    backend=backend, int8=int8, block_ngrams=block_ngrams)
    console.print(_pairs_table(
        f"Decoding: {result['encoder']} ({result['weights']} weights), beam {beam}, "
        f"{result['image_size']}px on {dev}, {result['backend']}", result, [
            ("captions_per_s", "images captioned/s", 2), ("ms_per_image", "ms per image", 1),
            ("batch_ms", "ms per batch (median)", 1), ("batch", "images per batch", 0),
            ("mean_words", "words per caption", 1), ("ended_fraction", "ended before max length", 2),
            ("peak_mem_mb", f"peak MB ({result['peak_mem_kind']})", 0)]))
    if result.get("note") and not quiet:
        console.print(f"note: {result['note']}")
    if output is not None:
        write_json(output, {**result, "env": {**env, "load_avg_1m_end": load_average()}})
        console.print(f"wrote {output}")


@app.command("prepare")
@command
def prepare(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs (e.g. ../shared/data/coco-val500/val2017).")],
    size: Annotated[int, typer.Option("--size", min=16, help="Side of the stored images, px.")] = 256,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Worker processes (default: every CPU).")] = None,
    resize: Annotated[str, typer.Option("--resize", help="squash | crop")] = "squash",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Alternate both paths this many times; keep each one's best.")] = 3,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Use only the first N files (0 = all).")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the result to this JSON file.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Prepare's images/s next to bare Pillow decode+resize of the same files on the same cores.

    Examples:
      capcli benchmark prepare ../shared/data/coco-val500/val2017 --size 256 --repeats 3
      capcli benchmark prepare photos/ --workers 8 --resize crop --output prepare_bench.json
    """
    from capcli.bench.harness import env_info
    from capcli.bench.prepare import bench_prepare

    if resize not in ("squash", "crop"):
        raise UserError(f"--resize {resize!r}: use squash or crop")
    with make_progress(quiet) as bar:
        task = bar.add_task("prepare", total=None, info="")
        result = bench_prepare(images, size, workers, resize_policy=resize, repeats=repeats, limit=limit,
                               progress=lambda phase, done, total: bar.update(
                                   task, description=phase, completed=done, total=total))
    console.print(_pairs_table(
        f"Prepare vs bare Pillow: {result['images']} images at {size}px, {result['workers']} workers", result, [
            ("bare_images_per_s", "bare Pillow images/s", 1), ("prepare_images_per_s", "prepare images/s", 1),
            ("ratio", "prepare / bare", 3), ("skipped", "skipped", 0),
            ("parent_peak_rss_mb", "peak RSS, main process MB", 0), ("worker_peak_rss_mb", "peak RSS, a worker MB", 0)]))
    if output is not None:
        write_json(output, {**result, "env": env_info(resolve_device("cpu"))})
        console.print(f"wrote {output}")


@app.command("study")
@command(torch=True)
def study(
    grid: Annotated[str, typer.Argument(help="Grid YAML path, or a shipped grid: paper, tiny.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value applied to every run, e.g. data.dir=data/coco", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSON file for the rows (default: the study's run folder).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the combinations and stop.")] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """The paper's grid: train and score every combination (encoders x learning rates x teacher
    forcing), then one table of BLEU-1..4, CIDEr-D and top-5 side by side.

    Every reported score decodes without teacher forcing (beam search on the grid's split). A
    stopped study continues where it stopped: finished combinations are read back, not retrained.

    Examples:
      capcli benchmark study tiny data.dir=data/synthetic
      capcli benchmark study paper data.dir=data/coco --dry-run
      capcli benchmark study my_grid.yaml train.epochs=5 --output study.json
    """
    from capcli.bench.study import combinations, load_grid, run_study

    spec = load_grid(grid)
    combos = combinations(spec, overrides)
    keys = list(spec["grid"])
    if dry_run:
        console.print(table(f"{len(combos)} runs of {spec['name']} (base config {spec['config']})",
                            ["run", *keys], [(name, *values) for name, _, values in combos]))
        return
    from capcli.cli.train import training_progress

    dev = resolve_device(device)
    with make_progress(quiet) as bar:
        state: dict = {}

        def progress(event: str, **info) -> None:
            if event == "run_start":
                state["run"] = f"[{info['index'] + 1}/{info['total']}] {info['name']}"
                state["train"] = training_progress(bar, quiet=True, prefix=f"{state['run']} ")
            elif event != "run_end":
                state["train"](event, **info)  # the training loop's own events
            elif not quiet:
                r = info["row"]
                bar.console.print(f"{state['run']}: BLEU-4 {100 * r['bleu4']:.2f} top-5 "
                                  f"{100 * (r['top5'] or 0):.1f}%{' (reused)' if r['reused'] else ''}")

        rows = run_study(spec, dev, extra=overrides, progress=progress)
    console.print(table(f"Study {spec['name']}: {spec['evaluate'].get('split', 'test')} split, beam "
                        f"{spec['evaluate'].get('beam', 3)}, no teacher forcing",
                        [*keys, "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "top-5"],
                        [(*(str(r[k]) for k in keys), *(f"{100 * r[m]:.2f}" for m in ("bleu1", "bleu2", "bleu3", "bleu4")),
                          f"{r['cider']:.3f}", f"{100 * r['top5']:.1f}" if r["top5"] is not None else "-")
                         for r in rows]))
    out = output or Path(rows[0]["run_dir"]).parent / "study.json"
    write_json(out, {"grid": spec, "rows": rows})
    from capcli.bench.plot import plot_study

    png = plot_study(rows, keys, out.with_suffix(".png"),
                     title=f"{spec['name']}: {spec['evaluate'].get('split', 'test')} split, beam "
                           f"{spec['evaluate'].get('beam', 3)}, no teacher forcing")
    console.print(f"wrote {out} and {png}")
