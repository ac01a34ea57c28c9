"""After training, different images get different captions, and the captions fit their own image
better than other images (the failure users of older repositories met: one caption for every
image, from a preprocessing mismatch or a decoder that ignores the image)."""

from __future__ import annotations

import random

import pytest
import torch

from capcli.caption import caption_files
from capcli.config import load_config
from capcli.data.dataset import CaptionDataset
from capcli.data.prepare import write_dataset
from capcli.data.synthetic import records, render, save_png
from capcli.decode import DecodeOptions
from capcli.evaluate import evaluate_model
from capcli.metrics import caption_scores
from capcli.api import Captioner, load_model
from capcli.training.trainer import train

CPU = torch.device("cpu")


@pytest.mark.slow
def test_trained_model_captions_depend_on_the_image(tmp_path):
    recs = records(800, seed=1)
    data = tmp_path / "data"
    write_dataset(recs, data, source="synthetic", image_size=96, loader=render, min_word_freq=1,
                  max_length=20, workers=0)
    # a frozen random encoder with cached features: the decoder alone learns in seconds an epoch
    cfg = load_config("tiny", [f"data.dir={data}", f"run.dir={tmp_path}", "run.name=q", "train.epochs=10",
                               "model.finetune=false", "train.lr=2e-3"])
    train(cfg, CPU)
    model, vocab, _, _ = load_model(tmp_path / "q" / "checkpoints" / "best.pt")
    test = CaptionDataset(data, "test")
    scores = evaluate_model(model, test, CPU, DecodeOptions(beam_size=3), vocab=vocab, meteor=False)
    hyps = [c["caption"] for c in scores["captions"]]
    refs = test.references()
    shuffled = hyps[:]
    random.Random(0).shuffle(shuffled)
    base = caption_scores({str(i): refs[i] for i in range(len(hyps))},
                          {str(i): h for i, h in enumerate(shuffled)}, meteor=False)
    assert len(set(hyps)) >= len(hyps) // 4, hyps  # not one caption for every image
    assert scores["bleu4"] > base["bleu4"] + 0.05, (scores["bleu4"], base["bleu4"])
    # the caption path (PNG files on disk -> the same preprocessing) agrees with the dataset path
    files = []
    for r in [r for r in recs if r.split == "test"][:8]:
        save_png(r.source, tmp_path / r.file_name, 96)
        files.append(tmp_path / r.file_name)
    rows = caption_files(cap := Captioner.load(tmp_path / "q" / "checkpoints" / "best.pt", CPU), files,
                         cap.decode_options(beam=3))
    assert [r["caption"] for r in rows] == hyps[:8]
