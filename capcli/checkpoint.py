"""Checkpoints and model folders: everything that stores a trained captioner.

Checkpoints are plain containers of tensors and Python scalars, written atomically and read with
``torch.load(weights_only=True)`` (no pickled modules, no code execution on load).

A *model folder* (``capcli export``, :func:`export_model`) is the self-contained, pickle-free form
of a trained captioner, for sharing (``capcli push`` uploads one to the Hugging Face Hub)::

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
  caption in words), ``block_ngrams``;
- ``data``: the training data facts the model carries (``image_size``, ``resize``,
  ``max_length``, ``dir``), as in a checkpoint;
- ``model``: a summary for people and tools: encoder name, decoder sizes, vocabulary size,
  parameter counts.

:func:`read_model` reads any MODEL source (run dir, checkpoint file, model folder,
``hf-hub:user/name[@revision]``) into one plain dict.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from capcli.errors import UserError, disk_space

MODEL_FORMAT = "capcli-model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
CARD_FILE = "README.md"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE, CARD_FILE)  # exactly what a model folder holds
HUB_PREFIX = "hf-hub:"
DEFAULT_DECODING = {"beam_size": 3, "block_ngrams": 0}


def save(state: dict, path: str | Path) -> None:
    """Write to a temporary name in the same folder and rename: a kill never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_space(path, _tensor_bytes(state), "the previous checkpoint is intact: free some space, "
                        "then `capcli train --resume RUN` continues from it"):
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tensor_bytes(obj) -> int:
    """About what ``obj`` takes on disk: the bytes of every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 64


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a run dir: take its best checkpoint, else the last
        for name in ("checkpoints/best.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give a .pt file or a run dir (runs/NAME)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something: never unpickled
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc)) or re.findall(r"global ([\w.]+)", str(exc))
        what = f" ({found[0]})" if found else ""
        raise UserError(f"{path} is not a readable capcli checkpoint: refused, it holds pickled Python objects{what} "
                        "that would run code when loaded (capcli checkpoints hold only tensors and plain "
                        "values); use a checkpoint written by `capcli train` or a folder from `capcli export`, "
                        "and only from a source you trust") from exc
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise UserError(f"{path} is not a readable capcli checkpoint (it is truncated or damaged, or another "
                        f"format: {type(exc).__name__}: {first}); use the run's other checkpoint "
                        "(checkpoints/last.pt or best.pt) or train again") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vocab" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a capcli checkpoint (it lacks model/vocab/config)")
    _check_fields(path, ckpt)
    return ckpt


def _check_fields(path: Path, ckpt: dict) -> None:
    """The types a capcli checkpoint's fields have, so that a foreign or edited file is named here
    rather than failing later."""
    version = ckpt.get("capcli_version", "?")
    problem = None
    if not isinstance(ckpt["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in ckpt["model"].items()):
        problem = "its model is not a state dict of tensors"
    elif not isinstance(ckpt["vocab"], (list, tuple)) or not all(isinstance(t, str) for t in ckpt["vocab"]):
        problem = "its vocab is not a list of tokens"
    elif not isinstance(ckpt["config"], dict):
        problem = "its config is not a mapping"
    if problem:
        raise UserError(f"{path} is not a capcli checkpoint ({problem}; made by capcli {version}); give a "
                        "checkpoint written by `capcli train`")


def read_model(source: str | Path) -> dict:
    """A trained captioner from any MODEL source, as a plain dict: ``model`` (state dict),
    ``config`` (the resolved config), ``vocab`` (index -> token), ``data`` (image size and resize
    policy the model was trained with), ``capcli_version`` and ``source``.

    Sources: a run dir (its checkpoints/best.pt, else last.pt), a checkpoint file, a model folder
    written by :func:`export_model` (or its ``model.safetensors``), or ``hf-hub:user/name`` /
    ``hf-hub:user/name@revision`` (downloaded once into the Hugging Face cache; with
    ``HF_HUB_OFFLINE=1`` only the cache is used).
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        from capcli import hub

        state = read_folder(hub.download(text))
        state["source"] = text
        return state
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if is_model_folder(path):
        state = read_folder(path)
        state["source"] = text
        return state
    ckpt = load(path)
    return {"model": ckpt["model"], "config": ckpt["config"], "vocab": list(ckpt["vocab"]),
            "data": dict(ckpt.get("data") or {}), "capcli_version": ckpt.get("capcli_version", "?"),
            "source": text}


# ---------------------------------------------------------------------------------------------
# model folders: safetensors + JSON + model card


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


