"""`capcli evaluate CHECKPOINT --data DIR` and `capcli evaluate --results captions.json --data DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.cli.common import (AllowUnkOpt, BackendOpt, BlockNgramsOpt, DanglingOpt, DebugOpt, DeviceOpt, Int8Opt,
                               ModelAmpOpt, QuietOpt, backend_device, command, dangling_words, resolve_device)
from capcli.errors import UserError
from capcli.report import console, make_progress, metrics_table
from capcli.store.files import write_json


@command(torch=True)
def evaluate(
    checkpoint: Annotated[Optional[str], typer.Argument(help="A trained captioner: run dir (its best.pt), checkpoint file, model folder (capcli export) or hf-hub:user/name.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset dir (default: the one the model trained on).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "test",
    beam: Annotated[int, typer.Option("--beam", min=1, max=50, help="Beam size (1 = greedy).")] = 3,
    max_length: Annotated[int, typer.Option("--max-length", min=0, help="Longest caption in words (0 = dataset's).")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images decoded at once (default: 32 on a CPU, 128 on a GPU).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=0, help="Score only the first N images (0 = all).")] = 0,
    block_ngrams: BlockNgramsOpt = None,
    allow_unk: AllowUnkOpt = False,
    dangling: DanglingOpt = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="Score this COCO results file instead of a model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="eval.json path; captions.json goes beside it (default: RUN/eval-SPLIT/ for a run, else ./eval.json).")] = None,
    meteor: Annotated[Optional[bool], typer.Option("--meteor/--no-meteor", help="METEOR needs Java; default: when available.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader workers.")] = 0,
    amp: ModelAmpOpt = None,
    backend: BackendOpt = "torch",
    int8: Int8Opt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Score a captioner with free-running beam search (no teacher forcing): BLEU-1..4, METEOR,
    ROUGE-L, CIDEr-D, sacreBLEU, plus teacher-forced loss and top-5 accuracy.

    Examples:
      capcli evaluate runs/tiny --data data/synthetic --split test --beam 3
      capcli evaluate runs/tiny/checkpoints/best.pt --beam 5 --block-ngrams 0 --output results/eval.json
      capcli evaluate runs/tiny --allow-unk --dangling none      (the raw model: <unk> and any last word)
      capcli evaluate runs/coco --amp bf16        (bf16 on an AMX CPU: faster, scores may move slightly)
      capcli evaluate models/coco --data data/coco --backend onnxruntime --int8   (the ONNX graphs: captions only)
      capcli evaluate --results captions.json --data data/coco --split test
    """
    from capcli.data.dataset import CaptionDataset
    from capcli.evaluate import decode_options, evaluate_checkpoint, score_results

    if results is not None:
        if amp is not None:
            raise UserError("--amp sets a model's precision; --results scores captions already made")
        if checkpoint is not None:
            raise UserError("give either a CHECKPOINT or --results, not both")
        if data is None:
            raise UserError("--results needs --data DIR (the dataset whose references score it)")
        dataset = CaptionDataset(data, split, max_images=max_images)
        scores = score_results(results, dataset, meteor=meteor)
        out = write_json(output or results.with_name("eval.json"), scores)
        console.print(metrics_table(scores, f"{results} on {data}, split {split}"))
        console.print(f"wrote {out}")
        return
    if checkpoint is None:
        raise UserError("give a CHECKPOINT (file or run dir) or --results captions.json")
    dev = resolve_device(backend_device(backend, device))
    with make_progress(quiet) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label, info = ("cache features", "frozen encoder, once") if phase == "cache" else (f"beam {beam}", split)
                tasks[phase] = bar.add_task(label, total=total, info=info)
            bar.update(tasks[phase], completed=done)

        scores, output = evaluate_checkpoint(
            checkpoint, dev, decode_options(beam, max_length, block_ngrams, allow_unk, dangling_words(dangling)),
            data=data, split=split, amp=amp, batch_size=batch_size, max_images=max_images, num_workers=workers,
            meteor=meteor, output=output, progress=progress, backend=backend, int8=int8)
    console.print(metrics_table(scores, f"{checkpoint} on {scores['data']}, split {split}, beam {beam}"))
    console.print(f"wrote {output} and {output.with_name('captions.json')}")
    console.print("seconds: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in scores["seconds"].items()))
