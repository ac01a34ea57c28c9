"""The model card: the README.md of a model folder, which the Hugging Face Hub shows as the
model's page. YAML front matter for the Hub, then the model, its training data (from the dataset
dir's manifest.json when it still exists), its training config, its scores (the run's
eval-*/eval.json) and how to use it. :func:`eval_scores` and :func:`training_data` read those
facts; model folders keep them in config.json, so a folder or a Hub model still has them."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# the fields of an eval.json that say what was scored and how well (the model's facts)
SCORE_FIELDS = ("split", "beam_size", "images", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider",
                "sacrebleu", "top5", "loss", "block_ngrams", "allow_unk")


def eval_scores(run_dir: Path | None) -> list[dict]:
    """The scores of each eval-*/eval.json of a run (:data:`SCORE_FIELDS`), oldest name first;
    unreadable files are skipped."""
    if run_dir is None:
        return []
    out = []
    for path in sorted(Path(run_dir).glob("eval-*/eval.json")):
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(scores, dict):
            continue
        row = {k: scores[k] for k in SCORE_FIELDS if k in scores}
        row.setdefault("split", path.parent.name[len("eval-"):])
        out.append(row)
    return out


def score_rows(scores: list[dict]) -> list[list]:
    """Table rows of :func:`eval_scores`: BLEU, METEOR, ROUGE-L x100, CIDEr-D as is."""
    rows = []
    for s in scores:
        def pct(key, s=s):
            v = s.get(key)
            return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-"

        cider = s.get("cider")
        rows.append([s.get("split"), s.get("beam_size"), s.get("images"), pct("bleu1"), pct("bleu2"), pct("bleu3"),
                     pct("bleu4"), pct("meteor"), pct("rouge_l"),
                     f"{cider:.3f}" if isinstance(cider, (int, float)) else "-"])
    return rows


SCORE_HEADER = ["split", "beam", "images", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]


def training_data(data_dir: str | None) -> dict | None:
    """The facts of a dataset dir's manifest.json (source, image size, vocabulary, splits), or None
    where the manifest is not there (any more) or unreadable."""
    if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
        return None
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict):
        return None
    vocab = manifest.get("vocab") if isinstance(manifest.get("vocab"), dict) else {}
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    facts = {"dir": str(data_dir), "source": manifest.get("source"), "image_size": manifest.get("image_size"),
             "resize": manifest.get("resize"), "captions_per_image": manifest.get("captions_per_image"),
             "vocab_size": vocab.get("size"), "max_length": vocab.get("max_length"),
             "prepared_by": manifest.get("capcli_version"),
             "splits": {name: {"images": s.get("images"), "captions": s.get("captions")}
                        for name, s in splits.items() if isinstance(s, dict)}}
    return {k: v for k, v in facts.items() if v is not None}


def _data_section(data_dir: str | None, facts: dict | None) -> list[str]:
    lines = [f"Dataset dir at training time: `{data_dir}`." if data_dir else "The dataset dir is not recorded."]
    if not facts:
        lines.append("")
        lines.append("Its manifest was not available when this model was exported, so its facts are not recorded here.")
        return lines
    named = [("source", "source"), ("image size", "image_size"), ("resize", "resize"),
             ("captions per image", "captions_per_image"), ("vocabulary size", "vocab_size"),
             ("longest caption kept (words)", "max_length"), ("prepared by capcli", "prepared_by")]
    lines += ["", _md_table(["fact", "value"], [[label, facts[key]] for label, key in named if key in facts])]
    if facts.get("splits"):
        lines += ["", _md_table(["split", "images", "captions"],
                                [[name, s.get("images"), s.get("captions")] for name, s in facts["splits"].items()])]
    return lines


def model_card(meta: dict, vocab: list[str], files: dict[str, str], repo_id: str | None = None) -> str:
    """The README.md of a model folder whose ``config.json`` is ``meta`` (see
    :func:`capcli.store.folder.model_folder_config`: its ``training_data`` and ``scores`` are the
    card's data and evaluation sections); ``files`` names the folder's files, each with a line on
    what it holds."""
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
    data_dir = (cfg.get("data") or {}).get("dir") or (meta.get("data") or {}).get("dir")
    out += _data_section(data_dir, meta.get("training_data"))
    out += ["", "## Training", "",
            (f"Objective `{train_cfg.get('objective', 'xe')}`, {train_cfg.get('epochs', '?')} "
             f"epoch{'' if train_cfg.get('epochs') == 1 else 's'}, "
             f"batch {train_cfg.get('batch_size', '?')} caption-image pairs, learning rate {train_cfg.get('lr', '?')} "
             f"(encoder {train_cfg.get('encoder_lr', '?')}). The full resolved config:"), "",
            "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "", "## Evaluation", ""]
    rows = score_rows(meta.get("scores") or [])
    if rows:
        out += [("Free-running beam search (no teacher forcing), scored with `capcli evaluate` against every "
                 "reference caption. BLEU, METEOR and ROUGE-L x100; CIDEr-D on its usual scale."), "",
                _md_table(SCORE_HEADER, rows)]
    else:
        out += [("No evaluation was recorded with the run this model was exported from; score it with "
                 f"`capcli evaluate {where} --data DATASET_DIR --split test`.")]
    out += ["", "## How to use", "", "```bash", "pip install capcli", "```", "", "Python:", "", "```python",
            "from capcli import Captioner", "",
            f'captioner = Captioner.load("{where}")' + ("" if repo_id else '  # this folder, or "hf-hub:user/name"'),
            'print(captioner.caption(["photo.jpg"]))  # beam search, beam 3', "```", "", "Command line:", "",
            "```bash", f"capcli caption {where} photo.jpg", f"capcli caption {where} photos/ --beam 5 --output captions.csv",
            "```", ""]
    if meta.get("onnx"):
        out += _onnx_section(meta, where)
    out += ["## Files", "", *(f"- `{name}`: {what}" for name, what in files.items()), ""]
    return "\n".join(out)


def _onnx_section(meta: dict, where: str) -> list[str]:
    onnx, prep = meta["onnx"], meta["preprocessing"]
    rows = []
    for name, g in (onnx.get("graphs") or {}).items():
        def sig(args):
            return ", ".join(f"{a['name']} {a['dtype']} {tuple(a['shape'])}" for a in args)
        rows.append([f"`{g['file']}`", sig(g["inputs"]), sig(g["outputs"])])
    size = prep.get("image_size")
    return [
        "## Run it with onnxruntime", "",
        (f"The folder also holds the model as ONNX graphs (opset {onnx.get('opset')}), for serving without PyTorch. "
         f"Resize an RGB image to {size} x {size} ({prep.get('resize')}) as uint8 (3, {size}, {size}); the "
         "encoder does the rest. Then run `decoder_init` once and `decoder_step` once per word, feeding back "
         "the chosen word, h and c; stop at `<end>`. `decoder_step` takes k consecutive rows of tokens, h and c "
         "per image (the beams of a beam search), and one row of features and proj per image."), "",
        _md_table(["graph", "inputs", "outputs"], rows), "",
        "capcli drives them with its own beam search:", "", "```bash", 'pip install "capcli[onnx]"',
        f"capcli caption {where} photo.jpg --backend onnxruntime"
        + ("   # --int8 for the quantised decoder" if onnx.get("int8") else ""), "```", "",
        ("`examples/onnx_caption.py` in the capcli repository is a greedy decoder in NumPy and onnxruntime "
         "alone (no PyTorch, no capcli), and shows how another runtime drives the graphs."), ""]