def read_folder(folder: str | Path) -> dict:
    """:func:`read_model`'s dict from a model folder, with a one-line UserError for anything wrong."""
    folder = Path(folder)
    fix = f"re-export it with `capcli export RUN {folder} --overwrite`"
    if not folder.is_dir():
        raise UserError(f"model folder {folder} not found; give a folder written by `capcli export`")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE) if not (folder / name).is_file()]
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
        import capcli

        raise UserError(f"model folder {folder} has format_version {version}, newer than this capcli "
                        f"{capcli.__version__} reads ({MODEL_FORMAT_VERSION}); upgrade capcli (pip install -U capcli)")
    if not isinstance(meta.get("config"), dict) or "model" not in meta["config"]:
        raise UserError(f"{folder / CONFIG_FILE} lacks the model's config (config.model); {fix}")
    vocab = _read_json(folder / VOCAB_FILE, fix)
    if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) for t in vocab):
        raise UserError(f"{folder / VOCAB_FILE} is not a vocabulary (a JSON list of tokens, index -> token); {fix}")
    try:
        from safetensors.torch import load_file

        weights = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except ImportError as exc:
        raise UserError("reading a model folder needs the safetensors package: pip install safetensors") from exc
    except Exception as exc:  # safetensors' own error type: a pickle or any other file in its place
        raise UserError(f"{folder / WEIGHTS_FILE} is not a safetensors file ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]}); "
                        f"capcli model folders hold safetensors weights only; {fix}") from exc
    prep = meta.get("preprocessing") or {}
    data = dict(meta.get("data") or {})
    for key in ("image_size", "resize"):
        if data.get(key) is None and prep.get(key) is not None:
            data[key] = prep[key]
    if data.get("max_length") is None and (meta.get("decoding") or {}).get("max_length"):
        data["max_length"] = meta["decoding"]["max_length"]
    return {"model": weights, "config": meta["config"], "vocab": vocab, "data": data,
            "capcli_version": meta.get("capcli_version", "?"), "source": str(folder)}


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
                     "block_ngrams": DEFAULT_DECODING["block_ngrams"]},
        "data": data,
        "config": cfg,
    }


def run_dir_of(source: str | Path) -> Path | None:
    """The run dir behind a source (a run dir, or a checkpoint inside its checkpoints/), if any."""
    if str(source).startswith(HUB_PREFIX):
        return None
    path = Path(source).expanduser()
    for cand in (path, path.parent.parent):
        if cand.is_dir() and (cand / "config.yaml").is_file() and (cand / "checkpoints").is_dir():
            return cand
    return None


