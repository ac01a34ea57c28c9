"""`capcli evaluate CHECKPOINT --data DIR` and `capcli evaluate --results captions.json --data DIR`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, ModelAmpOpt, QuietOpt, command, resolve_device
from capcli.errors import UserError
from capcli.report import console, make_progress, metrics_table, write_json


@command(torch=True)
def evaluate(
    checkpoint: Annotated[Optional[str], typer.Argument(help="A trained captioner: run dir (its best.pt), checkpoint file, model folder (capcli export) or hf-hub:user/name.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset dir (default: the one the model trained on).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "test",
    beam: Annotated[int, typer.Option("--beam", min=1, max=50, help="Beam size (1 = greedy).")] = 3,
    max_length: Annotated[int, typer.Option("--max-length", min=0, help="Longest caption in words (0 = dataset's).")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images decoded at once (default: 32 on a CPU, 128 on a GPU).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=0, help="Score only the first N images (0 = all).")] = 0,
    block_ngrams: Annotated[int, typer.Option("--block-ngrams", min=0, help="Never repeat an n-gram of this size within a caption (0 = off).")] = 0,
    results: Annotated[Optional[Path], typer.Option("--results", help="Score this COCO results file instead of a model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="eval.json path; captions.json goes beside it (default: RUN/eval-SPLIT/ for a run, else ./eval.json).")] = None,
    meteor: Annotated[Optional[bool], typer.Option("--meteor/--no-meteor", help="METEOR needs Java; default: when available.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader workers.")] = 0,
    amp: ModelAmpOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Score a captioner with free-running beam search (no teacher forcing): BLEU-1..4, METEOR,
    ROUGE-L, CIDEr-D, sacreBLEU, plus teacher-forced loss and top-5 accuracy.

    Examples:
      capcli evaluate runs/tiny --data data/synthetic --split test --beam 3
      capcli evaluate runs/tiny/checkpoints/best.pt --beam 5 --block-ngrams 3 --output results/eval.json
      capcli evaluate runs/coco --amp bf16        (bf16 on an AMX CPU: faster, scores may move slightly)
      capcli evaluate --results captions.json --data data/coco --split test
    """
    from capcli.data.dataset import CaptionDataset
    from capcli.evaluate import default_batch_size, evaluate_model, score_results
    from capcli.training.runtime import autocast_dtype

    if results is not None:
        if amp is not None:
            raise UserError("--amp sets a model's precision; --results scores captions already made")
        if checkpoint is not None:
            raise UserError("give either a CHECKPOINT or --results, not both")
        if data is None:
            raise UserError("--results needs --data DIR (the dataset whose references score it)")
        dataset = CaptionDataset(data, split, max_images=max_images)
        scores = score_results(results, dataset, meteor=meteor)
        out = output or results.with_name("eval.json")
        write_json(out, scores)
        console.print(metrics_table(scores, f"{results} on {data}, split {split}"))
        console.print(f"wrote {out}")
        return
    if checkpoint is None:
        raise UserError("give a CHECKPOINT (file or run dir) or --results captions.json")
    from capcli.api import load_captioner

    t_start = time.perf_counter()
    dev = resolve_device(device)
    batch_size = batch_size or default_batch_size(dev)
    amp_dtype = autocast_dtype(amp, dev) if amp is not None else None  # a bad value fails before the model is read
    model, vocab, cfg, ckpt = load_captioner(checkpoint, dev)
    if amp is None:  # the model's own precision
        amp_dtype = autocast_dtype(cfg.train.amp, dev)
    load_s = time.perf_counter() - t_start
    data = data or Path(ckpt.get("data", {}).get("dir", cfg.data.dir))
    dataset = CaptionDataset(data, split, max_images=max_images)
    with make_progress(quiet) as bar:
        features = None
        t0 = time.perf_counter()
        if not cfg.model.finetune and cfg.train.cache_features:  # a frozen encoder: its feature cache
            features = frozen_features(model, dataset, dev, amp_dtype, batch_size, bar)
        cache_s = time.perf_counter() - t0
        task = bar.add_task(f"beam {beam}", total=len(dataset), info=split)
        scores = evaluate_model(model, dataset, dev, beam_size=beam, max_length=max_length,
                                batch_size=batch_size, num_workers=workers, alpha_c=cfg.train.alpha_c,
                                amp_dtype=amp_dtype, meteor=meteor, vocab=vocab, features=features,
                                block_ngrams=block_ngrams,
                                progress=lambda done, n: bar.update(task, completed=done))
    captions = scores.pop("captions")
    scores.update({"checkpoint": str(checkpoint), "data": str(data), "split": split})
    # load: checkpoint and model; feature_cache: a frozen encoder's cache of this split, made on
    # the first evaluation only; total: the command from its start (Python's imports before it)
    scores["seconds"] = {"load": round(load_s, 3), "feature_cache": round(cache_s, 3), **scores["seconds"],
                         "total": round(time.perf_counter() - t_start, 3)}
    if output is None:
        ckpt_path = Path(checkpoint)
        run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
        output = (run_dir / f"eval-{split}" / "eval.json") if (run_dir / "config.yaml").is_file() else Path("eval.json")
    write_json(output, scores)
    write_json(output.with_name("captions.json"), captions)
    console.print(metrics_table(scores, f"{checkpoint} on {data}, split {split}, beam {beam}"))
    console.print(f"wrote {output} and {output.with_name('captions.json')}")
    console.print("seconds: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in scores["seconds"].items()))


def frozen_features(model, dataset, device, amp_dtype, batch_size: int, bar):
    """The split's cached features for a model trained with a frozen encoder (made now if
    missing, beside the training caches, reused by later evaluations); None where the dataset dir
    cannot be written."""
    import os

    from capcli.data.features import build_cache, cache_dir, cache_file

    path = cache_file(cache_dir(dataset.dir, model.encoder), dataset, amp_dtype)
    if path.is_file():
        return path
    if not os.access(dataset.dir, os.W_OK):
        return None
    task = bar.add_task(f"cache {dataset.split} features", total=len(dataset), info="frozen encoder, once")
    build_cache(model.encoder, dataset, device, path, batch_size=batch_size, amp_dtype=amp_dtype,
                progress=lambda done, n: bar.update(task, completed=done))
    return path
