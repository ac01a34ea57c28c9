"""Every command through the CLI on tiny data: exit codes, files and their contents, error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from capcli.data.synthetic import make_scenes, save_png
from tests.conftest import TINY_OVERRIDES, invoke

EVAL_KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "sacrebleu", "loss", "top5",
             "images", "beam_size", "captions_per_s", "amp"}


def test_help_everywhere_has_an_example(runner):
    for cmd in (["prepare", "synthetic"], ["prepare", "coco"], ["prepare", "karpathy"], ["prepare", "folder"],
                ["train"], ["evaluate"], ["caption"], ["quickstart"], ["benchmark", "encoders"],
                ["benchmark", "train"], ["benchmark", "decode"], ["benchmark", "prepare"], ["benchmark", "study"],
                ["export"], ["push"]):
        result = invoke(runner, [*cmd, "--help"])
        assert "Example" in result.output, cmd


def test_prepare_synthetic_writes_dataset_dir(tiny_data):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["image_size"] == 32
    assert sum(s["images"] for s in manifest["splits"].values()) == 60
    vocab = json.loads((tiny_data / "vocab.json").read_text())
    assert vocab[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "circle" in vocab
    with h5py.File(tiny_data / "train.h5") as f:
        n = manifest["splits"]["train"]["images"]
        assert f["images"].shape == (n, 3, 32, 32) and f["images"].dtype.name == "uint8"
        assert f["images"].chunks == (1, 3, 32, 32)
        assert f["captions"].shape[0] == n * manifest["captions_per_image"]
        assert f["reference_offsets"][-1] == len(f["references"])


def test_prepare_same_seed_is_deterministic(runner, tmp_path):
    for name in ("a", "b"):
        invoke(runner, ["prepare", "synthetic", "--out", tmp_path / name, "--images", 12, "--size", 32, "-q"])
    with h5py.File(tmp_path / "a" / "train.h5") as fa, h5py.File(tmp_path / "b" / "train.h5") as fb:
        for key in ("images", "captions", "references"):
            assert (fa[key][:] == fb[key][:]).all()


def test_train_writes_run_dir(tiny_run):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["model"]["encoder"] == "convnext_atto" and cfg["train"]["epochs"] == 1
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    for key in ("train_loss", "train_top5", "val_loss", "val_top5", "val_bleu1", "val_bleu4", "val_cider",
                "samples_per_s", "lr"):
        assert key in lines[0], key
    assert 0 <= lines[0]["val_bleu4"] <= 1 and 0 <= lines[0]["val_top5"] <= 1
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tiny_run / "checkpoints" / name, weights_only=True)  # no pickled code
        assert {"model", "optimizer", "config", "vocab", "epoch", "step", "best_score", "rng",
                "capcli_version"} <= set(ckpt)
        assert ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
        assert ckpt["epoch"] == 1


def test_train_numbers_a_taken_run_name(runner, tiny_data, tiny_run):
    invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tiny_run.parent}", "run.name=t",
                    *TINY_OVERRIDES, "data.val_max_images=2", "--device", "cpu", "-q"])
    assert (tiny_run.parent / "t-2" / "checkpoints" / "last.pt").is_file()


def test_evaluate_writes_eval_and_coco_captions(runner, tiny_data, tiny_run, tmp_path):
    out = tmp_path / "ev" / "eval.json"
    invoke(runner, ["evaluate", tiny_run, "--data", tiny_data, "--split", "test", "--beam", 2,
                    "--output", out, "--device", "cpu", "-q"])
    scores = json.loads(out.read_text())
    assert EVAL_KEYS <= set(scores)
    n_test = json.loads((tiny_data / "manifest.json").read_text())["splits"]["test"]["images"]
    assert scores["images"] == n_test and scores["beam_size"] == 2
    # every decoding setting: the dataset's longest caption when --max-length is not given
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    from capcli.text import BLOCK_NGRAMS, DANGLING_EN

    assert (scores["max_length"], scores["length_penalty"], scores["block_ngrams"], scores["allow_unk"],
            scores["dangling"]) == (manifest["vocab"]["max_length"], 0.0, BLOCK_NGRAMS, False, list(DANGLING_EN))
    for key in ("bleu1", "bleu4", "rouge_l", "top5"):
        assert 0.0 <= scores[key] <= 1.0
    # where the time went, phase by phase, within the command's total
    seconds = scores["seconds"]
    assert set(seconds) == {"load", "feature_cache", "encode", "beam", "teacher_forced", "scoring", "total"}
    assert all(v >= 0 for v in seconds.values()) and seconds["beam"] > 0 and seconds["teacher_forced"] > 0
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"] + 0.01
    decode_s = seconds["encode"] + seconds["beam"]  # each rounded to 1 ms in eval.json
    assert n_test / (decode_s + 0.001) <= scores["captions_per_s"] <= n_test / max(decode_s - 0.001, 1e-9)
    captions = json.loads((out.parent / "captions.json").read_text())
    assert len(captions) == n_test and {"image_id", "caption"} == set(captions[0])
    # scoring the results file again without a model gives the same caption scores
    out2 = tmp_path / "ev2" / "eval.json"
    invoke(runner, ["evaluate", "--results", out.parent / "captions.json", "--data", tiny_data,
                    "--split", "test", "--output", out2, "-q"])
    rescored = json.loads(out2.read_text())
    for key in ("bleu1", "bleu4", "cider", "rouge_l"):
        assert rescored[key] == pytest.approx(scores[key])


def test_caption_files_folders_globs_and_outputs(runner, tiny_run, tmp_path):
    img_dir = tmp_path / "imgs"
    (img_dir / "sub").mkdir(parents=True)
    for i, (spec, _) in enumerate(make_scenes(3, seed=5)):
        save_png(spec, (img_dir / "sub" if i == 2 else img_dir) / f"s{i}.png", 48)
    (img_dir / "broken.jpg").write_bytes(b"not a jpeg")
    out_csv = tmp_path / "caps.csv"
    result = invoke(runner, ["caption", tiny_run, img_dir, "--output", out_csv, "--device", "cpu",
                             "--attention-maps", tmp_path / "maps"])
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4  # three scenes (one in a subfolder) and the broken file
    broken = [r for r in rows if r["file"].endswith("broken.jpg")][0]
    assert broken["caption"] == "" and broken["error"]
    assert all(not r["error"] for r in rows if r is not broken)  # captions (maybe empty: 1 epoch)
    assert len(list((tmp_path / "maps").glob("*_attention.png"))) == 3
    out_json = tmp_path / "caps.json"
    invoke(runner, ["caption", tiny_run / "checkpoints" / "best.pt", str(img_dir / "s*.png"), "--beam", 1,
                    "--output", out_json, "-q", "--device", "cpu"])
    data = json.loads(out_json.read_text())
    assert [Path(r["file"]).name for r in data] == ["s0.png", "s1.png"]
    assert "s0.png" in result.output


def test_benchmark_encoders_cli(runner, tmp_path):
    out = tmp_path / "bench.json"
    invoke(runner, ["benchmark", "encoders", "--encoders", "convnext_atto", "--image-size", 32,
                    "--batch", 2, "--steps", 1, "--output", out, "--device", "cpu", "-q"])
    rows = json.loads(out.read_text())["rows"]
    assert {"encoder", "params_m", "gflops", "images_per_s", "train_samples_per_s", "peak_mem_mb"} <= set(rows[0])


@pytest.mark.parametrize("args, needle", [
    (["train", "tiny", "data.dir=/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "tiny", "train.lrr=1"], "Did you mean 'train.lr'"),
    (["train", "tiny", "model.encoder=convnext_atomic", "data.dir={data}"], "unknown encoder"),
    (["train", "/no/such/config.yaml"], "not found"),
    (["train", "--resume", "/no/run"], "cannot resume"),
    (["evaluate", "/no/ckpt.pt", "--data", "{data}"], "not found"),
    (["evaluate", "{run}", "--data", "/no/data"], "does not exist"),
    (["evaluate", "{run}", "--data", "{data}", "--split", "dev"], "no split 'dev'"),
    (["caption", "{run}", "/no/images/*.png"], "no image files"),
    (["caption", "/no/ckpt.pt", "{data}/../"], "not found"),
    (["caption", "{run}", "{data}", "--output", "x.txt"], ".jsonl, .json or .csv"),
    (["evaluate", "{data}/vocab.json", "--data", "{data}"], "not a readable capcli checkpoint"),
    (["benchmark", "encoders", "--encoders", "convnext_nope", "--image-size", "32", "--steps", "1"], "unknown encoder"),
])
def test_user_errors_are_one_line_exit_1(runner, tiny_data, tiny_run, args, needle):
    args = [a.format(data=tiny_data, run=tiny_run) for a in args]
    result = invoke(runner, [*args, "--device", "cpu"], code=1)
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output  # one message (rich may wrap it)


def test_quickstart_end_to_end(runner, tmp_path):
    out = tmp_path / "qs"
    invoke(runner, ["quickstart", "--out", out, "--images", 40, "--size", 32, "--epochs", 1, "--beam", 2,
                    "--device", "cpu", "-q", *[o for o in TINY_OVERRIDES if not o.startswith("train.epochs")]])
    scores = json.loads((out / "runs" / "tiny" / "eval-test" / "eval.json").read_text())
    assert EVAL_KEYS <= set(scores) and "shuffled_bleu4" in scores and scores["amp"] == "off"  # float32 on a CPU
    rows = json.loads((out / "captions.json").read_text())
    assert len(rows) >= 1 and all(r["caption"] is not None for r in rows)
    assert (out / "data" / "manifest.json").is_file()
    assert (out / "runs" / "tiny" / "checkpoints" / "best.pt").is_file()


def test_quickstart_checks_its_overrides_before_making_data(runner, tmp_path):
    result = invoke(runner, ["quickstart", "--out", tmp_path / "qs", "train.lrr=1", "--device", "cpu"], code=1)
    assert "unknown config key 'train.lrr'. Did you mean 'train.lr'?" in result.output
    assert not (tmp_path / "qs" / "data").exists()


def test_benchmark_study_runs_every_combination_and_resumes(runner, tiny_data, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "config": "tiny",
        "overrides": [f"data.dir={tiny_data}", f"run.dir={tmp_path / 'runs'}", *TINY_OVERRIDES,
                      "data.val_max_images=2"],
        "grid": {"train.lr": [1e-3], "train.teacher_forcing": [True, False]},
        "evaluate": {"split": "test", "beam": 2},
        "name": "s",
    }))
    out = tmp_path / "study.json"
    invoke(runner, ["benchmark", "study", grid, "--output", out, "--device", "cpu", "-q"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["train.teacher_forcing"], r["reused"]) for r in rows] == [("true", False), ("false", False)]
    for r in rows:
        assert 0 <= r["bleu4"] <= 1 and 0 <= r["top5"] <= 1
        assert (Path(r["run_dir"]) / "eval-test" / "captions.json").is_file()
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert str(cfg["train"]["teacher_forcing"]).lower() == r["train.teacher_forcing"]
    invoke(runner, ["benchmark", "study", grid, "--output", out, "--device", "cpu", "-q"])
    again = json.loads(out.read_text())["rows"]
    assert all(r["reused"] for r in again) and [r["bleu4"] for r in again] == [r["bleu4"] for r in rows]
    result = invoke(runner, ["benchmark", "study", grid, "--dry-run"])
    assert "lr0.001-tftrue" in result.output
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as im:  # the paper's figure, beside study.json
        assert im.format == "PNG" and im.size[0] >= 3 * 360


def test_benchmark_prepare_cli(runner, tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, (spec, _) in enumerate(make_scenes(12, seed=9)):
        save_png(spec, img_dir / f"s{i}.png", 64)
    out = tmp_path / "prep.json"
    invoke(runner, ["benchmark", "prepare", img_dir, "--size", 32, "--workers", 2, "--repeats", 1,
                    "--output", out, "-q"])
    result = json.loads(out.read_text())
    assert result["images"] == 12 and result["workers"] == 2 and result["skipped"] == 0
    assert result["bare_images_per_s"] > 0 and result["prepare_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["prepare_images_per_s"] / result["bare_images_per_s"], rel=1e-2)
    invoke(runner, ["benchmark", "prepare", img_dir, "--resize", "zoom"], code=1)


def test_checkpoint_that_does_not_fit_the_model_is_a_user_error(runner, tiny_run, tiny_data, tmp_path):
    ckpt = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("encoder.feature_norm")}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    result = invoke(runner, ["evaluate", old, "--data", tiny_data, "--device", "cpu"], code=1)
    assert "does not fit" in result.output and "Traceback" not in result.output


def test_evaluate_a_frozen_encoder_caches_the_test_features(runner, tiny_data, tmp_path):
    """A model trained on a frozen encoder is scored from the split's feature cache (made on the
    first evaluation, beside the training caches), with the same numbers as from the images."""
    from capcli.data.dataset import CaptionDataset
    from capcli.decode import DecodeOptions
    from capcli.evaluate import evaluate_model
    from capcli.api import load_model

    invoke(runner, ["train", "tiny", f"data.dir={tiny_data}", f"run.dir={tmp_path}", "run.name=fz",
                    "model.finetune=false", *TINY_OVERRIDES, "data.val_max_images=2", "--device", "cpu", "-q"])
    out = tmp_path / "ev" / "eval.json"
    invoke(runner, ["evaluate", tmp_path / "fz", "--data", tiny_data, "--split", "test", "--beam", 2,
                    "--output", out, "--device", "cpu", "-q", "--no-meteor"])
    assert len(list((tiny_data / "features").glob("convnext_atto-*/test.h5"))) == 1
    cached = json.loads(out.read_text())
    model, vocab, cfg, _ = load_model(tmp_path / "fz")
    direct = evaluate_model(model, CaptionDataset(tiny_data, "test"), torch.device("cpu"), DecodeOptions(beam_size=2),
                            alpha_c=cfg.train.alpha_c, meteor=False)
    assert cached["loss"] == pytest.approx(direct["loss"], rel=1e-2)  # float16 features on disk
    assert cached["images"] == direct["images"]
    # features made under bf16 autocast are a cache of their own: a float32 evaluation never reads them
    made = (tiny_data / "features").glob("convnext_atto-*/test.h5")
    before = {p: p.stat().st_mtime_ns for p in made}
    bf16 = tmp_path / "ev-bf16" / "eval.json"
    invoke(runner, ["evaluate", tmp_path / "fz", "--data", tiny_data, "--split", "test", "--beam", 2, "--amp", "bf16",
                    "--output", bf16, "--device", "cpu", "-q", "--no-meteor"])
    assert len(list((tiny_data / "features").glob("convnext_atto-*/test-bf16.h5"))) == 1
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads(bf16.read_text())["loss"] == pytest.approx(cached["loss"], rel=0.05)


def test_caption_sampling_and_ngram_blocking(runner, tiny_run, tmp_path):
    from tests.conftest import REPO

    images = REPO / "examples" / "images"

    def captions(*extra):
        out = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        invoke(runner, ["caption", tiny_run, images, "--device", "cpu", "-q", "--output", out, *extra])
        return [r["caption"] for r in json.loads(out.read_text())]

    a = captions("--sample", "--seed", 3, "--temperature", 1.5)
    assert a == captions("--sample", "--seed", 3, "--temperature", 1.5)  # seeded: the same draw
    assert any(x != y for x, y in zip(a, captions("--sample", "--seed", 4, "--temperature", 1.5)))
    for cap in captions("--beam", 2, "--block-ngrams", 2, "--max-length", 12):
        words = cap.split()
        assert len(set(zip(words, words[1:]))) == len(words) - 1  # no bigram twice
    result = invoke(runner, ["caption", tiny_run, images, "--temperature", 0.5, "--device", "cpu"], code=1)
    assert "--sample" in result.output


def test_decoding_defaults_and_word_constraints_on_the_command_line(runner, tiny_data, tiny_run, tmp_path):
    """caption and evaluate share the decode defaults (no <unk>, no dangling last word, the
    measured n-gram blocking), say them in --help, and take --allow-unk, --dangling and
    --block-ngrams; eval.json records what was used."""
    from capcli.cli.common import dangling_words
    from capcli.text import BLOCK_NGRAMS

    assert dangling_words(None) is None and dangling_words("none") == ()
    assert dangling_words(" A, the ,of") == ("a", "the", "of")
    for command in ("caption", "evaluate"):
        text = " ".join(invoke(runner, [command, "--help"]).output.replace("│", " ").split())  # unwrap rich's box
        assert "--allow-unk" in text and "--dangling" in text and f"default {BLOCK_NGRAMS}" in text
    out = tmp_path / "raw" / "eval.json"
    invoke(runner, ["evaluate", tiny_run, "--data", tiny_data, "--split", "test", "--beam", 2, "--allow-unk",
                    "--dangling", "none", "--block-ngrams", 2, "--output", out, "--device", "cpu", "-q"])
    scores = json.loads(out.read_text())
    assert (scores["allow_unk"], scores["dangling"], scores["block_ngrams"]) == (True, [], 2)
