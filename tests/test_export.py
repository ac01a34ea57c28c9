"""Model folders (`capcli export`), hf-hub:user/name models and `capcli push`, all offline: the Hub
calls are replaced by fakes that record what capcli asked of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import errors as hf_errors

from capcli import Captioner
from capcli.store import checkpoint
from capcli.store.folder import MODEL_FILES, export_model, read_model
from capcli.data.synthetic import make_scenes, save_png
from capcli.errors import UserError
from tests.conftest import invoke


@pytest.fixture(scope="module")
def run(tmp_path_factory, runner, tiny_run, tiny_data) -> Path:
    """A copy of the tiny run (this module writes into it) with a test-split evaluation."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, run)
    invoke(runner, ["evaluate", run, "--data", tiny_data, "--split", "test", "--no-meteor", "--device", "cpu", "-q"])
    assert (run / "eval-test" / "eval.json").is_file()
    return run


@pytest.fixture(scope="module")
def folder(run) -> Path:
    return export_model(run, run.parent / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("images")
    return [save_png(spec, out / f"s{i}.png", size=32) for i, (spec, _) in enumerate(make_scenes(4, seed=7))]


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------- the format


def test_export_writes_exactly_the_model_files_and_nothing_pickled(run, folder):
    from safetensors import safe_open

    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model", "run"]  # no temporary left behind
    ckpt = checkpoint.load(run)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "capcli-model" and meta["format_version"] == 1
    assert meta["capcli_version"] == ckpt["capcli_version"]
    assert meta["config"] == ckpt["config"]  # the resolved config rebuilds the model
    assert meta["data"] == ckpt["data"]
    prep = meta["preprocessing"]
    assert prep["image_size"] == 32 and prep["resize"] == "squash"
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["std"] == pytest.approx([0.229, 0.224, 0.225])
    from capcli.text import BLOCK_NGRAMS, DANGLING_EN

    assert meta["decoding"] == {"beam_size": 3, "max_length": ckpt["data"]["max_length"], "block_ngrams": BLOCK_NGRAMS,
                                "allow_unk": False, "dangling": list(DANGLING_EN)}
    assert meta["model"]["encoder"] == "convnext_atto" and meta["model"]["vocab_size"] == len(ckpt["vocab"])
    assert meta["model"]["parameters"]["total"] == sum(t.numel() for t in ckpt["model"].values())
    assert json.loads((folder / "vocab.json").read_text()) == list(ckpt["vocab"])
    # the weights: a safetensors file (8-byte header size, then a JSON header), equal tensor by tensor
    raw = (folder / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header])["__metadata__"]["format"] == "pt"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(ckpt["model"])
        for key, tensor in ckpt["model"].items():
            loaded = f.get_tensor(key)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), key
    # nothing that unpickles: no pickle protocol header and no torch zip archive anywhere
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", path


