"""Model folders: the self-contained, pickle-free form of a trained captioner, for sharing
(``capcli export``; ``capcli push`` uploads one to the Hugging Face Hub), and reading any MODEL
source into one plain dict (:func:`read_model`).

A model folder holds exactly::

    model.safetensors   the model's state dict (encoder + decoder), safetensors, nothing pickled
    config.json         what rebuilds and runs the model (below)
    vocab.json          the vocabulary: a JSON list, index -> token (<pad>=0, <start>, <end>, <unk>)
    README.md           the model card: model, training data, training config, scores, usage

``config.json`` holds:

- ``format``: ``"capcli-model"``; ``format_version``: 1 (a reader refuses a newer version);
- ``capcli_version``: the capcli that trained the model;
- ``config``: the resolved training config (the ``config.yaml`` of the run, as a dict); its
  ``model`` section rebuilds the network (``capcli.models.captioner.Captioner``);
- ``preprocessing``: how images become the encoder's input: ``image_size`` (images are resized to
  S x S RGB, uint8), ``resize`` (the policy: ``squash``, ...), ``mean``/``std`` (the backbone's
  normalisation, applied inside the encoder to pixels scaled to [0, 1]), ``encoder_image_size``
  (the size the encoder resizes to internally; null = as given), ``channels_last``;
- ``decoding``: the defaults ``capcli caption`` uses: ``beam_size``, ``max_length`` (longest
  caption in words), ``block_ngrams``, ``allow_unk``, ``dangling`` (words no caption ends on);
- ``data``: the training data facts the model carries (``image_size``, ``resize``,
  ``max_length``, ``dir``), as in a checkpoint;
- ``model``: a summary for people and tools: encoder name, decoder sizes, vocabulary size,
  parameter counts;
- ``training_data``: the facts of the training set's manifest (source, image size, vocabulary,
  splits), or null where it was not available at export;
- ``scores``: one object per ``capcli evaluate`` of the run (split, beam_size, images, bleu1..4,
  meteor, rouge_l, cider, ...), empty where none was recorded;
- ``onnx`` (``--format onnx`` only): the ONNX graphs beside the weights, their inputs and outputs,
  opset and export id (:mod:`capcli.onnx`).

:func:`read_model` reads any MODEL source (run dir, checkpoint file, model folder,
``hf-hub:user/name[@revision]``) into one plain dict.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from capcli.errors import UserError
from capcli.store import checkpoint, hub
from capcli.store.card import eval_scores, model_card, training_data
from capcli.store.files import atomic_path, write_json, write_text
from capcli.text import BLOCK_NGRAMS, DANGLING_EN
from capcli.version import __version__

MODEL_FORMAT = "capcli-model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
CARD_FILE = "README.md"
# exactly what a model folder holds, each with what the model card says of it
MODEL_FILES = {
    WEIGHTS_FILE: "the weights (safetensors; nothing pickled, nothing executed on load)",
    CONFIG_FILE: (f"the config that rebuilds the model, its preprocessing and decoding defaults (format "
                  f"`{MODEL_FORMAT}` version {MODEL_FORMAT_VERSION})"),
    VOCAB_FILE: "the vocabulary, index -> token",
    CARD_FILE: "this card",
}
DEFAULT_DECODING = {"beam_size": 3, "block_ngrams": BLOCK_NGRAMS, "allow_unk": False, "dangling": list(DANGLING_EN)}


def read_model(source: str | Path) -> dict:
    """A trained captioner from any MODEL source, as a plain dict: ``model`` (state dict),
    ``config`` (the resolved config), ``vocab`` (index -> token), ``data`` (image size and resize
    policy the model was trained with), ``capcli_version``, ``source``, and the model's facts:
    ``training_data`` (:func:`capcli.store.card.training_data`, or None) and ``scores`` (its
    evaluations, :func:`capcli.store.card.eval_scores`).

    Sources: a run dir (its checkpoints/best.pt, else last.pt), a checkpoint file, a model folder
    written by :func:`export_model` (or its ``model.safetensors``), or ``hf-hub:user/name`` /
    ``hf-hub:user/name@revision`` (downloaded once into the Hugging Face cache; with
    ``HF_HUB_OFFLINE=1`` only the cache is used).
    """
    text = str(source)
    if text.startswith(hub.HUB_PREFIX):
        state = read_folder(hub.download(text, tuple(MODEL_FILES)))
        state["source"] = text
        return state
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if is_model_folder(path):
        state = read_folder(path)
        state["source"] = text
        return state
    ckpt = checkpoint.load(path)
    data = dict(ckpt.get("data") or {})
    data_dir = (ckpt["config"].get("data") or {}).get("dir") if isinstance(ckpt["config"], dict) else None
    return {"model": ckpt["model"], "config": ckpt["config"], "vocab": list(ckpt["vocab"]), "data": data,
            "capcli_version": ckpt.get("capcli_version", "?"), "source": text,
            "training_data": training_data(data_dir or data.get("dir")), "scores": eval_scores(run_dir_of(path))}


def is_model_folder(path: str | Path) -> bool:
    """A folder that is (or tries to be) a model folder rather than a run dir."""
    path = Path(path)
    if not path.is_dir() or (path / "checkpoints").is_dir():
        return False
    return any((path / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE))


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:160]}); "
                        f"{what}") from exc


def read_folder(folder: str | Path, *, weights: bool = True) -> dict:
    """:func:`read_model`'s dict from a model folder, with a one-line UserError for anything wrong.
    ``weights=False`` leaves the safetensors file unread (``model`` is None: another backend runs
    the folder) and adds ``meta``, the whole config.json."""
    folder = Path(folder)
    fix = f"re-export it with `capcli export RUN {folder} --overwrite`"
    if not folder.is_dir():
        raise UserError(f"model folder {folder} not found; give a folder written by `capcli export`")
    needed = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE) if weights else (CONFIG_FILE, VOCAB_FILE)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        if WEIGHTS_FILE in missing and other:
            raise UserError(f"model folder {folder} has {', '.join(other)} but no {WEIGHTS_FILE}: capcli model "
                            f"folders hold safetensors weights only (never pickles); {fix}")
        raise UserError(f"model folder {folder} lacks {', '.join(missing)}; {fix}")
    meta = _read_json(folder / CONFIG_FILE, fix)
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{folder / CONFIG_FILE} is not a capcli model config (format {found!r}, expected "
                        f"{MODEL_FORMAT!r}); give a folder written by `capcli export`")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{folder / CONFIG_FILE} has no valid format_version ({version!r}); {fix}")
    if version > MODEL_FORMAT_VERSION:
        raise UserError(f"model folder {folder} has format_version {version}, newer than this capcli "
                        f"{__version__} reads ({MODEL_FORMAT_VERSION}); upgrade capcli (pip install -U capcli)")
    if not isinstance(meta.get("config"), dict) or "model" not in meta["config"]:
        raise UserError(f"{folder / CONFIG_FILE} lacks the model's config (config.model); {fix}")
    vocab = _read_json(folder / VOCAB_FILE, fix)
    if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) for t in vocab):
        raise UserError(f"{folder / VOCAB_FILE} is not a vocabulary (a JSON list of tokens, index -> token); {fix}")
    if not weights:
        tensors = None
    else:
        tensors = _read_weights(folder, fix)
    prep = meta.get("preprocessing") or {}
    data = dict(meta.get("data") or {})
    for key in ("image_size", "resize"):
        if data.get(key) is None and prep.get(key) is not None:
            data[key] = prep[key]
    if data.get("max_length") is None and (meta.get("decoding") or {}).get("max_length"):
        data["max_length"] = meta["decoding"]["max_length"]
    scores = meta.get("scores")
    return {"model": tensors, "meta": meta, "config": meta["config"], "vocab": vocab, "data": data,
            "capcli_version": meta.get("capcli_version", "?"), "source": str(folder),
            "training_data": meta.get("training_data") if isinstance(meta.get("training_data"), dict) else None,
            "scores": [s for s in scores if isinstance(s, dict)] if isinstance(scores, list) else []}


def _read_weights(folder: Path, fix: str) -> dict:
    try:
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except ImportError as exc:
        raise UserError("reading a model folder needs the safetensors package: pip install safetensors") from exc
    except Exception as exc:  # safetensors' own error type: a pickle or any other file in its place
        raise UserError(f"{folder / WEIGHTS_FILE} is not a safetensors file ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]}); "
                        f"capcli model folders hold safetensors weights only; {fix}") from exc


def folder_of(source: str | Path, patterns: tuple[str, ...] = ()) -> Path:
    """The local model folder of a source that must be one (a folder written by `capcli export`,
    or ``hf-hub:user/name`` with ``patterns``, extra files to fetch, beside the folder's own)."""
    text = str(source)
    if text.startswith(hub.HUB_PREFIX):
        return hub.download(text, tuple(MODEL_FILES) + tuple(patterns))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".onnx", ".json"):
        path = path.parent
    if not is_model_folder(path):
        raise UserError(f"{source} is not a model folder; this needs one written by `capcli export` (from a run: "
                        f"capcli export {source} DIR --format onnx)")
    return path


