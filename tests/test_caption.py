"""Captioning at scale and the Python API: one engine behind `capcli caption` and `Captioner`,
streamed JSONL, --resume over a killed run, and torchrun ranks merged in input order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from capcli import Captioner
from capcli.data.synthetic import make_scenes, save_png
from tests.conftest import invoke


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, (spec, _) in enumerate(make_scenes(9, seed=21)):
        save_png(spec, folder / f"p{i}.png", 40 + 4 * i)  # different sizes: resized by the model's own rule
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_api_and_cli_give_the_same_captions(runner, tiny_run, photos, tmp_path):
    cap = Captioner.load(tiny_run, device="cpu")
    files = sorted(photos.glob("p*.png"))
    api = cap.caption(files, beam=2)
    pil = cap.caption([Image.open(f) for f in files], beam=2)
    arrays = cap.caption([np.asarray(Image.open(f).convert("RGB")) for f in files], beam=2)
    chw = cap.caption([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                       for f in files], beam=2)
    assert api == pil == arrays == chw and isinstance(cap.caption(files[0], beam=2), str)
    out = tmp_path / "c.jsonl"
    invoke(runner, ["caption", tiny_run, *files, "--beam", 2, "--output", out, "--device", "cpu", "-q"])
    assert [r["caption"] for r in rows_of(out)] == api
    att = cap.caption_with_attention(files[0], beam=2)
    assert att["caption"] == api[0] and att["words"] == api[0].split()
    assert att["attention"].shape == (len(att["words"]) + 1, 1, 1)  # one 1x1 grid (32 px) per word and <end>
    np.testing.assert_allclose(att["attention"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
    with pytest.raises(Exception, match="uint8"):
        cap.caption(np.zeros((8, 8, 3), dtype=np.float32))


def test_the_default_batch_is_the_devices(runner, tiny_run, photos, tmp_path, monkeypatch):
    """Without --batch-size, caption, evaluate, the API and benchmark decode batch as the device
    suits: 32 images on a CPU, 128 on a GPU (whose beam search is launch-bound)."""
    import capcli.api
    import capcli.caption
    import capcli.decode
    from capcli.decode import default_batch_size

    assert (default_batch_size("cpu"), default_batch_size("cuda:1"), default_batch_size("meta")) == (32, 128, 32)
    seen = []
    real = capcli.caption.caption_batches
    monkeypatch.setattr(capcli.caption, "caption_batches",
                        lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    out = tmp_path / "c.jsonl"
    invoke(runner, ["caption", tiny_run, photos, "--output", out, "--device", "cpu", "-q"])
    invoke(runner, ["caption", tiny_run, photos, "--output", tmp_path / "d.jsonl", "--batch-size", 3,
                    "--device", "cpu", "-q"])
    assert seen == [32, 3]
    monkeypatch.setitem(capcli.decode.DEFAULT_BATCH, "cpu", 4)  # the API batches the same way
    batches = []
    real_generate = capcli.api.generate
    monkeypatch.setattr(capcli.api, "generate", lambda m, v, images, *a, **kw: batches.append(len(images))
                        or real_generate(m, v, images, *a, **kw))
    Captioner.load(tiny_run, device="cpu").caption(sorted(photos.glob("p*.png")))
    assert batches == [4, 4, 1]


def test_amp_sets_the_precision_of_the_api_the_cli_and_evaluate(runner, tiny_run, tiny_data, photos, tmp_path,
                                                                monkeypatch):
    """--amp (and Captioner.load's amp) overrides the model's train.amp: bf16 on the CPU runs the
    products in bf16 and says so in eval.json; the default stays float32 on a CPU; bad values fail
    before the model is read."""
    import capcli.caption

    assert Captioner.load(tiny_run, device="cpu").amp_dtype is None  # train.amp auto: float32 on a CPU
    cap = Captioner.load(tiny_run, device="cpu", amp="bf16")
    assert cap.amp_dtype is torch.bfloat16
    files = sorted(photos.glob("p*.png"))
    api = cap.caption(files, beam=2)
    seen = []
    real = capcli.caption.generate
    monkeypatch.setattr(capcli.caption, "generate", lambda *a, **kw: seen.append(a[3].amp_dtype) or real(*a, **kw))
    out = tmp_path / "c.jsonl"
    invoke(runner, ["caption", tiny_run, *files, "--beam", 2, "--amp", "bf16", "--output", out, "--device", "cpu", "-q"])
    assert [r["caption"] for r in rows_of(out)] == api and set(seen) == {torch.bfloat16}
    seen.clear()
    invoke(runner, ["caption", tiny_run, files[0], "--device", "cpu", "-q"])
    assert seen == [None]
    for flag, message in (("fp8", "use auto, off, bf16 or fp16"), ("fp16", "on the CPU use bf16")):
        result = invoke(runner, ["caption", tiny_run, files[0], "--amp", flag, "--device", "cpu"], code=1)
        assert message in result.output
        with pytest.raises(Exception, match=message):
            Captioner.load(tiny_run, device="cpu", amp=flag)
    for amp, name in (("bf16", "bf16"), (None, "off")):
        ev = tmp_path / f"ev-{name}" / "eval.json"
        invoke(runner, ["evaluate", tiny_run, "--data", tiny_data, "--max-images", 3, "--beam", 2, "--no-meteor",
                        "--output", ev, "--device", "cpu", "-q", *(["--amp", amp] if amp else [])])
        assert json.loads(ev.read_text())["amp"] == name
    result = invoke(runner, ["evaluate", "--results", tmp_path / "ev-off" / "captions.json", "--data", tiny_data,
                             "--amp", "bf16"], code=1)
    assert "--amp" in result.output


def test_jsonl_streams_in_input_order_with_errors_as_rows(runner, tiny_run, photos, tmp_path):
    out = tmp_path / "all.jsonl"
    invoke(runner, ["caption", tiny_run, photos, "--output", out, "--batch-size", 4, "--workers", 2,
                    "--device", "cpu", "-q"])
    rows = rows_of(out)
    assert [os.path.basename(r["file"]) for r in rows] == [f"p{i}.png" for i in range(9)] + ["zz_broken.jpg"]
    assert rows[-1]["caption"] is None and "Error" in rows[-1]["error"]
    assert all(r["error"] is None for r in rows[:-1])
    result = invoke(runner, ["caption", tiny_run, photos, "--output", out, "--device", "cpu"], code=1)
    assert "--resume" in result.output  # an existing output is never overwritten silently


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_continues_a_killed_run(runner, tiny_run, photos, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    invoke(runner, ["caption", tiny_run, photos, "--output", full, "--batch-size", 3, "--device", "cpu", "-q"])
    # a run killed after three rows and half of a fourth: its stream file as the kill left it
    out = tmp_path / f"part{suffix}"
    stream = out if suffix == ".jsonl" else out.with_name(out.name + ".partial.jsonl")
    invoke(runner, ["caption", tiny_run, photos, "--output", tmp_path / "ref.jsonl", "--batch-size", 3,
                    "--device", "cpu", "-q"])
    lines = (tmp_path / "ref.jsonl").read_text().splitlines(keepends=True)
    kept = [json.loads(x) for x in lines[:3]]
    kept[1]["caption"] = "KEPT FROM THE FIRST RUN"
    stream.write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[3][: len(lines[3]) // 2])
    invoke(runner, ["caption", tiny_run, photos, "--output", out, "--resume", "--batch-size", 3,
                    "--device", "cpu", "-q"])
    from capcli.caption import read_rows

    resumed, reference = read_rows(out), read_rows(full)
    assert [r["file"] for r in resumed] == [r["file"] for r in reference]
    assert resumed[1]["caption"] == "KEPT FROM THE FIRST RUN"  # not captioned again
    assert [r["caption"] for i, r in enumerate(resumed) if i != 1] == [r["caption"] for i, r in enumerate(reference) if i != 1]
    assert not stream.exists() or suffix == ".jsonl"


def test_torchrun_ranks_split_the_files_and_merge_in_order(tiny_run, photos, tmp_path):
    single = tmp_path / "single.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "capcli", "caption", str(tiny_run), str(photos), "--batch-size", "2",
            "--device", "cpu", "-q"]
    subprocess.run([*base, "--output", str(single)], env=env, check=True, capture_output=True, timeout=300)
    merged = tmp_path / "merged.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *base[1:],
                           "--output", str(merged)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(merged.read_text()) == rows_of(single)
    assert not list(tmp_path.glob("merged.json.*"))  # the ranks' parts are gone
