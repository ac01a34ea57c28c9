"""Bad input, all in one table: every row builds one broken input in tmp_path, runs one command
through the CLI and expects either a one-line error naming the input and the fix (exit 1; exit 2
for Typer's own option ranges), or success with the bad item skipped and counted with its reason
(or converted, where a user would expect the image to simply work). Never a traceback, never an
"internal error".

Groups: images, caption sources, configs, checkpoints (and model folders), datasets, outputs.
Security rows: a crafted pickle (in a checkpoint, a run's last.pt, a model folder's
model.safetensors) is refused without running its code; caption files cannot name images outside
the image root (``../``, absolute paths), in any of the three source formats.

Symlinks: an image path is checked as written (``..`` resolved, not symlinks), so a symlink the user
put inside the image root may point anywhere (datasets are often linked in); a path that names a
place outside the root is skipped without being opened.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from capcli.cli.main import app
from tests.conftest import TINY_OVERRIDES, invoke

CPU = ["--device", "cpu"]


# ------------------------------------------------------------------------------------ expectations

@dataclass
class Fails:
    """Exit ``code`` (1: a user error, one line starting with "Error:"; 2: Typer's usage error)
    with every needle in the output."""

    needles: tuple[str, ...]
    code: int = 1
    check: Callable | None = None

    def __init__(self, *needles: str, code: int = 1, check: Callable | None = None):
        self.needles, self.code, self.check = needles, code, check


@dataclass
class Skips:
    """Exit 0; ``count`` images in OUT/skipped.json with ``reason``, counted in the manifest."""

    reason: str
    count: int = 1
    out: str = "out"
    check: Callable | None = None


@dataclass
class Works:
    """Exit 0; ``check(ctx, result)`` looks at what was made."""

    check: Callable | None = None


@dataclass
class Ctx:
    tmp: Path
    data: Path  # the session's tiny synthetic dataset (read only)
    run: Path  # the session's tiny run (read only)
    other: Path  # a dataset with another vocabulary, 32 px like `data`
    photos: Path  # a few small images (read only)
    extra: dict = field(default_factory=dict)


CASES: list = []


def case(expect, xfail: str | None = None):
    """Add the decorated setup (ctx -> command args) to the table as a row named after it."""

    def add(setup):
        marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
        CASES.append(pytest.param(setup, expect, id=setup.__name__.replace("_", "-"), marks=marks))
        return setup

    return add


# ------------------------------------------------------------------------------------------ helpers

def noise(path: Path, size=(24, 16), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def folder_source(ctx: Ctx, bad: dict[str, Callable[[Path], None]], *, csv_names: list[str] | None = None,
                  extra_args: tuple = ()) -> list:
    """An image folder with 8 good images (6 train, 1 val, 1 test) and the ``bad`` ones (name ->
    writer) in train; ``prepare folder`` args writing to ctx.tmp/out."""
    img = ctx.tmp / "img"
    img.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        shutil.copy(ctx.photos / f"g{i}.png", img / f"g{i}.png")
    for name, write in bad.items():
        write(img / name)
    rows = ["image,caption,split"] + [f"g{i}.png,a photo of noise,train" for i in range(6)]
    rows += ["g6.png,a photo of noise,val", "g7.png,a photo of noise,test"]
    rows += [f"{n},a strange photo,train" for n in (csv_names if csv_names is not None else bad)]
    (ctx.tmp / "c.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ["prepare", "folder", "--images", img, "--captions", ctx.tmp / "c.csv", "--out", ctx.tmp / "out",
            "--size", 16, "--min-word-freq", 1, "--workers", 0, "-q", *extra_args]


def stored_pixels(ctx: Ctx, name: str) -> np.ndarray:
    """The (3, S, S) uint8 pixels prepare stored for ``name``."""
    with h5py.File(ctx.tmp / "out" / "train.h5") as f:
        names = list(f["file_names"].asstr()[:])
        assert name in names, names
        return f["images"][names.index(name)]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def copy_data(ctx: Ctx) -> Path:
    d = ctx.tmp / "d"
    shutil.copytree(ctx.data, d, ignore=shutil.ignore_patterns("features"))
    return d


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height (RGB, 8 bit) and holds no pixel data: a few bytes
    that a naive reader would try to turn into width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


class RunsCode:
    """Unpickling this makes a folder: a stand-in for any code a crafted pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def crafted_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file that runs code when unpickled without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "vocab": ["<pad>", "<start>", "<end>", "<unk>"], "config": {},
                "payload": RunsCode(marker)}, path)
    # the file has teeth: a plain unpickling runs the payload
    with open(path, "rb") as f:  # a file object: torch reads a *.safetensors path as safetensors
        torch.load(f, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    return path


def no_marker(ctx: Ctx, result) -> None:
    assert not (ctx.tmp / "pwned").exists(), "the crafted pickle ran its code"


def karpathy(ctx: Ctx, images: list[dict], *, good: int = 8) -> list:
    """A Karpathy split file with ``good`` valid images first (6 train, 1 val, 1 test), then ``images``."""
    root = ctx.tmp / "img"
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(good):
        shutil.copy(ctx.photos / f"g{i}.png", root / f"g{i}.png")
        entries.append({"filename": f"g{i}.png", "imgid": i, "split": "train" if i < 6 else ("val", "test")[i - 6],
                        "sentences": [{"raw": "a photo of noise"}]})
    for n, img in enumerate(images):
        entries.append({"imgid": 100 + n, "split": "train", **img})
    (ctx.tmp / "k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}), encoding="utf-8")
    return ["prepare", "karpathy", "--json", ctx.tmp / "k.json", "--images", root, "--out", ctx.tmp / "out",
            "--size", 16, "--min-word-freq", 1, "--workers", 0, "-q"]


def coco(ctx: Ctx, images: list[dict] = (), annotations: list[dict] = (), *, raw: dict | None = None) -> list:
    """COCO caption annotations: 8 valid images (ids 1-8) plus ``images``/``annotations``."""
    root = ctx.tmp / "coco"
    root.mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i in range(8):
        shutil.copy(ctx.photos / f"g{i}.png", root / f"g{i}.png")
        imgs.append({"id": i + 1, "file_name": f"g{i}.png", "width": 24, "height": 16})
        anns.append({"id": 1000 + i, "image_id": i + 1, "caption": "a photo of noise"})
    data = raw if raw is not None else {"images": imgs + list(images), "annotations": anns + list(annotations)}
    (ctx.tmp / "captions_x.json").write_text(json.dumps(data), encoding="utf-8")
    return ["prepare", "coco", "--images", root, "--annotations", ctx.tmp / "captions_x.json",
            "--out", ctx.tmp / "out", "--size", 16, "--min-word-freq", 1, "--workers", 0, "-q"]


def train_args(ctx: Ctx, *overrides, data: Path | None = None) -> list:
    return ["train", "tiny", f"data.dir={data or ctx.other}", f"run.dir={ctx.tmp / 'runs'}", "run.name=t",
            *TINY_OVERRIDES, "data.val_max_images=2", *overrides, *CPU, "-q"]


def eval_args(ctx: Ctx, data: Path, *more) -> list:
    return ["evaluate", ctx.run, "--data", data, "--split", "test", "--max-images", 2, "--beam", 1,
            "--no-meteor", "--output", ctx.tmp / "e" / "eval.json", *more, *CPU, "-q"]


# =========================================================================================== images

@case(Skips("truncated"))
def image_truncated(ctx):
    def write(p):
        data = noise(ctx.tmp / "full.png", (64, 64)).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return folder_source(ctx, {"cut.png": write})


@case(Skips("not an image"))
def image_zero_bytes(ctx):
    return folder_source(ctx, {"empty.jpg": lambda p: p.write_bytes(b"")})


@case(Skips("not an image"))
def image_text_file_with_image_suffix(ctx):
    return folder_source(ctx, {"notes.png": lambda p: p.write_text("these are my notes, not a picture\n")})


@case(Skips("too large", check=lambda ctx, r: "too large" in manifest(ctx.tmp / "out")["skipped_reasons"]))
def image_decompression_bomb(ctx):
    # 40000 x 40000 claimed in a 57-byte file: Pillow refuses it before decoding anything
    return folder_source(ctx, {"bomb.png": lambda p: png_header_only(p, 40000, 40000)},
                         extra_args=("--workers", 2))


@case(Skips("unreadable"))
def image_symlink_loop(ctx):
    return folder_source(ctx, {"loop.png": lambda p: os.symlink(p.name, p)})


def _cmyk_red(p):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p.with_suffix(".jpg"), quality=95)


def _check_red(ctx, result):
    px = stored_pixels(ctx, "cmyk.jpg").astype(int)
    assert px[0].mean() > 245 and px[1].mean() < 10 and px[2].mean() < 10


@case(Works(_check_red))
def image_cmyk_is_converted(ctx):
    return folder_source(ctx, {"cmyk.jpg": _cmyk_red})


def _gray16(p):
    Image.fromarray(np.full((12, 20), 200 * 257, dtype=np.uint16)).save(p)


@case(Works(lambda ctx, r: np.testing.assert_array_equal(stored_pixels(ctx, "deep.png"), 200)))
def image_16_bit_is_scaled_not_clipped(ctx):
    return folder_source(ctx, {"deep.png": _gray16})


def _palette_alpha(p):
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 255, 0, 30, 60, 90] + [0] * 762)
    for x in range(8):
        for y in range(16):
            im.putpixel((x, y), 0)  # left half: palette entry 0, fully transparent
    im.save(p, transparency=0)