def test_model_card_has_the_scores_the_data_and_the_usage(run, folder, tiny_data):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "capcli" and front["pipeline_tag"] == "image-to-text"
    assert {"image-captioning", "image-to-text"} <= set(front["tags"])
    scores = json.loads((run / "eval-test" / "eval.json").read_text())
    evaluation = card.split("## Evaluation")[1].split("\n## ")[0]
    assert "| split | beam | images | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |" in evaluation
    row = next(line for line in evaluation.splitlines() if line.startswith("| test |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["test", str(scores["beam_size"]), str(scores["images"])]
    assert cells[3:7] == [f"{100 * scores[k]:.2f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4")]
    assert cells[7] == "-"  # METEOR skipped (--no-meteor)
    assert cells[8] == f"{100 * scores['rouge_l']:.2f}" and cells[9] == f"{scores['cider']:.3f}"
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert f"| source | {manifest['source']} |" in card
    assert f"| vocabulary size | {manifest['vocab']['size']} |" in card
    for split, facts in manifest["splits"].items():
        assert f"| {split} | {facts['images']} | {facts['captions']} |" in card
    config_block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == checkpoint.load(run)["config"]
    assert 'Captioner.load("DIR")' in card and "capcli caption DIR photo.jpg" in card
    assert "convnext_atto" in card and "parameters" in card


def test_a_model_without_eval_or_data_dir_still_gets_a_card(run, tmp_path):
    ckpt = checkpoint.load(run)
    ckpt["config"] = {**ckpt["config"], "data": {**ckpt["config"]["data"], "dir": str(tmp_path / "gone")}}
    checkpoint.save(ckpt, tmp_path / "lone.pt")
    card = (export_model(tmp_path / "lone.pt", tmp_path / "m") / "README.md").read_text()
    assert "No evaluation was recorded" in card and "manifest was not available" in card


# --------------------------------------------------------------------------- reading a folder


def test_folder_captions_equal_the_run_captions(run, folder, images):
    from_run = Captioner.load(run, device="cpu")
    from_folder = Captioner.load(folder, device="cpu")
    assert from_folder.image_size == from_run.image_size and from_folder.max_length == from_run.max_length
    assert from_folder.vocab.itos == from_run.vocab.itos
    assert from_folder.caption(images) == from_run.caption(images)
    assert from_folder.caption(images, beam=1) == from_run.caption(images, beam=1)
    state = read_model(folder / "model.safetensors")  # the weights file names its folder
    assert state["data"]["image_size"] == 32 and set(state["model"]) == set(checkpoint.load(run)["model"])


def test_caption_and_evaluate_cli_read_a_folder(runner, run, folder, images, tiny_data, tmp_path):
    outs = {}
    for name, model in (("run", run), ("folder", folder)):
        outs[name] = tmp_path / f"{name}.json"
        invoke(runner, ["caption", model, *images, "--output", outs[name], "--device", "cpu", "-q"])
    captions = {k: [r["caption"] for r in json.loads(v.read_text())] for k, v in outs.items()}
    assert captions["folder"] == captions["run"] and all(captions["folder"])
    out = tmp_path / "ev" / "eval.json"
    invoke(runner, ["evaluate", folder, "--data", tiny_data, "--split", "test", "--no-meteor",
                    "--output", out, "--device", "cpu", "-q"])
    scores, of_run = json.loads(out.read_text()), json.loads((run / "eval-test" / "eval.json").read_text())
    for key in ("bleu1", "bleu4", "rouge_l", "cider", "loss", "top5", "images"):
        assert scores[key] == pytest.approx(of_run[key]), key


def test_export_cli_refuses_to_overwrite_without_the_flag(runner, run, tmp_path):
    out = tmp_path / "m"
    result = invoke(runner, ["export", run, out, "-q"])
    assert result.output.strip() == str(out)
    one_line_error(invoke(runner, ["export", run, out], code=1), str(out), "--overwrite")
    stamp = (out / "config.json").stat().st_mtime_ns
    result = invoke(runner, ["export", run, out, "--overwrite"])
    assert "wrote" in result.output and "model.safetensors" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FILES) and (out / "config.json").stat().st_mtime_ns >= stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # --overwrite replaces model folders only: never a folder of other files, never the run itself
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_line_error(invoke(runner, ["export", run, other, "--overwrite"], code=1), "not a capcli model folder")
    assert (other / "keep.txt").read_text() == "mine"
    one_line_error(invoke(runner, ["export", run, run.parent, "--overwrite"], code=1), "holds the model")
    (tmp_path / "empty").mkdir()
    invoke(runner, ["export", run, tmp_path / "empty", "-q"])  # an empty folder is fine
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(MODEL_FILES)