def _encoder_facts(model_cfg: dict) -> dict:
    """The backbone's normalisation (mean/std) and memory format, without weights or memory: the
    timm model is built on the meta device, as :class:`capcli.models.encoder.Encoder` builds it."""
    import timm
    from timm.data import resolve_model_data_config

    name = model_cfg.get("encoder")
    facts: dict = {"mean": None, "std": None, "channels_last": None}
    try:
        with torch.device("meta"):
            backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        data_cfg = resolve_model_data_config(backbone)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules())
    except Exception:  # a backbone that will not build on meta: its registered pretrained config
        try:
            data_cfg, convs = timm.get_pretrained_cfg(name).to_dict(), None
        except Exception:
            return facts
    facts["mean"] = [float(x) for x in data_cfg["mean"]] if data_cfg.get("mean") else None
    facts["std"] = [float(x) for x in data_cfg["std"]] if data_cfg.get("std") else None
    channels_last = model_cfg.get("channels_last", "auto")
    if channels_last == "auto":
        channels_last = None if convs is None else convs > 1
    facts["channels_last"] = None if channels_last is None else bool(channels_last)
    return facts


def _param_counts(state_dict: dict) -> dict:
    counts = {"total": 0, "encoder": 0, "decoder": 0}
    for key, tensor in state_dict.items():
        n = int(tensor.numel())
        counts["total"] += n
        part = key.split(".", 1)[0]
        if part in ("encoder", "decoder"):
            counts[part] += n
    return counts


