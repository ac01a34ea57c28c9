"""`capcli prepare coco | karpathy | folder` on the real coco-mini photos: the dataset dir, the
summary table, tokenisation that agrees with evaluation, DataLoader workers, train and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from capcli.data.vocab import Vocab
from capcli.text import tokenize
from tests.conftest import TINY_OVERRIDES, invoke

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"
pytestmark = pytest.mark.skipif(not (COCO_MINI / "annotations").is_dir(),
                                reason="../shared/data/coco-mini is not here")
COMMON = ["--size", 32, "--workers", 2, "--min-word-freq", 2, "-q"]


def _annotations(name: str) -> dict:
    return json.loads((COCO_MINI / "annotations" / f"captions_{name}.json").read_text())


def _refs_by_id() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in ("train2017", "val2017"):
        for a in sorted(_annotations(name)["annotations"], key=lambda a: a["id"]):
            out.setdefault(a["image_id"], []).append(a["caption"].strip())
    return out


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory, runner) -> Path:
    out = tmp_path_factory.mktemp("coco") / "coco-mini"
    result = invoke(runner, ["prepare", "coco", "--images", COCO_MINI, "--annotations", COCO_MINI / "annotations",
                             "--out", out, *COMMON[:-1]])
    text = " ".join(result.output.split())
    for piece in ("train", "val", "test", "images/s", "skipped 0", "vocabulary", "<unk>", "p50/p90/p99"):
        assert piece in text, piece
    return out


def test_prepare_coco_dataset_dir(coco_dir):
    manifest = json.loads((coco_dir / "manifest.json").read_text())
    assert manifest["source"] == "coco" and manifest["image_size"] == 32 and manifest["resize"] == "squash"
    assert sum(s["images"] for s in manifest["splits"].values()) == 239 and manifest["skipped"] == 0
    assert "sha1" in manifest["split_rule"] and manifest["tokenizer"]["lowercase"] is True
    assert manifest["vocab"]["min_word_freq"] == 2 and manifest["prepare"]["fingerprint"]
    refs = _refs_by_id()
    with h5py.File(coco_dir / "train.h5") as f:
        n = f["images"].shape[0]
        assert f["images"].shape == (n, 3, 32, 32) and f["images"].chunks == (1, 3, 32, 32)
        assert f["captions"].shape == (n * 5, 52) and f.attrs["captions_per_image"] == 5
        ids = [int(x) for x in f["image_ids"][:]]
        offsets = f["reference_offsets"][:]
        stored = f["references"].asstr()[:]
        for i in (0, n // 2, n - 1):  # every raw reference kept, in annotation order
            assert list(stored[offsets[i]:offsets[i + 1]]) == refs[ids[i]]
        assert len(set(ids)) == n and (f["caption_image"][:] == [i // 5 for i in range(n * 5)]).all()
        assert f["images"][0].std() > 5  # real pixels


def test_vocabulary_tokens_agree_with_evaluation_tokenizer(coco_dir):
    vocab = Vocab.load(coco_dir / "vocab.json")
    from collections import Counter

    counts: Counter = Counter()
    with h5py.File(coco_dir / "train.h5") as f:
        refs = f["references"].asstr()[:]
        offsets = f["reference_offsets"][:]
        for r in refs:
            counts.update(tokenize(r))
        want = {w for w, c in counts.items() if c >= 2}
        assert set(vocab.itos[4:]) == want
        assert all(t == t.lower() and t not in {".", ",", "!", "?", "'", '"'} for t in vocab.itos[4:])
        k = int(f.attrs["captions_per_image"])
        for i in (0, 7, 50):
            images_refs = [" ".join(tok if tok in vocab.stoi else "<unk>" for tok in tokenize(r))
                           for r in refs[offsets[i]:offsets[i + 1]]]
            for row in f["captions"][i * k:(i + 1) * k]:
                assert vocab.decode(row) in images_refs


def test_dataloader_with_two_workers_reads_whole_images(coco_dir):
    import torch
    from torch.utils.data import DataLoader

    from capcli.data.dataset import CaptionDataset, collate

    ds = CaptionDataset(coco_dir, "train")
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate)
    seen = 0
    for batch in loader:
        b = batch["images"].shape[0]
        assert batch["images"].shape == (b, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["captions"].shape == (b, 5, 52) and batch["lengths"].shape == (b, 5)
        seen += b
    assert seen == len(ds)


def test_evaluate_accepts_the_dataset(coco_dir, runner, tmp_path):
    from capcli.data.dataset import CaptionDataset

    ds = CaptionDataset(coco_dir, "test")
    results = [{"image_id": i, "caption": refs[0]} for i, refs in zip(ds.image_ids(), ds.references())]
    (tmp_path / "captions.json").write_text(json.dumps(results))
    invoke(runner, ["evaluate", "--results", tmp_path / "captions.json", "--data", coco_dir, "--split", "test",
                    "--no-meteor", "-q"])
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["images"] == len(ds) and scores["bleu1"] > 0.5


@pytest.mark.slow
def test_train_accepts_the_dataset(coco_dir, runner, tmp_path):
    invoke(runner, ["train", "tiny", f"data.dir={coco_dir}", f"run.dir={tmp_path}", "run.name=c", *TINY_OVERRIDES,
                    "data.val_max_images=4", "--device", "cpu", "-q"])
    assert (tmp_path / "c" / "checkpoints" / "last.pt").is_file()


def test_prepare_folder_from_coco_mini_csv(runner, tmp_path):
    rows = ["image,caption"]
    val = _annotations("val2017")
    names = {img["id"]: img["file_name"] for img in val["images"]}
    for a in val["annotations"]:
        rows.append(f'val2017/{names[a["image_id"]]},"{a["caption"].strip().replace(chr(34), chr(39))}"')
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "folder"
    invoke(runner, ["prepare", "folder", "--images", COCO_MINI, "--captions", tmp_path / "captions.csv",
                    "--out", out, "--resize", "crop", *COMMON])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "folder" and manifest["resize"] == "crop"
    assert sum(s["images"] for s in manifest["splits"].values()) == len(val["images"])
    assert set(manifest["splits"]) == {"train", "val", "test"}
    with h5py.File(out / "val.h5") as f:
        assert all(n.startswith("val2017/") for n in f["file_names"].asstr()[:])


def test_prepare_karpathy_pointing_at_coco_mini(runner, tmp_path):
    val = _annotations("val2017")
    caps: dict[int, list[str]] = {}
    for a in val["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    images = [{"cocoid": img["id"], "filepath": "val2017", "filename": img["file_name"],
               "split": ("train", "restval", "val", "test")[n % 4],
               "sentences": [{"raw": c} for c in caps[img["id"]]]} for n, img in enumerate(val["images"][:60])]
    images.append({"cocoid": 1, "filepath": "val2017", "filename": "missing.jpg", "split": "train",
                   "sentences": [{"raw": "gone"}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    out = tmp_path / "k"
    result = invoke(runner, ["prepare", "karpathy", "--json", tmp_path / "dataset_coco.json", "--images", COCO_MINI,
                             "--out", out, *COMMON])
    assert "1 image(s) skipped" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "karpathy-coco"
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 30, "val": 15, "test": 15}
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == [{"split": "train", "image_id": 1, "file": "val2017/missing.jpg", "reason": "missing",
                        "error": skipped[0]["error"]}]


def test_cli_errors_are_one_line(runner, tmp_path):
    result = invoke(runner, ["prepare", "coco", "--images", COCO_MINI, "--annotations", tmp_path / "nope",
                             "--out", tmp_path / "o"], code=1)
    assert "Error:" in result.output and "annotations dir" in result.output and "Traceback" not in result.output
    (tmp_path / "bad.csv").write_text('image,caption\n"a.jpg,unterminated\n')
    result = invoke(runner, ["prepare", "folder", "--images", COCO_MINI, "--captions", tmp_path / "bad.csv",
                             "--out", tmp_path / "o"], code=1)
    assert "Error:" in result.output and "Traceback" not in result.output


def test_help_has_examples_and_the_split_rule(runner):
    for cmd in ("coco", "karpathy", "folder", "synthetic"):
        text = " ".join(invoke(runner, ["prepare", cmd, "--help"]).output.split())
        assert "Examples:" in text, cmd
        if cmd in ("coco", "folder"):
            assert "90-94 val" in text, cmd