def test_broken_folders_are_one_line_errors(runner, folder, images, tmp_path):
    def broken(name, change):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        change(bad)
        return bad

    bad = broken("novocab", lambda d: (d / "vocab.json").unlink())
    with pytest.raises(UserError, match="lacks vocab.json"):
        read_model(bad)
    one_line_error(invoke(runner, ["caption", bad, images[0], "--device", "cpu"], code=1), "lacks vocab.json", str(bad))

    def newer(d):
        meta = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**meta, "format_version": 99}))

    bad = broken("newer", newer)
    with pytest.raises(UserError, match="format_version 99.*upgrade capcli"):
        read_model(bad)
    one_line_error(invoke(runner, ["evaluate", bad, "--device", "cpu"], code=1), "format_version 99")

    bad = broken("other", lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})))
    with pytest.raises(UserError, match="not a capcli model config"):
        read_model(bad)

    def pickled(d):  # a pickle under the safetensors name is refused, never unpickled
        torch.save({"w": torch.ones(2)}, d / "model.safetensors")

    with pytest.raises(UserError, match="not a safetensors file"):
        read_model(broken("pickled", pickled))

    def pt_only(d):
        (d / "model.safetensors").rename(d / "pytorch_model.bin")

    with pytest.raises(UserError, match="safetensors weights only"):
        read_model(broken("ptonly", pt_only))


# ------------------------------------------------------------------------------- the Hub, faked


@pytest.fixture
def fake_download(monkeypatch, folder):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hf_hub_models_load_through_snapshot_download(runner, fake_download, folder, images, tmp_path):
    expected = Captioner.load(folder, device="cpu").caption(images)
    cap = Captioner.load("hf-hub:alice/capcli-tiny", device="cpu")
    assert cap.caption(images) == expected and cap.source == "hf-hub:alice/capcli-tiny"
    call = fake_download[-1]
    assert call["repo_id"] == "alice/capcli-tiny" and call["revision"] is None
    assert call.get("repo_type", "model") == "model"
    assert sorted(call["allow_patterns"]) == sorted(MODEL_FILES)
    Captioner.load("hf-hub:alice/capcli-tiny@v1.0", device="cpu")
    assert fake_download[-1]["repo_id"] == "alice/capcli-tiny" and fake_download[-1]["revision"] == "v1.0"
    out = tmp_path / "hub.json"
    invoke(runner, ["caption", "hf-hub:alice/capcli-tiny", *images, "--output", out, "--device", "cpu", "-q"])
    assert [r["caption"] for r in json.loads(out.read_text())] == expected
    n = len(fake_download)
    for bad in ("hf-hub:", "hf-hub:alice", "hf-hub:alice/a/b", "hf-hub:alice/x@", "hf-hub:a lice/x"):
        with pytest.raises(UserError, match="hf-hub:user/name"):
            read_model(bad)
    assert len(fake_download) == n  # refused before asking the Hub


