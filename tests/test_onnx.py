"""ONNX model folders and the onnxruntime backend: the graphs against the torch model (log-probs to
1e-4, captions equal at beam 1 and 3), the CLI, the bad folders, push, and the NumPy-only example."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capcli.api import Captioner
from tests.conftest import REPO, invoke

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'capcli[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'capcli[onnx]'")

IMAGES = [str(p) for p in sorted((REPO / "examples" / "images").glob("*.png"))]


@pytest.fixture(scope="module")
def onnx_folder(tiny_run, runner, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    result = invoke(runner, ["export", tiny_run, out, "--format", "onnx", "--quantize", "int8"])
    assert "decoder_step.onnx" in result.output and "--backend onnxruntime" in result.output
    return out


@pytest.fixture(scope="module")
def random_graphs(tmp_path_factory):
    """A random convnext_atto captioner at 64 px with a 2 x 2 grid (4 regions, so attention is
    not trivial), its graphs exported, and its torch model."""
    from capcli.bench.harness import model_config
    from capcli.models.captioner import CaptionModel
    from capcli.onnx import export_graphs

    torch.manual_seed(0)
    model = CaptionModel(model_config("convnext_atto", 2, finetune=False), 40, pretrained=False).eval()
    folder = tmp_path_factory.mktemp("random_onnx")
    section = export_graphs(model, 64, folder)
    return model, folder, section


def test_folder_holds_checked_graphs_and_says_how_to_run_them(onnx_folder):
    meta = json.loads((onnx_folder / "config.json").read_text())
    section = meta["onnx"]
    assert section["opset"] >= 17 and section["int8"] == {"decoder_init": "decoder_init.int8.onnx",
                                                         "decoder_step": "decoder_step.int8.onnx"}
    for name in ("encoder", "decoder_init", "decoder_step"):
        path = onnx_folder / f"{name}.onnx"
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert {p.key: p.value for p in model.metadata_props}["capcli_export_id"] == section["export_id"]
    graphs = section["graphs"]
    assert [a["name"] for a in graphs["encoder"]["inputs"]] == ["images"]
    assert graphs["encoder"]["inputs"][0]["dtype"] == "uint8" and graphs["encoder"]["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert [a["name"] for a in graphs["decoder_step"]["inputs"]] == ["tokens", "h", "c", "features", "proj"]
    assert [a["name"] for a in graphs["decoder_step"]["outputs"]] == ["logp", "h_next", "c_next", "alpha"]
    vocab = json.loads((onnx_folder / "vocab.json").read_text())
    assert graphs["decoder_step"]["outputs"][0]["shape"][1] == len(vocab)
    assert section["special_tokens"] == {"pad": vocab.index("<pad>"), "start": vocab.index("<start>"),
                                         "end": vocab.index("<end>"), "unk": vocab.index("<unk>")}
    card = (onnx_folder / "README.md").read_text()
    assert "## Run it with onnxruntime" in card and "`decoder_step.onnx`" in card
    assert "decoder_step.int8.onnx" in card


def test_step_log_probabilities_match_torch(random_graphs):
    model, folder, _ = random_graphs
    dec = model.decoder
    init = ort.InferenceSession(str(folder / "decoder_init.onnx"))
    step = ort.InferenceSession(str(folder / "decoder_step.onnx"))
    encoder = ort.InferenceSession(str(folder / "encoder.onnx"))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.encode(images)
        (got_feats,) = encoder.run(None, {"images": images.numpy()})
        assert got_feats.shape == (3, 4, feats.shape[2])
        np.testing.assert_allclose(got_feats, feats.numpy(), atol=1e-4, rtol=1e-4)
        h0, c0, proj = init.run(None, {"features": feats.numpy()})
        ref_h, ref_c = dec.init_state(feats)
        np.testing.assert_allclose(h0, ref_h.numpy(), atol=1e-5)
        np.testing.assert_allclose(proj, dec.attention.project(feats).numpy(), atol=1e-5)
        k = 2  # two rows (beams) per image, each with its own state and word
        h = torch.randn(6, h0.shape[1])
        c = torch.randn(6, h0.shape[1])
        tokens = torch.tensor([1, 5, 7, 7, 30, 2])
        logp, h1, c1, alpha = step.run(None, {"tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy(),
                                              "features": feats.numpy(), "proj": proj})
        fused, dec.fused = dec.fused, False  # the reference code, row by row, the features repeated per beam
        try:
            rf, rp = feats.repeat_interleave(k, 0), dec.attention.project(feats).repeat_interleave(k, 0)
            ref_h1, ref_c1, ref_alpha = dec.step(tokens, rf, rp, h, c)
            ref_logp = torch.log_softmax(dec.logits(ref_h1), dim=1)
        finally:
            dec.fused = fused
    assert np.abs(logp - ref_logp.numpy()).max() < 1e-4
    np.testing.assert_allclose(h1, ref_h1.numpy(), atol=1e-5)
    np.testing.assert_allclose(c1, ref_c1.numpy(), atol=1e-5)
    np.testing.assert_allclose(alpha, ref_alpha.numpy(), atol=1e-5)
    assert not np.allclose(alpha, 0.25)  # four regions, attended unevenly: the test can fail


def test_onnxruntime_captions_equal_torch(onnx_folder):
    torch_cap = Captioner.load(onnx_folder, "cpu")
    ort_cap = Captioner.load(onnx_folder, "cpu", backend="onnxruntime")
    assert ort_cap.backend == "onnxruntime" and torch_cap.backend == "torch"
    for beam in (1, 3):
        assert ort_cap.caption(IMAGES, beam=beam) == torch_cap.caption(IMAGES, beam=beam)
    # the same decoding code: n-gram blocking off, sampling with a seed, attention maps
    assert ort_cap.caption(IMAGES, beam=3, block_ngrams=0) == torch_cap.caption(IMAGES, beam=3, block_ngrams=0)
    drawn = {"temperature": 0.8, "top_k": 5}
    assert ort_cap.caption(IMAGES, sample=drawn, seed=3) == torch_cap.caption(IMAGES, sample=drawn, seed=3)
    a, b = ort_cap.caption_with_attention(IMAGES[0]), torch_cap.caption_with_attention(IMAGES[0])
    assert a["words"] == b["words"]
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-5)
    int8 = Captioner.load(onnx_folder, "cpu", backend="onnxruntime", int8=True)
    assert all(isinstance(t, str) and t for t in int8.caption(IMAGES, beam=3))
    assert ort_cap.describe()["parameters"] == torch_cap.describe()["parameters"]


def test_tiny_model_log_probabilities_match_torch(onnx_folder):
    """The tiny test model's own graphs, three steps on examples/images at 3 rows per image."""
    torch_cap = Captioner.load(onnx_folder, "cpu")
    ort_cap = Captioner.load(onnx_folder, "cpu", backend="onnxruntime")
    images = torch_cap.preprocess(IMAGES)
    dec, odec = torch_cap.model.decoder, ort_cap.model.decoder
    fused, dec.fused = dec.fused, False  # the reference code
    try:
        with torch.inference_mode():
            feats = torch_cap.model.encode(images)
            ofeats = ort_cap.model.encode(images)
            assert torch.allclose(ofeats, feats, atol=1e-4)
            k = 3
            h, c = dec.init_state(feats)
            oh, oc = odec.init_state(feats)
            proj = dec.attention.project(feats)
            oproj = odec.attention.project(feats)
            h, c = h.repeat_interleave(k, 0), c.repeat_interleave(k, 0)
            oh, oc = oh.repeat_interleave(k, 0), oc.repeat_interleave(k, 0)
            tokens = torch.full((len(IMAGES) * k,), torch_cap.vocab.start)
            for _ in range(3):
                h, c, _ = dec.step(tokens, feats.repeat_interleave(k, 0), proj.repeat_interleave(k, 0), h, c)
                ref = torch.log_softmax(dec.logits(h), dim=1)
                oh, oc, _ = odec.step(tokens, feats, oproj, oh, oc)
                got = odec.logits(oh)
                assert (got - ref).abs().max() < 1e-4
                tokens = torch.randint(4, len(torch_cap.vocab), tokens.shape)  # the next words: any
    finally:
        dec.fused = fused


