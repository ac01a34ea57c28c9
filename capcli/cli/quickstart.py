"""`capcli quickstart`: the built-in default, end to end: synthetic data -> train -> evaluate -> caption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from capcli.cli.common import DebugOpt, DeviceOpt, QuietOpt, command, resolve_device
from capcli.report import console, err_console, make_progress, metrics_table, table
from capcli.store.files import write_json


@command(torch=True)
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the quickstart writes.")] = Path("quickstart"),
    images: Annotated[int, typer.Option("--images", "-n", min=30, help="Synthetic scenes to render.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=32, help="Image size, px.")] = 96,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs (default: the tiny config's).")] = None,
    beam: Annotated[int, typer.Option("--beam", min=1, help="Beam size for evaluation and captions.")] = 3,
    overrides: Annotated[Optional[List[str]], typer.Argument(help="Extra key=value overrides for the tiny config.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Render synthetic scenes, train the tiny config, evaluate on the test split with beam search,
    and caption a few test images: all in one folder, in a few minutes on a CPU.

    Examples:
      capcli quickstart
      capcli quickstart --out /tmp/qs --images 500 --epochs 2 train.lr=1e-3
    """
    import random

    from capcli.api import Captioner
    from capcli.caption import caption_files
    from capcli.cli.prepare import run_with_progress
    from capcli.cli.train import training_progress
    from capcli.config import load_config
    from capcli.data.dataset import CaptionDataset
    from capcli.data.prepare import write_dataset
    from capcli.data.synthetic import records, render, save_png
    from capcli.decode import DecodeOptions
    from capcli.errors import UserError
    from capcli.evaluate import evaluate_checkpoint, score_results
    from capcli.training.trainer import train as run_training

    dev = resolve_device(device)
    data_dir = out / "data"
    step = lambda n, text: err_console.print(f"\n[bold cyan]{n}/4[/] {text}") if not quiet else None

    # the config first: a bad override fails before any data is made
    cfg = load_config("tiny", [f"data.dir={data_dir}", f"run.dir={out / 'runs'}", "run.name=tiny",
                               "run.overwrite=true", *([f"train.epochs={epochs}"] if epochs else []),
                               *(overrides or [])])

    step(1, f"prepare: {images} synthetic scenes at {size} px -> {data_dir}")
    recs = records(images, 0)
    settings = dict(records=recs, out_dir=data_dir, source="synthetic", image_size=size, loader=render,
                    min_word_freq=1, max_length=20)
    try:  # the same scenes as last time: reused as they are
        run_with_progress(quiet, write_dataset, **settings)
    except UserError:  # other --images/--size than last time: this folder is the quickstart's own
        run_with_progress(quiet, write_dataset, overwrite=True, **settings)

    step(2, "train: configs/tiny.yaml (convnext_atto from scratch + attention LSTM)")

    with make_progress(quiet) as bar:
        summary = run_training(cfg, dev, progress=training_progress(bar, quiet))
    run_dir = Path(summary["run_dir"])

    step(3, f"evaluate: test split, beam {beam}, no teacher forcing")
    captioner = Captioner.load(run_dir / "checkpoints" / "best.pt", dev)  # loaded once: evaluated, then captioning
    # in the model's precision, as `capcli evaluate`: eval-test/eval.json and captions.json
    scores, eval_path = evaluate_checkpoint(captioner, dev, DecodeOptions(beam_size=beam), data=data_dir,
                                            split="test", output=run_dir / "eval-test" / "eval.json")
    eval_dir = eval_path.parent
    captions = json.loads((eval_dir / "captions.json").read_text())
    # the same captions shuffled across images: what a model that ignores the image would score
    shuffled = [c["caption"] for c in captions]
    random.Random(0).shuffle(shuffled)
    shuffled_path = write_json(eval_dir / "captions_shuffled.json",
                               [{"image_id": c["image_id"], "caption": s} for c, s in zip(captions, shuffled)])
    base = score_results(shuffled_path, CaptionDataset(data_dir, "test"), meteor=False)
    scores["shuffled_bleu4"] = base["bleu4"]
    write_json(eval_path, scores)
    if not quiet:
        console.print(metrics_table(scores, f"test split ({scores['images']} images), beam {beam}"))
        console.print(f"BLEU-4 {100 * scores['bleu4']:.2f} vs {100 * base['bleu4']:.2f} for the same captions "
                      "shuffled across images")

    step(4, "caption: a few test images as PNG files")
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    test_recs = [r for r in recs if r.split == "test"][:6]
    files = []
    for r in test_recs:
        path = img_dir / r.file_name
        save_png(r.source, path, size)
        files.append(path)
    rows = caption_files(captioner, files, captioner.decode_options(beam=beam), attention_dir=out / "attention")
    write_json(out / "captions.json", rows)
    refs = {str(img_dir / r.file_name): r.captions[0] for r in test_recs}
    console.print(table("Captions of test images", ["file", "caption", "a reference"],
                        [(r["file"], r["caption"] or "", refs.get(r["file"], "")) for r in rows]))
    console.print(f"\ndata:        {data_dir}\nrun:         {run_dir}  (checkpoints/, metrics.jsonl, config.yaml)\n"
                  f"evaluation:  {eval_dir / 'eval.json'}, {eval_dir / 'captions.json'}\n"
                  f"captions:    {out / 'captions.json'}\nattention:   {out / 'attention'}\n"
                  f"next:        capcli caption {run_dir} {img_dir}\n"
                  f"             capcli demo {run_dir}   (a web page; pip install \"capcli\\[demo]\")")
