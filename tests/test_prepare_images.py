"""What real files do: every bad-image kind is skipped with its reason (and the run succeeds), and
grayscale, 16-bit, CMYK, palette, alpha and EXIF-rotated images become the right RGB pixels."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from capcli.data.images import load_image
from capcli.data.prepare import write_dataset
from capcli.data.sources import folder_records
from capcli.errors import UserError


def _noise_jpeg(path: Path, size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


# ----------------------------------------------------------------------------------------- conversions

def test_grayscale_and_16_bit_become_gray_rgb(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png", 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8 and (out == 128).all()
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(tmp_path / "g16.png")
    out16 = load_image(tmp_path / "g16.png", 8)
    assert (out16 == 128).all()  # scaled to 8 bits, not clipped to 255


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg", 16).astype(int)
    assert abs(out[0].mean() - 255) < 6 and out[1].mean() < 6 and out[2].mean() < 6


def test_palette_and_alpha_images(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert tuple(load_image(tmp_path / "p.png", 8)[:, 0, 0]) == (10, 200, 30)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)        # fully transparent left half -> white
    rgba[:, 4:] = (0, 0, 255, 255)      # opaque right half -> blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 8)
    assert tuple(out[:, 3, 0]) == (255, 255, 255) and tuple(out[:, 3, 7]) == (0, 0, 255)
    Image.new("LA", (8, 8), (0, 128)).save(tmp_path / "la.png")  # black at half alpha over white
    assert abs(int(load_image(tmp_path / "la.png", 8)[0, 4, 4]) - 127) <= 1
    pt = Image.new("P", (8, 8), 0)
    pt.putpalette([9, 9, 9, 0, 255, 0] + [0] * 762)
    pt.info["transparency"] = 0
    pt.save(tmp_path / "pt.png", transparency=0)
    assert tuple(load_image(tmp_path / "pt.png", 8)[:, 0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)   # 40 wide, 20 high: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge is the visual top
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", 32).astype(int)
    top, bottom = out[:, :12].reshape(3, -1).mean(1), out[:, -12:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 50        # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom
    crop = load_image(tmp_path / "rot.jpg", 16, "crop").astype(int)  # 20x40 portrait -> centre square
    assert crop.shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------ bad images

def test_every_bad_image_kind_is_skipped_and_listed(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    good = [f"good{i}.jpg" for i in range(8)]
    for i, name in enumerate(good):
        _noise_jpeg(img / name, seed=i)
    data = _noise_jpeg(tmp_path / "full.jpg", (128, 128), seed=99)
    (img / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (img / "corrupt.jpg").write_bytes(os.urandom(2000))
    (img / "empty.jpg").write_bytes(b"")
    (img / "folder.jpg").mkdir()
    bad = ["truncated.jpg", "corrupt.jpg", "empty.jpg", "folder.jpg", "missing.jpg"]
    expected = {"truncated.jpg": "truncated", "corrupt.jpg": "not an image", "empty.jpg": "not an image",
                "folder.jpg": "unreadable", "missing.jpg": "missing"}
    if os.geteuid() != 0:  # root reads anything: no permission error to provoke
        _noise_jpeg(img / "noperm.jpg", seed=50)
        os.chmod(img / "noperm.jpg", 0)
        bad.append("noperm.jpg")
        expected["noperm.jpg"] = "unreadable"
    rows = ["image,caption,split"] + [f"{n},a photo of noise,train" for n in good[:6]] + \
        [f"{good[6]},a photo,val", f"{good[7]},a photo,test"] + [f"{n},a broken photo,train" for n in bad]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    recs = folder_records(img, tmp_path / "c.csv")
    manifest = write_dataset(recs, tmp_path / "out", source="folder", image_size=16, workers=2, min_word_freq=1)
    assert manifest["splits"]["train"]["images"] == 6 and manifest["splits"]["train"]["skipped"] == len(bad)
    assert manifest["skipped"] == len(bad)
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert {e["file"]: e["reason"] for e in skipped} == expected
    assert all(e["split"] == "train" and e["error"] and isinstance(e["image_id"], int) for e in skipped)
    assert sum(manifest["skipped_reasons"].values()) == len(bad)
    with h5py.File(tmp_path / "out" / "train.h5") as f:
        assert list(f["file_names"].asstr()[:]) == good[:6]
        assert f["images"].shape == (6, 3, 16, 16) and f["captions"].shape[0] == 6 * 5
        assert f["reference_offsets"][-1] == len(f["references"]) == 6


def test_nothing_left_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "y.jpg").write_bytes(b"nor this")
    (tmp_path / "c.csv").write_text("image,caption\nx.jpg,a\ny.jpg,b\n")
    recs = folder_records(tmp_path, tmp_path / "c.csv")
    with pytest.raises(UserError, match=r"every image was skipped \(2\)"):
        write_dataset(recs, tmp_path / "out", source="folder", image_size=16, min_word_freq=1)


def test_in_memory_bytes_and_paths_agree(tmp_path):
    _noise_jpeg(tmp_path / "n.jpg", seed=3)
    from capcli.data.images import prepare_image

    with Image.open(io.BytesIO((tmp_path / "n.jpg").read_bytes())) as im:
        a = prepare_image(im, 24)
    assert np.array_equal(a, load_image(tmp_path / "n.jpg", 24))