def test_random_model_captions_equal_torch(random_graphs):
    """Random weights: captions run long, every step of the beam search is compared."""
    from capcli.decode import DecodeOptions, decode_features
    from capcli.bench.harness import random_vocab
    from capcli.store.onnx import OnnxCaptionModel

    model, folder, section = random_graphs
    ort_model = OnnxCaptionModel(folder, {"onnx": section}, 40)
    vocab = random_vocab(40)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    for beam in (1, 3):
        options = DecodeOptions(beam_size=beam, max_length=12)
        with torch.inference_mode():
            ref = decode_features(model, vocab, model.encode(images), options)[0]
            with ort_model.derived_weights():
                got = decode_features(ort_model, vocab, ort_model.encode(images), options)[0]
        assert got == ref
        assert max(len(t.split()) for t in ref) > 3


def test_cli_backends_caption_evaluate_and_benchmark(runner, onnx_folder, tiny_data, tmp_path):
    out_t, out_o = tmp_path / "t.json", tmp_path / "o.json"
    invoke(runner, ["caption", onnx_folder, *IMAGES, "--beam", "3", "--output", out_t, "--device", "cpu", "-q"])
    invoke(runner, ["caption", onnx_folder, *IMAGES, "--beam", "3", "--output", out_o, "--backend", "onnxruntime", "-q"])
    assert json.loads(out_o.read_text()) == json.loads(out_t.read_text())
    ev_t, ev_o = tmp_path / "et" / "eval.json", tmp_path / "eo" / "eval.json"
    invoke(runner, ["evaluate", onnx_folder, "--data", tiny_data, "--no-meteor", "--output", ev_t, "--device", "cpu", "-q"])
    invoke(runner, ["evaluate", onnx_folder, "--data", tiny_data, "--no-meteor", "--output", ev_o,
                    "--backend", "onnxruntime", "-q"])
    t, o = json.loads(ev_t.read_text()), json.loads(ev_o.read_text())
    assert o["backend"] == "onnxruntime" and t["backend"] == "torch"
    assert o["bleu4"] == t["bleu4"] and o["cider"] == t["cider"]
    assert o["loss"] is None and t["loss"] is not None  # the teacher-forced pass is the torch model's
    bench = tmp_path / "bench.json"
    invoke(runner, ["benchmark", "decode", "--checkpoint", onnx_folder, "--backend", "onnxruntime", "--int8",
                    "--images", "4", "--beam", "3", "--output", bench, "-q"])
    result = json.loads(bench.read_text())
    assert result["backend"] == "onnxruntime-int8" and result["captions_per_s"] > 0