def _check_palette(ctx, result):
    px = stored_pixels(ctx, "pal.png")
    assert tuple(px[:, 8, 1]) == (255, 255, 255)  # transparent -> white, not the hidden green
    assert tuple(px[:, 8, 14]) == (30, 60, 90)


@case(Works(_check_palette))
def image_palette_with_alpha_is_composited(ctx):
    return folder_source(ctx, {"pal.png": _palette_alpha})


@case(Works(lambda ctx, r: np.testing.assert_array_equal(stored_pixels(ctx, "dot.png")[:, 3, 5], [250, 10, 20])))
def image_1x1_is_resized(ctx):
    return folder_source(ctx, {"dot.png": lambda p: Image.new("RGB", (1, 1), (250, 10, 20)).save(p)})


UNICODE_NAMES = ["café 東京.png", "my photo (1).png", "sub dir/ünï còdé.png"]


def _check_names(ctx, result):
    with h5py.File(ctx.tmp / "out" / "train.h5") as f:
        names = set(f["file_names"].asstr()[:])
    assert set(UNICODE_NAMES) <= names
    assert manifest(ctx.tmp / "out")["skipped"] == 0


@case(Works(_check_names))
def image_unicode_and_spaced_names(ctx):
    return folder_source(ctx, {n: (lambda p, i=i: noise(p, seed=40 + i)) for i, n in enumerate(UNICODE_NAMES)})


