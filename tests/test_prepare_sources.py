"""Source readers: COCO annotation files (pycocotools), Karpathy split files, folder + CSV/JSONL,
the default split rule, and the error messages for inputs a user can fix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from capcli.data.records import Record
from capcli.data.sources import (SPLIT_RULE, assign_default_splits, coco_records, folder_records, hash_split,
                                 karpathy_records)
from capcli.errors import UserError

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"
needs_coco_mini = pytest.mark.skipif(not (COCO_MINI / "annotations").is_dir(),
                                     reason="../shared/data/coco-mini is not here")


def _images(folder: Path, names: list[str], size=(24, 16)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * i % 255, 100, 200)).save(folder / name)


# ------------------------------------------------------------------------------------------ split rule

def test_hash_split_is_deterministic_roughly_90_5_5_and_stable_when_images_are_added():
    keys = [f"img_{i}.jpg" for i in range(4000)]
    splits = [hash_split(k) for k in keys]
    counts = Counter(splits)
    assert 0.87 < counts["train"] / 4000 < 0.93 and 0.03 < counts["val"] / 4000 < 0.07
    assert 0.03 < counts["test"] / 4000 < 0.07
    assert splits == [hash_split(k) for k in keys]
    # adding images: existing ones keep their split (the tiny-set fill never applies at this size)
    small = [Record("", i, k, ["c"]) for i, k in enumerate(keys[:500])]
    big = [Record("", i, k, ["c"]) for i, k in enumerate(keys)]
    assign_default_splits(small, {i: r.file_name for i, r in enumerate(small)})
    assign_default_splits(big, {i: r.file_name for i, r in enumerate(big)})
    assert [r.split for r in small] == [r.split for r in big[:500]]
    assert "stable" in SPLIT_RULE


def test_tiny_sets_still_get_val_and_test():
    recs = [Record("", i, f"a{i}.jpg", ["c"]) for i in range(5)]
    assign_default_splits(recs, {i: r.file_name for i, r in enumerate(recs)})
    assert {r.split for r in recs} == {"train", "val", "test"}


# ------------------------------------------------------------------------------------------------ COCO

@needs_coco_mini
def test_coco_records_from_official_annotations():
    info: dict = {}
    recs = coco_records(COCO_MINI, COCO_MINI / "annotations", info=info)
    assert len(recs) == 239
    assert len({r.image_id for r in recs}) == 239
    anns = json.loads((COCO_MINI / "annotations" / "captions_val2017.json").read_text())
    by_id: dict[int, list[str]] = {}
    for a in sorted(anns["annotations"], key=lambda a: a["id"]):
        by_id.setdefault(a["image_id"], []).append(a["caption"].strip())
    rec = next(r for r in recs if r.image_id in by_id)
    assert rec.captions == by_id[rec.image_id] and len(rec.captions) >= 5
    assert Path(rec.source).is_file() and Path(rec.source).parent.name in ("train2017", "val2017")
    assert {r.split for r in recs} == {"train", "val", "test"}
    assert all(r.split == hash_split(str(r.image_id)) for r in recs if r.split == "val")
    assert info["split_rule"] == SPLIT_RULE and len(info["annotations"]) == 2
    # deterministic
    assert [(r.image_id, r.split) for r in coco_records(COCO_MINI, COCO_MINI / "annotations")] == \
        [(r.image_id, r.split) for r in recs]


@needs_coco_mini
def test_coco_records_with_a_karpathy_split_file(tmp_path):
    anns = json.loads((COCO_MINI / "annotations" / "captions_train2017.json").read_text())
    ids = sorted(img["id"] for img in anns["images"])
    splits = ["train", "restval", "val", "test"]
    karpathy = {"dataset": "coco", "images": [
        {"cocoid": i, "filepath": "train2014", "filename": f"COCO_train2014_{i:012d}.jpg",
         "split": splits[n % 4], "sentences": [{"raw": "x"}]} for n, i in enumerate(ids[:40])]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    info: dict = {}
    recs = coco_records(COCO_MINI, COCO_MINI / "annotations" / "captions_train2017.json", path, info=info)
    assert len(recs) == 40 and info["left_out"]["not_in_split_file"] == 40
    want = {i: {"restval": "train"}.get(splits[n % 4], splits[n % 4]) for n, i in enumerate(ids[:40])}
    assert {r.image_id: r.split for r in recs} == want
    assert "karpathy" in info["split_rule"]


def test_coco_errors_name_the_input(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="annotations dir .* does not exist"):
        coco_records(tmp_path / "images", tmp_path / "nope")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "instances_val2017.json").write_text("{}")
    with pytest.raises(UserError, match="no COCO caption files.*instances_val2017.json"):
        coco_records(tmp_path / "images", tmp_path / "ann")
    (tmp_path / "ann" / "captions_val2017.json").write_text('{"images": [],\n "annotations": [\n}')
    with pytest.raises(UserError, match=r"captions_val2017.json, line 3: not valid JSON"):
        coco_records(tmp_path / "images", tmp_path / "ann")
    (tmp_path / "ann" / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}))
    with pytest.raises(UserError, match=r"none of the 1 images named in .*captions_val2017.json exist"):
        coco_records(tmp_path / "images", tmp_path / "ann")
    (tmp_path / "ann" / "captions_val2014.json").write_text("{}")
    with pytest.raises(UserError, match="both 2014 and 2017"):
        coco_records(tmp_path / "images", tmp_path / "ann")
    with pytest.raises(UserError, match="images root .* does not exist"):
        coco_records(tmp_path / "nope", tmp_path / "ann")


# -------------------------------------------------------------------------------------------- Karpathy

def test_karpathy_flickr_style_file(tmp_path):
    _images(tmp_path / "imgs", ["1000.jpg", "1001.jpg", "1002.jpg", "1003.jpg"])
    data = {"dataset": "flickr8k", "images": [
        {"imgid": n, "filename": f"{1000 + n}.jpg", "split": s,
         "sentences": [{"raw": f"A dog runs number {n}.", "tokens": ["a"]}, {"raw": "Two cats."}]}
        for n, s in enumerate(["train", "restval", "val", "test"])]}
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    info: dict = {}
    recs = karpathy_records(path, tmp_path / "imgs", info=info)
    assert [r.split for r in recs] == ["train", "train", "val", "test"]
    assert [r.image_id for r in recs] == [0, 1, 2, 3]
    assert recs[2].captions == ["A dog runs number 2.", "Two cats."]
    assert Path(recs[0].source) == tmp_path / "imgs" / "1000.jpg" and info["dataset"] == "flickr8k"


def test_karpathy_coco_style_paths_and_ids(tmp_path):
    _images(tmp_path / "coco", ["val2014/COCO_val2014_000000000042.jpg"])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [
        {"cocoid": 42, "imgid": 0, "filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg",
         "split": "test", "sentences": [{"raw": "a man"}]}]}))
    (rec,) = karpathy_records(path, tmp_path / "coco")
    assert rec.image_id == 42 and rec.file_name == "val2014/COCO_val2014_000000000042.jpg"
    assert Path(rec.source).is_file()


def test_karpathy_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    bad = tmp_path / "d.json"
    bad.write_text('{"images": [{"filename": "a.jpg", "split": "holdout", "sentences": [{"raw": "x"}]}]}')
    with pytest.raises(UserError, match=r"images\[0\]: unknown split 'holdout'"):
        karpathy_records(bad, tmp_path / "imgs")
    bad.write_text('{"dataset": "flickr8k"}')
    with pytest.raises(UserError, match="not a Karpathy split file"):
        karpathy_records(bad, tmp_path / "imgs")
    with pytest.raises(UserError, match="does not exist"):
        karpathy_records(tmp_path / "missing.json", tmp_path / "imgs")


# ---------------------------------------------------------------------------------------------- folder

def test_folder_csv_groups_rows_and_keeps_split_column(tmp_path):
    _images(tmp_path, ["a.jpg", "b.png", "sub/c.jpg"])
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text('image,caption,split\na.jpg,"A dog, running.",train\nb.png,A cat.,val\n'
                        'a.jpg,Another dog.,\nsub/c.jpg,A bird.,test\n\n')
    info: dict = {}
    recs = folder_records(tmp_path, csv_path, info=info)
    assert [(r.file_name, r.split, r.image_id) for r in recs] == [("a.jpg", "train", 0), ("b.png", "val", 1),
                                                                   ("sub/c.jpg", "test", 2)]
    assert recs[0].captions == ["A dog, running.", "Another dog."]
    assert info["split_rule"] == "split column"


def test_folder_jsonl_and_default_split(tmp_path):
    names = [f"p{i}.jpg" for i in range(40)]
    _images(tmp_path, names)
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps({"image": n, "caption": f"photo {i}"}) for i, n in enumerate(names)))
    recs = folder_records(tmp_path, path)
    assert len(recs) == 40 and {r.split for r in recs} == {"train", "val", "test"}
    by_hash = [r for r in recs if r.split == hash_split(r.file_name)]
    assert len(by_hash) >= 37  # all but the tiny-set fill


def test_folder_errors_name_file_and_line(tmp_path):
    _images(tmp_path, ["a.jpg"])
    p = tmp_path / "c.jsonl"
    p.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", caption: "y"}\n')
    with pytest.raises(UserError, match=r"c.jsonl, line 2: not valid JSON"):
        folder_records(tmp_path, p)
    p = tmp_path / "c.csv"
    p.write_text("file,text_x\na.jpg,x\n")
    with pytest.raises(UserError, match=r"c.csv: the header \(file, text_x\) needs an 'image' and a 'caption'"):
        folder_records(tmp_path, p)
    p.write_text("image,caption,split\na.jpg,x,train\na.jpg,y,test\n")
    with pytest.raises(UserError, match=r"c.csv, line 3: a.jpg is in split 'test' here but 'train' on line 2"):
        folder_records(tmp_path, p)
    p.write_text("image,caption,split\na.jpg,x,holdout\n")
    with pytest.raises(UserError, match=r"c.csv, line 2: unknown split 'holdout'"):
        folder_records(tmp_path, p)
    p.write_text("image,caption\nnothere.jpg,x\nalso_not.jpg,y\n")
    with pytest.raises(UserError, match=r"none of the 2 images named in .*c.csv exist"):
        folder_records(tmp_path, p)
    p.write_text("image,caption\n")
    with pytest.raises(UserError, match="no rows"):
        folder_records(tmp_path, p)
    with pytest.raises(UserError, match="use .csv"):
        folder_records(tmp_path, tmp_path / "a.jpg")
    with pytest.raises(UserError, match="captions file .* does not exist"):
        folder_records(tmp_path, tmp_path / "none.csv")