def one_line_error(result, *needles):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_bad_folders_are_one_line(runner, onnx_folder, tiny_run, tmp_path):
    image = IMAGES[0]

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(onnx_folder, dst)
        return dst

    plain = tmp_path / "plain"
    invoke(runner, ["export", tiny_run, plain, "-q"])
    one_line_error(invoke(runner, ["caption", plain, image, "--backend", "onnxruntime"], code=1),
                   "has no ONNX graphs", "--format onnx")
    one_line_error(invoke(runner, ["caption", tiny_run, image, "--backend", "onnxruntime"], code=1),
                   "is not a model folder", "--format onnx")
    missing = copy("missing")
    (missing / "encoder.onnx").unlink()
    one_line_error(invoke(runner, ["caption", missing, image, "--backend", "onnxruntime"], code=1),
                   "lacks encoder.onnx")
    # a graph from another export of the same model
    other = tmp_path / "other"
    invoke(runner, ["export", tiny_run, other, "--format", "onnx", "-q"])
    mixed = copy("mixed")
    shutil.copy(other / "decoder_step.onnx", mixed / "decoder_step.onnx")
    one_line_error(invoke(runner, ["caption", mixed, image, "--backend", "onnxruntime"], code=1),
                   "decoder_step.onnx comes from another export")
    # an old opset
    old = copy("old")
    model = onnx.load(str(old / "decoder_init.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 13
    onnx.save(model, str(old / "decoder_init.onnx"))
    one_line_error(invoke(runner, ["caption", old, image, "--backend", "onnxruntime"], code=1),
                   "decoder_init.onnx is at opset 13", "opset 17 or newer")
    # another model's vocabulary
    words = copy("words")
    vocab = json.loads((words / "vocab.json").read_text())
    (words / "vocab.json").write_text(json.dumps(vocab + ["zebra"]))
    one_line_error(invoke(runner, ["caption", words, image, "--backend", "onnxruntime"], code=1),
                   f"scores {len(vocab)} words but", f"holds {len(vocab) + 1}")
    # no int8 graphs; bad export options
    one_line_error(invoke(runner, ["caption", other, image, "--backend", "onnxruntime", "--int8"], code=1),
                   "has no int8 graphs", "--quantize int8")
    one_line_error(invoke(runner, ["caption", other, image, "--int8"], code=1), "backend onnxruntime")
    one_line_error(invoke(runner, ["export", tiny_run, tmp_path / "q", "--quantize", "int8"], code=1),
                   "--quantize", "--format onnx")
    one_line_error(invoke(runner, ["export", tiny_run, tmp_path / "f", "--format", "tflite"], code=1),
                   "--format tflite: use safetensors or onnx")
    one_line_error(invoke(runner, ["caption", onnx_folder, image, "--backend", "tensorrt"], code=1),
                   "--backend tensorrt: use torch or onnxruntime")


def test_missing_onnxruntime_names_the_extra(runner, onnx_folder, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(invoke(runner, ["caption", onnx_folder, IMAGES[0], "--backend", "onnxruntime"], code=1),
                   'pip install "capcli[onnx]"')
    one_line_error(invoke(runner, ["export", tiny_run, tmp_path / "x", "--format", "onnx"], code=1),
                   'pip install "capcli[onnx]"')


def test_push_uploads_the_onnx_graphs(tiny_run, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class Api:
        def __init__(self, token=None, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            uploaded.update({p.name: p.stat().st_size for p in Path(kwargs["folder_path"]).iterdir()})

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    from capcli.onnx import exporter
    from capcli.store.folder import push_model

    push_model(tiny_run, "alice/tiny-onnx", extra=exporter())
    assert {"encoder.onnx", "decoder_init.onnx", "decoder_step.onnx", "model.safetensors", "config.json",
            "vocab.json", "README.md"} == set(uploaded)
    assert all(size > 0 for size in uploaded.values())


def test_example_runs_without_torch(onnx_folder, tmp_path):
    """examples/onnx_caption.py in a process where `import torch` (and capcli) fail: its greedy
    captions are capcli's."""
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("torch", "capcli", "timm"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    out = subprocess.run([sys.executable, str(REPO / "examples" / "onnx_caption.py"), str(onnx_folder), *IMAGES],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    got = dict(line.split("\t") for line in out.stdout.strip().splitlines())
    expected = Captioner.load(onnx_folder, "cpu").caption(IMAGES, beam=1)
    assert [got[p] for p in IMAGES] == expected
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "blocked" in check.stderr  # the block holds