def model_folder_config(state: dict) -> dict:
    """The ``config.json`` of a model folder for a :func:`read_model` dict (see the module doc)."""
    cfg = state["config"]
    model_cfg = cfg.get("model") or {}
    data = dict(state.get("data") or {})
    enc = _encoder_facts(model_cfg)
    image_size = data.get("image_size") or model_cfg.get("image_size")
    feature_dim = None
    for key in ("encoder.feature_norm.weight", "decoder.attention.enc_att.weight"):
        if key in state["model"]:
            t = state["model"][key]
            feature_dim = int(t.shape[-1]) if t.dim() else None
            break
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "capcli_version": state.get("capcli_version", "?"),
        "model": {
            "architecture": "timm encoder + soft-attention LSTM decoder (Show, Attend and Tell)",
            "encoder": model_cfg.get("encoder"), "grid": model_cfg.get("grid"),
            "feature_dim": feature_dim, "emb_dim": model_cfg.get("emb_dim"),
            "att_dim": model_cfg.get("att_dim"), "dec_dim": model_cfg.get("dec_dim"),
            "vocab_size": len(state["vocab"]), "parameters": _param_counts(state["model"]),
        },
        "preprocessing": {
            "image_size": image_size, "resize": data.get("resize", "squash"),
            "input": "RGB uint8 (3, S, S); the encoder scales to [0, 1] and normalises with mean/std",
            "mean": enc["mean"], "std": enc["std"],
            "encoder_image_size": model_cfg.get("image_size"), "channels_last": enc["channels_last"],
        },
        "decoding": {"beam_size": DEFAULT_DECODING["beam_size"], "max_length": int(data.get("max_length") or 50),
                     **{k: v for k, v in DEFAULT_DECODING.items() if k != "beam_size"}},
        "data": data,
        "training_data": state.get("training_data"),
        "scores": list(state.get("scores") or []),
        "config": cfg,
    }