def _check_caption_rows(ctx, result):
    rows = json.loads((ctx.tmp / "caps.json").read_text())
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"café 東京.png", "my photo (1).png", "self.png"}, by_name
    assert by_name["café 東京.png"]["caption"] is not None and by_name["my photo (1).png"]["caption"] is not None
    assert by_name["self.png"]["caption"] is None and "symbolic links" in by_name["self.png"]["error"]
    assert "2 image(s) captioned, 1 unreadable" in result.output


@case(Works(_check_caption_rows))
def caption_folder_with_unicode_names_and_symlink_loops(ctx):
    folder = ctx.tmp / "pics"
    noise(folder / "café 東京.png", (32, 32), seed=1)
    noise(folder / "my photo (1).png", (32, 32), seed=2)
    os.symlink(".", folder / "again")  # a folder loop: must not be walked forever
    os.symlink("self.png", folder / "self.png")  # a file loop: a row with its error
    return ["caption", ctx.run, folder, "--beam", 1, "--workers", 0, "--output", ctx.tmp / "caps.json", *CPU]


# ================================================================================== caption sources

def _outside_image(ctx) -> Path:
    return noise(ctx.tmp / "outside" / "secret.png", seed=77)


def _escape_check(ctx, result):
    skipped = json.loads((ctx.tmp / "out" / "skipped.json").read_text())
    assert all("outside" in e["error"] for e in skipped)
    with h5py.File(ctx.tmp / "out" / "train.h5") as f:
        assert not any("secret" in n or "passwd" in n for n in f["file_names"].asstr()[:])