def test_hf_hub_offline_reads_the_real_cache(runner, monkeypatch, folder, images, tmp_path):
    """The real snapshot_download, HF_HUB_OFFLINE=1 (no request leaves the process) and a repo
    already in the Hugging Face cache: it loads; a repo not in the cache is a one-line error."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--alice--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cap = Captioner.load("hf-hub:alice/cached", device="cpu")
    assert cap.caption(images) == Captioner.load(folder, device="cpu").caption(images)
    one_line_error(invoke(runner, ["caption", "hf-hub:alice/elsewhere", images[0], "--device", "cpu"], code=1),
                   "HF_HUB_OFFLINE=1", "alice/elsewhere", "local Hugging Face cache")


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/alice/x"))


@pytest.mark.parametrize("exc, offline, needles", [
    (hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), False,
     ["cannot reach the Hugging Face Hub", "alice/x", "HF_HUB_OFFLINE=1"]),
    (hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), True,
     ["HF_HUB_OFFLINE=1 uses only the local", "alice/x"]),
    ("not found", False, ["repository alice/x not found", "login"]),
    ("revision", False, ["revision 'v9' not found", "alice/x"]),
    ("server", False, ["HTTP 500", "HF_HUB_OFFLINE=1"]),
])
def test_hub_failures_are_one_line_errors(runner, monkeypatch, exc, offline, needles, images):
    from huggingface_hub import constants

    if exc == "not found":
        exc = hf_errors.RepositoryNotFoundError("Repository Not Found for url", response=_response(404))
    elif exc == "revision":
        exc = hf_errors.RevisionNotFoundError("Revision Not Found", response=_response(404))
    elif exc == "server":
        exc = hf_errors.HfHubHTTPError("500 Server Error", response=_response(500))

    def snapshot_download(repo_id, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    source = "hf-hub:alice/x@v9" if "revision" in needles[0] else "hf-hub:alice/x"
    result = invoke(runner, ["caption", source, images[0], "--device", "cpu"], code=1)
    one_line_error(result, source, *needles)


def test_missing_huggingface_hub_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        read_model("hf-hub:alice/x")


class FakeApi:
    """Records create_repo/upload_folder and what the uploaded folder held at upload time."""

    calls: ClassVar[list] = []
    fail_with: ClassVar[Exception | None] = None

    def __init__(self, token=None, **kwargs):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        FakeApi.calls.append(("upload_folder", {**kwargs, "files": files}))


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    return FakeApi


def test_push_exports_creates_the_repo_and_uploads_the_folder(runner, run, fake_api):
    from capcli.store.folder import push_model

    url = push_model(run, "alice/capcli-tiny", private=True, commit_message="first")
    assert url == "https://huggingface.co/alice/capcli-tiny"
    kinds = [k for k, _ in fake_api.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    create, upload = fake_api.calls[1][1], fake_api.calls[2][1]
    assert create["repo_id"] == "alice/capcli-tiny" and create["private"] is True
    assert create["exist_ok"] is True and create.get("repo_type", "model") == "model"
    assert upload["repo_id"] == "alice/capcli-tiny" and upload["commit_message"] == "first"
    assert sorted(upload["files"]) == sorted(MODEL_FILES)
    assert b'Captioner.load("hf-hub:alice/capcli-tiny")' in upload["files"]["README.md"]
    assert json.loads(upload["files"]["config.json"])["format"] == "capcli-model"
    assert not Path(upload["folder_path"]).exists()  # the temporary export is cleaned up

    fake_api.calls.clear()
    result = invoke(runner, ["push", run, "--repo", "alice/capcli-tiny", "--token", "hf_given", "-q"])
    assert result.output.strip() == "https://huggingface.co/alice/capcli-tiny"
    assert fake_api.calls[0] == ("init", {"token": "hf_given"})
    assert fake_api.calls[1][1]["private"] is False


@pytest.mark.parametrize("repo", ["capcli-tiny", "alice/", "alice/a/b", "alice/bad name", "-alice/x", "alice/x..y"])
def test_push_validates_the_repo_id(runner, run, fake_api, repo):
    one_line_error(invoke(runner, ["push", run, "--repo", repo], code=1), "user/name")
    assert fake_api.calls == []


def test_push_without_a_login_says_how_to_log_in(runner, run, fake_api, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    one_line_error(invoke(runner, ["push", run, "--repo", "alice/x"], code=1),
                   "not logged in", "hf auth login", "HF_TOKEN")
    assert fake_api.calls == []  # nothing exported, nothing asked
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stale")
    fake_api.fail_with = hf_errors.HfHubHTTPError("401 Unauthorized", response=_response(401))
    one_line_error(invoke(runner, ["push", run, "--repo", "alice/x", "-q"], code=1), "HTTP 401", "hf auth login")
    fake_api.fail_with = hf_errors.LocalTokenNotFoundError("no token")
    one_line_error(invoke(runner, ["push", run, "--repo", "alice/x", "-q"], code=1), "not logged in", "HF_TOKEN")


def test_export_and_push_help_have_examples(runner):
    for cmd in ("export", "push"):
        result = invoke(runner, [cmd, "--help"])
        assert "Examples:" in result.output and f"capcli {cmd} runs/" in result.output