def run_dir_of(source: str | Path) -> Path | None:
    """The run dir behind a source (a run dir, or a checkpoint inside its checkpoints/), if any."""
    if str(source).startswith(hub.HUB_PREFIX):
        return None
    path = Path(source).expanduser()
    for cand in (path, path.parent.parent):
        if cand.is_dir() and (cand / "config.yaml").is_file() and (cand / "checkpoints").is_dir():
            return cand
    return None


def _check_destination(out: Path, source: str | Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the model")
    if not str(source).startswith(hub.HUB_PREFIX):
        src, dst = Path(source).expanduser().resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise UserError(f"{out} holds the model being exported ({source}); give another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; choose a new folder or pass --overwrite to replace it")
        try:
            ours = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == MODEL_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours or (out / "checkpoints").exists():
            raise UserError(f"{out} is not a capcli model folder, so --overwrite will not replace it "
                            "(it would delete its files); choose a new or empty folder")


def export_model(source: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                 repo_id: str | None = None,
                 extra: Callable[[Path, dict], tuple[str, dict, dict[str, str]]] | None = None) -> Path:
    """Write the model folder of any MODEL source (typically a run dir: its best.pt) to ``out_dir``.

    The folder is written beside ``out_dir`` under a temporary name and renamed into place, so it
    is whole or absent. An existing non-empty ``out_dir`` is replaced only with ``overwrite`` (and
    only when it is a model folder). ``repo_id`` (``user/name``) names the Hub repo in the model
    card's usage examples. ``extra(folder, state)`` writes more files into the folder being made
    and returns (a config.json key, its section, {file name: what the card says of it}): the ONNX
    graphs of ``--format onnx`` (:mod:`capcli.onnx`). Returns ``out_dir``.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise UserError("exporting a model folder needs the safetensors package: pip install safetensors") from exc

    out = Path(out_dir).expanduser()
    _check_destination(out, source, overwrite)
    state = read_model(source)
    tensors, storages = {}, set()
    for key, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "it cannot be stored in safetensors")
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # safetensors refuses shared or partial storage: a copy of its own
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    meta = model_folder_config(state)

    old = out.with_name(f".{out.name}.old{os.getpid()}")
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "capcli_format": MODEL_FORMAT})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors writes 0600; as readable as the rest
            files = dict(MODEL_FILES)
            if extra is not None:
                key, section, notes = extra(tmp, state)
                meta[key] = section
                files.update(notes)
            write_json(tmp / CONFIG_FILE, meta, newline=True)
            write_json(tmp / VOCAB_FILE, list(state["vocab"]), indent=None, newline=True)
            write_text(tmp / CARD_FILE, model_card(meta, state["vocab"], files, repo_id=repo_id))
            if out.is_dir() and any(out.iterdir()):
                os.replace(out, old)  # the model folder being replaced (checked above), deleted below
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the new folder did not make it: the old one stays
        raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out




def push_model(source, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str | None = None, progress: Callable[[str], None] | None = None,
               extra: Callable[[Path, dict], tuple[str, dict, dict[str, str]]] | None = None) -> str:
    """Export ``source`` (any MODEL source, typically a run dir) to a temporary model folder and
    upload it to the Hub model repo ``repo_id`` (created if missing). Returns the repo's URL.

    ``progress`` is called with a short line as each stage starts (export, upload)."""
    import tempfile

    progress = progress or (lambda line: None)
    repo_id = hub.require_login(repo_id, token)  # before the export, which the upload would waste
    with tempfile.TemporaryDirectory(prefix="capcli-push-") as tmp:
        progress(f"exporting {source}")
        folder = export_model(source, Path(tmp) / "model", repo_id=repo_id, extra=extra)
        progress(f"uploading to {repo_id}{' (private)' if private else ''}")
        return hub.upload(folder, repo_id, private=private, token=token,
                          commit_message=commit_message or f"Upload capcli model from {Path(str(source)).name}")