@case(Skips("outside the image root", count=3, check=_escape_check))
def folder_csv_paths_escaping_the_root(ctx):
    _outside_image(ctx)
    return folder_source(ctx, {}, csv_names=["../outside/secret.png", "../../../../../../etc/passwd",
                                             str(ctx.tmp / "outside" / "secret.png")])


@case(Skips("outside the image root", count=2, check=_escape_check))
def karpathy_paths_escaping_the_root(ctx):
    _outside_image(ctx)
    return karpathy(ctx, [{"filename": "../outside/secret.png", "sentences": [{"raw": "a secret"}]},
                          {"filepath": "../outside", "filename": "secret.png", "sentences": [{"raw": "a secret"}]}])


@case(Skips("outside the image root", check=_escape_check))
def coco_file_name_escaping_the_root(ctx):
    _outside_image(ctx)
    return coco(ctx, [{"id": 50, "file_name": "../outside/secret.png"}],
                [{"id": 5000, "image_id": 50, "caption": "a secret photo"}])


def _link_followed(ctx, result):
    from capcli.data.images import load_image

    assert manifest(ctx.tmp / "out")["skipped"] == 0
    np.testing.assert_array_equal(stored_pixels(ctx, "linked.png"), load_image(ctx.tmp / "outside" / "secret.png", 16))


@case(Works(_link_followed))
def symlink_inside_the_root_pointing_outside_is_followed(ctx):
    # the user linked it in: their choice (datasets are often symlinked into place)
    target = _outside_image(ctx)
    return folder_source(ctx, {"linked.png": lambda p: os.symlink(target, p)})


@case(Fails("k.json, images[8]", "no 'filename'"))
def karpathy_missing_filename(ctx):
    return karpathy(ctx, [{"sentences": [{"raw": "a photo"}]}])


@case(Fails("k.json, images[8]", "sentences"))
def karpathy_sentences_of_the_wrong_type(ctx):
    return karpathy(ctx, [{"filename": "g0.png", "sentences": "a photo of noise"}])


@case(Fails("k.json, images[8]", "image id 3 appears twice"))
def karpathy_duplicate_ids(ctx):
    return karpathy(ctx, [{"filename": "g1.png", "imgid": 3, "sentences": [{"raw": "again"}]}])


def _one_left_out(ctx, result):
    m = manifest(ctx.tmp / "out")
    assert m["left_out"]["without_captions"] == 2
    assert sum(s["images"] for s in m["splits"].values()) == 8


@case(Works(_one_left_out))
def karpathy_captions_empty_or_only_punctuation(ctx):
    return karpathy(ctx, [{"filename": "g0.png", "sentences": [{"raw": " "}, {"raw": ""}]},
                          {"filename": "g1.png", "sentences": [{"raw": "..."}, {"raw": "?! -- ;"}]}])


@case(Fails("k.json", "no image with a caption"))
def karpathy_every_caption_only_punctuation(ctx):
    return karpathy(ctx, [{"filename": "g0.png", "sentences": [{"raw": "!!!"}]}], good=0)