def _check_destination(out: Path, source: str | Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the model")
    if not str(source).startswith(HUB_PREFIX):
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
                 repo_id: str | None = None) -> Path:
    """Write the model folder of any MODEL source (typically a run dir: its best.pt) to ``out_dir``.

    The folder is written beside ``out_dir`` under a temporary name and renamed into place, so it
    is whole or absent. An existing non-empty ``out_dir`` is replaced only with ``overwrite`` (and
    only when it is a model folder). ``repo_id`` (``user/name``) names the Hub repo in the model
    card's usage examples. Returns ``out_dir``.
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
    card = model_card(meta, state["vocab"], run_dir_of(source), repo_id=repo_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    old = out.parent / f".{out.name}.old{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "capcli_format": MODEL_FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors writes 0600; as readable as the rest
        (tmp / CONFIG_FILE).write_text(json.dumps(_json_clean(meta), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        (tmp / VOCAB_FILE).write_text(json.dumps(list(state["vocab"]), ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        if out.is_dir():
            if any(out.iterdir()):
                os.replace(out, old)  # a model folder being replaced (checked above)
            else:
                out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out


def _json_clean(value):
    """JSON-safe: tuples -> lists, NaN/inf -> null, paths -> str."""
    import math

    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# the model card (README.md of a model folder, the Hub's model page)


def _fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _eval_rows(run_dir: Path | None) -> list[list]:
    """One row per eval-*/eval.json of the run: BLEU, METEOR, ROUGE-L x100, CIDEr-D as is."""
    if run_dir is None:
        return []
    rows = []
    for path in sorted(run_dir.glob("eval-*/eval.json")):
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(scores, dict):
            continue

        def pct(key, scores=scores):
            v = scores.get(key)
            return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-"

        cider = scores.get("cider")
        rows.append([scores.get("split") or path.parent.name[len("eval-"):], scores.get("beam_size"),
                     scores.get("images"), pct("bleu1"), pct("bleu2"), pct("bleu3"), pct("bleu4"), pct("meteor"),
                     pct("rouge_l"), f"{cider:.3f}" if isinstance(cider, (int, float)) else "-"])
    return rows


def _data_section(data_dir: str | None) -> list[str]:
    lines = [f"Dataset dir at training time: `{data_dir}`." if data_dir else "The dataset dir is not recorded."]
    manifest = None
    if data_dir and (Path(data_dir) / "manifest.json").is_file():
        try:
            manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = None
    if not isinstance(manifest, dict):
        lines.append("")
        lines.append("Its manifest was not available when this model was exported, so its facts are not recorded here.")
        return lines
    vocab = manifest.get("vocab") or {}
    facts = [("source", manifest.get("source")), ("image size", manifest.get("image_size")),
             ("resize", manifest.get("resize")), ("captions per image", manifest.get("captions_per_image")),
             ("vocabulary size", vocab.get("size") if isinstance(vocab, dict) else None),
             ("longest caption kept (words)", vocab.get("max_length") if isinstance(vocab, dict) else None),
             ("prepared by capcli", manifest.get("capcli_version"))]
    lines += ["", _md_table(["fact", "value"], [[k, v] for k, v in facts if v is not None])]
    splits = manifest.get("splits") or {}
    if isinstance(splits, dict) and splits:
        lines += ["", _md_table(["split", "images", "captions"],
                                [[name, s.get("images"), s.get("captions")] for name, s in splits.items()
                                 if isinstance(s, dict)])]
    return lines


def model_card(meta: dict, vocab: list[str], run_dir: Path | None = None, repo_id: str | None = None) -> str:
    """The README.md of a model folder: YAML front matter for the Hub, then the model, its
    training data (from the dataset dir's manifest.json when it still exists), its training config,
    its scores (the run's eval-*/eval.json) and how to use it."""
    import yaml

    model, prep, cfg = meta["model"], meta["preprocessing"], meta["config"]
    model_cfg, train_cfg = cfg.get("model") or {}, cfg.get("train") or {}
    encoder = model.get("encoder") or "?"
    params = model.get("parameters") or {}
    front = {"library_name": "capcli", "pipeline_tag": "image-to-text",
             "tags": ["image-captioning", "image-to-text", "capcli", "show-attend-tell", "timm", str(encoder)]}
    where = f"hf-hub:{repo_id}" if repo_id else "DIR"
    title = f"capcli captioner: {encoder} + attention LSTM"
    grid = model_cfg.get("grid")
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
           ("An image captioner made with capcli: a timm image encoder "
            f"(`{encoder}`) whose feature map is pooled to a grid of regions, and an LSTM decoder with soft "
            "visual attention over those regions (Show, Attend and Tell), trained with capcli "
            f"{meta.get('capcli_version', '?')}."), "",
           "## Model", "",
           _md_table(["part", "value"], [
               ["encoder (timm)", f"`{encoder}`"],
               ["encoder init", "pretrained weights" if model_cfg.get("pretrained") not in (False, "false", None)
                else "random (trained from scratch)"],
               ["encoder trained", "yes" if model_cfg.get("finetune", True) else "no (frozen)"],
               ["regions", f"{grid} x {grid}" if grid else "as the backbone gives them"],
               ["region features", model.get("feature_dim")],
               ["word embedding", model.get("emb_dim")], ["attention", model.get("att_dim")],
               ["LSTM hidden", model.get("dec_dim")], ["vocabulary", f"{len(vocab)} tokens"],
               ["parameters", (f"{_fmt_params(params.get('total'))} (encoder {_fmt_params(params.get('encoder'))}, "
                               f"decoder {_fmt_params(params.get('decoder'))})")],
               ["input", (f"RGB, resized to {prep.get('image_size')} x {prep.get('image_size')} ({prep.get('resize')}), "
                          f"normalised with mean {prep.get('mean')} and std {prep.get('std')}")],
               ["longest caption", f"{meta['decoding'].get('max_length')} words"]]),
           "", "## Training data", ""]
    out += _data_section((cfg.get("data") or {}).get("dir") or (meta.get("data") or {}).get("dir"))
    out += ["", "## Training", "",
            (f"Objective `{train_cfg.get('objective', 'xe')}`, {train_cfg.get('epochs', '?')} "
             f"epoch{'' if train_cfg.get('epochs') == 1 else 's'}, "
             f"batch {train_cfg.get('batch_size', '?')} caption-image pairs, learning rate {train_cfg.get('lr', '?')} "
             f"(encoder {train_cfg.get('encoder_lr', '?')}). The full resolved config:"), "",
            "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "", "## Evaluation", ""]
    rows = _eval_rows(run_dir)
    if rows:
        out += [("Free-running beam search (no teacher forcing), scored with `capcli evaluate` against every "
                 "reference caption. BLEU, METEOR and ROUGE-L x100; CIDEr-D on its usual scale."), "",
                _md_table(["split", "beam", "images", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                           "CIDEr-D"], rows)]
    else:
        out += [("No evaluation was recorded with the run this model was exported from; score it with "
                 f"`capcli evaluate {where} --data DATASET_DIR --split test`.")]
    out += ["", "## How to use", "", "```bash", "pip install capcli", "```", "", "Python:", "", "```python",
            "from capcli import Captioner", "",
            f'captioner = Captioner.load("{where}")' + ("" if repo_id else '  # this folder, or "hf-hub:user/name"'),
            'print(captioner.caption(["photo.jpg"]))  # beam search, beam 3', "```", "", "Command line:", "",
            "```bash", f"capcli caption {where} photo.jpg", f"capcli caption {where} photos/ --beam 5 --output captions.csv",
            "```", "", "## Files", "",
            "- `model.safetensors`: the weights (safetensors; nothing pickled, nothing executed on load)",
            ("- `config.json`: the config that rebuilds the model, its preprocessing and decoding defaults "
             f"(format `{MODEL_FORMAT}` version {MODEL_FORMAT_VERSION})"),
            "- `vocab.json`: the vocabulary, index -> token", "- `README.md`: this card", ""]
    return "\n".join(out)
def rng_state() -> dict:
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),  # tuple of ints; weights_only-safe as a list
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