@case(Fails("captions_x.json, annotations[8]", "image_id"))
def coco_annotation_missing_image_id(ctx):
    return coco(ctx, annotations=[{"id": 77, "caption": "a photo"}])


@case(Fails("captions_x.json, annotations[8]", "caption", "string"))
def coco_caption_of_the_wrong_type(ctx):
    return coco(ctx, annotations=[{"id": 77, "image_id": 1, "caption": ["a", "photo"]}])


@case(Fails("captions_x.json", "'images'", "list"))
def coco_images_not_a_list(ctx):
    return coco(ctx, raw={"images": {"id": 1}, "annotations": []})


@case(Fails("captions_x.json, images[8]", "id 3 appears twice"))
def coco_duplicate_image_ids(ctx):
    return coco(ctx, [{"id": 3, "file_name": "g0.png"}])


@case(Fails("c.csv", "'image' and a 'caption' column"))
def csv_with_the_wrong_header(ctx):
    args = folder_source(ctx, {})
    (ctx.tmp / "c.csv").write_text("picture,words\ng0.png,a photo\n")
    return args


@case(Fails("c.csv", "not UTF-8", "save it as UTF-8"))
def csv_in_latin_1(ctx):
    args = folder_source(ctx, {})
    (ctx.tmp / "c.csv").write_bytes("image,caption\ng0.png,un caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    return args


def _blank_counted(ctx, result):
    m = manifest(ctx.tmp / "out")
    assert m["left_out"]["blank_captions"] == 3 and m["left_out"]["images_without_captions"] == 1


@case(Works(_blank_counted))
def csv_captions_empty_or_only_punctuation(ctx):
    args = folder_source(ctx, {})
    with open(ctx.tmp / "c.csv", "a", encoding="utf-8") as f:
        f.write('g0.png,"",train\ng0.png,"...!",train\n')  # g0 keeps its real caption
        f.write("g5.png,a photo of noise,train\n")
    with open(ctx.tmp / "c.csv", encoding="utf-8") as f:
        lines = f.read().splitlines()
    # g3 with nothing but punctuation: it has no caption left, so it is left out
    lines = [line if not line.startswith("g3.png") else "g3.png,- - -,train" for line in lines]
    (ctx.tmp / "c.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return args


# ========================================================================================== configs

# one `key=value` override each: (row name, override, expected failure)
for _name, _override, _expect in (
    ("config_unknown_key", "train.lrr=1e-3", Fails("unknown config key 'train.lrr'", "Did you mean 'train.lr'")),
    ("config_wrong_type", "train.epochs=many", Fails("train.epochs", "expected int", "'many'")),
    ("config_negative_learning_rate", "train.lr=-1e-3", Fails("train.lr must be positive", "-0.001")),
    ("config_beam_of_zero", "train.val_beam=0", Fails("train.val_beam must be at least 1")),
    ("config_ratio_out_of_range", "train.teacher_forcing=1.5", Fails("train.teacher_forcing", "[0, 1]", "1.5")),
    ("config_unknown_encoder", "model.encoder=convnext_attto",
     Fails("unknown encoder 'convnext_attto'", "Did you mean", "convnext_atto")),
):
    def _setup(ctx, _override=_override):
        return train_args(ctx, _override)

    _setup.__name__ = _name
    case(_expect)(_setup)


@case(Fails("bad.yaml", "mapping"))
def config_file_not_a_mapping(ctx):
    (ctx.tmp / "bad.yaml").write_text("- train\n- model\n")
    return ["train", ctx.tmp / "bad.yaml", *CPU, "-q"]


@case(Fails("model.grid=9", "1x1", code=1))
def config_grid_larger_than_the_feature_map(ctx):
    return train_args(ctx, "model.grid=9")


@case(Fails("--beam", code=2))
def caption_beam_of_zero_is_a_usage_error(ctx):
    return ["caption", ctx.run, ctx.photos / "g0.png", "--beam", 0, *CPU]


# ====================================================================================== checkpoints

@case(Fails("last.pt", "not a readable capcli checkpoint", "truncated"))
def checkpoint_truncated(ctx):
    src = (ctx.run / "checkpoints" / "last.pt").read_bytes()
    (ctx.tmp / "last.pt").write_bytes(src[: len(src) // 2])
    return ["caption", ctx.tmp / "last.pt", ctx.photos / "g0.png", *CPU]


@case(Fails("evil.pt", "refused", "would run code", check=no_marker))
def checkpoint_crafted_pickle(ctx):
    crafted_pickle(ctx.tmp / "evil.pt", ctx.tmp / "pwned")
    return ["caption", ctx.tmp / "evil.pt", ctx.photos / "g0.png", *CPU]


@case(Fails("evil.pt", "refused", check=no_marker))
def checkpoint_crafted_pickle_as_init_from(ctx):
    crafted_pickle(ctx.tmp / "evil.pt", ctx.tmp / "pwned")
    return train_args(ctx, f"train.init_from={ctx.tmp / 'evil.pt'}")


@case(Fails("last.pt", "refused", check=no_marker))
def checkpoint_crafted_pickle_in_a_resumed_run(ctx):
    run = ctx.tmp / "runs" / "r"
    crafted_pickle(run / "checkpoints" / "last.pt", ctx.tmp / "pwned")
    shutil.copy(ctx.run / "config.yaml", run / "config.yaml")
    return ["train", "--resume", run, *CPU, "-q"]


def _model_folder(ctx: Ctx, version: int = 1) -> Path:
    folder = ctx.tmp / "model"
    folder.mkdir()
    cfg = yaml.safe_load((ctx.run / "config.yaml").read_text())
    (folder / "config.json").write_text(json.dumps({"format": "capcli-model", "format_version": version,
                                                    "capcli_version": "0.1.0", "config": cfg}))
    (folder / "vocab.json").write_text(json.dumps(json.loads((ctx.data / "vocab.json").read_text())))
    return folder


@case(Fails("model.safetensors", "not a safetensors file", check=no_marker))
def model_folder_whose_safetensors_is_a_pickle(ctx):
    folder = _model_folder(ctx)
    crafted_pickle(folder / "model.safetensors", ctx.tmp / "pwned")
    return ["caption", folder, ctx.photos / "g0.png", *CPU]


@case(Fails("format_version 7", "upgrade capcli"))
def model_folder_from_a_newer_capcli(ctx):
    folder = _model_folder(ctx, version=7)
    (folder / "model.safetensors").write_bytes(b"")
    return ["caption", folder, ctx.photos / "g0.png", *CPU]


def _older_checkpoint(ctx: Ctx, **changes) -> Path:
    ck = torch.load(ctx.run / "checkpoints" / "last.pt", weights_only=True)
    ck.update(changes)
    path = ctx.tmp / "old.pt"
    torch.save(ck, path)
    return path


@case(Fails("old.pt", "capcli 0.0.9", "retrain"))
def checkpoint_from_an_older_capcli_layout(ctx):
    ck = torch.load(ctx.run / "checkpoints" / "last.pt", weights_only=True)
    model = {k.replace("decoder.", "dec.", 1): v for k, v in ck["model"].items()}  # an older naming
    return ["caption", _older_checkpoint(ctx, model=model, capcli_version="0.0.9"), ctx.photos / "g0.png", *CPU]


@case(Fails("old.pt", "capcli 9.0.0", "model.attention_heads"))
def checkpoint_from_a_newer_capcli_config(ctx):
    ck = torch.load(ctx.run / "checkpoints" / "last.pt", weights_only=True)
    cfg = {**ck["config"], "model": {**ck["config"]["model"], "attention_heads": 4}}
    return ["caption", _older_checkpoint(ctx, config=cfg, capcli_version="9.0.0"), ctx.photos / "g0.png", *CPU]


def _no_teacher_forced_scores(ctx, result):
    scores = json.loads((ctx.tmp / "e" / "eval.json").read_text())
    assert scores["loss"] is None and scores["top5"] is None  # the vocabularies differ
    assert 0 <= scores["bleu4"] <= 1 and scores["images"] == 1


@case(Works(_no_teacher_forced_scores))
def evaluate_on_a_dataset_with_another_vocabulary(ctx):
    return eval_args(ctx, ctx.other)


@case(Fails("train.init_from", "vocabulary", "start from a run trained on this dataset"))
def init_from_a_run_with_another_vocabulary(ctx):
    return train_args(ctx, f"train.init_from={ctx.run}")


# ========================================================================================= datasets

@case(Fails("test.h5", "is missing", "capcli prepare"))
def dataset_split_file_missing(ctx):
    d = copy_data(ctx)
    (d / "test.h5").unlink()
    return eval_args(ctx, d)


@case(Fails("no split 'dev'", "train, val, test"))
def dataset_split_not_in_the_manifest(ctx):
    return [*eval_args(ctx, ctx.data)[:-3], "--split", "dev", *CPU, "-q"]


@case(Fails("train.h5", "truncated", "capcli prepare"))
def dataset_truncated_hdf5(ctx):
    d = copy_data(ctx)
    raw = (d / "train.h5").read_bytes()
    (d / "train.h5").write_bytes(raw[: len(raw) // 2])
    return train_args(ctx, data=d)


def _counts_named(ctx, result):
    assert "holds 6 images" in result.output and "says 9" in result.output


@case(Fails("test.h5", "manifest.json", check=_counts_named))
def dataset_manifest_disagrees_with_its_files(ctx):
    d = copy_data(ctx)
    m = manifest(d)
    assert m["splits"]["test"]["images"] == 6
    m["splits"]["test"]["images"] = 9
    (d / "manifest.json").write_text(json.dumps(m))
    return eval_args(ctx, d)


@case(Fails("manifest.json", "not valid JSON"))
def dataset_manifest_not_json(ctx):
    d = copy_data(ctx)
    (d / "manifest.json").write_text('{"splits": {"train": ')
    return eval_args(ctx, d)


@case(Fails("vocab.json", "not a vocabulary"))
def dataset_vocabulary_damaged(ctx):
    d = copy_data(ctx)
    (d / "vocab.json").write_text(json.dumps({"a": 1}))
    return eval_args(ctx, d)


@case(Fails("test.h5", "lacks", "references"))
def dataset_split_file_from_elsewhere(ctx):
    d = copy_data(ctx)
    with h5py.File(d / "test.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((6, 3, 32, 32), np.uint8))
    return eval_args(ctx, d)


# ========================================================================================== outputs

@case(Fails("notes.txt", "is a file"))
def output_of_prepare_under_a_file(ctx):
    (ctx.tmp / "notes.txt").write_text("x")
    args = folder_source(ctx, {})
    return [a if a != ctx.tmp / "out" else ctx.tmp / "notes.txt" / "ds" for a in args]


@case(Fails("--out", "notes.txt", "is a file"))
def output_of_prepare_is_a_file(ctx):
    (ctx.tmp / "notes.txt").write_text("x")
    args = folder_source(ctx, {})
    return [a if a != ctx.tmp / "out" else ctx.tmp / "notes.txt" for a in args]


@case(Fails("already holds a finished dataset", "--overwrite"))
def output_of_prepare_holds_another_dataset(ctx):
    d = copy_data(ctx)
    args = folder_source(ctx, {})
    return [a if a != ctx.tmp / "out" else d for a in args]


@case(Fails("run.dir", "notes.txt", "is a file"))
def output_run_dir_under_a_file(ctx):
    (ctx.tmp / "notes.txt").write_text("x")
    args = train_args(ctx)
    return [a if not a.startswith("run.dir=") else f"run.dir={ctx.tmp / 'notes.txt' / 'runs'}" for a in args]


@case(Fails("notes.txt", "is a file"))
def output_of_evaluate_under_a_file(ctx):
    (ctx.tmp / "notes.txt").write_text("x")
    args = eval_args(ctx, ctx.data)
    return [a if a != ctx.tmp / "e" / "eval.json" else ctx.tmp / "notes.txt" / "eval.json" for a in args]


@case(Fails("notes.txt", "is a file"))
def output_of_caption_under_a_file(ctx):
    (ctx.tmp / "notes.txt").write_text("x")
    return ["caption", ctx.run, ctx.photos / "g0.png", "--output", ctx.tmp / "notes.txt" / "c.json", *CPU]


@case(Fails("caps.json exists", "--resume"))
def output_of_caption_exists(ctx):
    (ctx.tmp / "caps.json").write_text("[]")
    return ["caption", ctx.run, ctx.photos / "g0.png", "--output", ctx.tmp / "caps.json", *CPU]


def _numbered(ctx, result):
    runs = ctx.tmp / "runs"
    assert (runs / "t" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (runs / "t").iterdir()) == ["keep.txt"]  # untouched
    assert (runs / "t-2" / "checkpoints" / "last.pt").is_file()


@case(Works(_numbered))
def output_run_dir_exists(ctx):
    (ctx.tmp / "runs" / "t").mkdir(parents=True)
    (ctx.tmp / "runs" / "t" / "keep.txt").write_text("mine")
    return train_args(ctx)


# ============================================================================================ runner

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-input-photos")
    for i in range(8):
        noise(folder / f"g{i}.png", (24, 16), seed=i)
    return folder


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, runner, photos) -> Path:
    """A folder dataset at 32 px whose vocabulary is not the synthetic one."""
    root = tmp_path_factory.mktemp("other")
    words = ["a photo of noise", "some grainy static picture", "noise and more noise"]
    rows = ["image,caption,split"] + [f"g{i}.png,{words[i % 3]},{'train' if i < 6 else ('val', 'test')[i - 6]}"
                                      for i in range(8)]
    (root / "c.csv").write_text("\n".join(rows) + "\n")
    invoke(runner, ["prepare", "folder", "--images", photos, "--captions", root / "c.csv", "--out", root / "ds",
                    "--size", 32, "--min-word-freq", 1, "--workers", 0, "-q"])
    return root / "ds"


@pytest.fixture
def ctx(tmp_path, tiny_data, tiny_run, other_data, photos) -> Ctx:
    return Ctx(tmp=tmp_path, data=tiny_data, run=tiny_run, other=other_data, photos=photos)


def test_the_table_is_long_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("setup, expect", CASES)
def test_bad_input(setup, expect, runner, ctx, monkeypatch):
    monkeypatch.chdir(ctx.tmp)  # nothing a command writes by default lands in the repository
    args = [str(a) for a in setup(ctx)]
    result = runner.invoke(app, args)
    out = result.output
    assert "Traceback" not in out and "internal error" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if isinstance(expect, Fails):
        assert result.exit_code == expect.code, f"exit {result.exit_code} != {expect.code}\n{out}"
        for needle in expect.needles:
            assert needle in out, f"{needle!r} not in:\n{out}"
        if expect.code == 1:
            lines = out.strip().splitlines()
            assert lines[0].startswith("Error:") and len(lines) <= 3, out  # one message (rich may wrap it)
    else:
        assert result.exit_code == 0, f"exit {result.exit_code}\n{out}"
        if isinstance(expect, Skips):
            folder = ctx.tmp / expect.out
            skipped = json.loads((folder / "skipped.json").read_text())
            assert [e["reason"] for e in skipped] == [expect.reason] * expect.count, skipped
            m = manifest(folder)
            assert m["skipped"] == expect.count and m["skipped_reasons"] == {expect.reason: expect.count}
            assert sum(s["images"] for s in m["splits"].values()) == 8  # every good image kept
    if expect.check is not None:
        expect.check(ctx, result)
