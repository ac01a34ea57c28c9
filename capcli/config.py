"""Typed configuration: a dataclass tree, loaded from YAML, with ``key=value`` overrides.

Every key is documented where it is defined. Unknown keys and values of the wrong type are
errors with a "did you mean" hint, never silently new keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capcli.errors import UserError
from capcli.runtime import check_amp

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dir: str = "data/synthetic"  # dataset dir written by `capcli prepare`
    num_workers: Any = "auto"  # DataLoader worker processes: auto (what this process's CPUs allow) | N
    train_split: str = "train"
    val_split: str = "val"
    val_max_images: int = 0  # validate on the first N val images only (0 = all): cheaper validation


@dataclass
class ModelConfig:
    encoder: str = "convnext_small"  # any timm model name; ConvNeXt v1/v2 are the paper's
    pretrained: Any = True  # true (hub weights) | false (random init) | path to a weights file
    finetune: bool = True  # false: frozen encoder
    finetune_stages: int = 0  # with finetune, train only the last N encoder stages (0 = all)
    grid: int = 7  # convnet features are pooled to grid x grid regions (7x7 = 49, as the paper; 0 = as they come)
    feature_norm: bool = True  # LayerNorm over region features (raw ConvNeXt features are unnormalised)
    image_size: Any = None  # resize images to this size for the encoder (null = dataset size)
    emb_dim: int = 512  # word embedding size
    att_dim: int = 512  # attention MLP size
    dec_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5  # dropout before the vocabulary projection
    channels_last: Any = "auto"  # encoder in channels_last memory: auto (convnets) | true | false


@dataclass
class TrainConfig:
    epochs: int = 20
    max_minutes: float = 0.0  # wall-clock budget; stop cleanly (with checkpoints) past it (0 = none)
    batch_size: int = 32  # caption-image pairs per step (images per step = batch_size // captions per image)
    lr: float = 4e-4  # decoder learning rate (Adam)
    encoder_lr: float = 1e-4  # encoder learning rate when finetuning
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # clip gradients by value at +-grad_clip, as Show-Attend-Tell (0 = off)
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regularisation
    objective: str = "xe"  # xe: cross-entropy + doubly stochastic attention | scst: self-critical, reward CIDEr-D
    init_from: Any = None  # a run dir or checkpoint whose weights start this run (fresh optimizer): xe, then scst
    scst_samples: int = 5  # scst: captions sampled per image
    scst_baseline: str = "mean"  # scst: mean (of the image's other samples, Luo 2020) | greedy (its greedy caption's reward)
    # cross-entropy, then self-critical training in the same run and budget: 0 (never) | N (after N
    # epochs) | "P%" (after P% of train.max_minutes) | auto (when val CIDEr-D stops improving, or at
    # train.scst_auto_share of the budget, whichever comes first)
    scst_after: Any = 0
    scst_lr: float = 1e-4  # scst_after: the decoder's learning rate once self-critical (a fresh Adam)
    scst_warmup_steps: int = 100  # scst_after: linear warm-up of scst_lr over the first N self-critical steps
    scst_auto_share: float = 0.6  # scst_after=auto: switch at this share of max_minutes at the latest
    scst_max_length: int = 16  # scst: longest sampled caption in words (0 = train.max_length)
    scst_temperature: float = 0.3  # scst: sample from softmax(logits / T); below 1 the samples stay near the mode (1, the classic one, dips first after a short cross-entropy run)
    scst_top_k: int = 0  # scst: sample among the k likeliest words only (0 = all)
    scst_val_every: Any = None  # validate self-critical training (its stage of scst_after too) this often (null = train.val_every)
    # teacher forcing: the share of steps that read the ground-truth word (else the model's own argmax)
    teacher_forcing: Any = True  # true (1) | false (0) | a ratio in [0, 1] | scheduled (= tf_schedule linear)
    tf_schedule: str = "constant"  # constant (teacher_forcing) | linear | inverse_sigmoid: tf_start -> tf_end, per step
    tf_start: float = 1.0  # scheduled: the ratio at the first step
    tf_end: float = 0.0  # scheduled: the ratio reached at the last step (linear) or approached (inverse_sigmoid)
    tf_k: float = 0.0  # inverse_sigmoid steepness k of Bengio et al. 2015, k/(k+exp(step/k)); 0 = midway at mid-run
    # none | plateau (x lr_factor after lr_patience validations without a better score) | cosine | linear
    # (cosine and linear decay over the run: its steps, or with max_minutes its time if that ends first)
    lr_schedule: str = "none"
    lr_factor: float = 0.8  # plateau: multiply the rates by this ...
    lr_patience: int = 8  # ... after this many validations in a row without a better best_metric
    warmup_steps: int = 0  # linear learning-rate warm-up over the first N steps (any schedule)
    min_lr_ratio: float = 0.0  # cosine: the rate decays to this fraction of the initial one
    finetune_after: int = 0  # epochs on a frozen encoder (on the feature cache) before fine-tuning it (0 = from the start)
    amp: Any = "auto"  # mixed precision: auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    best_metric: str = "auto"  # bleu4 | cider: picks best.pt, early stopping and plateau (auto: bleu4 for xe, cider with scst)
    patience: int = 0  # early stopping: validations without a better best_metric (0 = never stop early)
    cache_features: bool = True  # frozen encoder: encode each image once into DATA/features/, train on the cache
    val_every: Any = 1  # validate every N epochs (an int) or every N steps ("500 steps"); and at the end
    val_beam: int = 1  # beam size of the free-running validation decode (1 = greedy)
    max_length: int = 0  # longest decoded caption (0 = the dataset's max length)
    log_every: int = 10  # steps between progress updates
    max_bad_steps: int = 20  # steps in a row with a NaN/inf loss (each skipped) before the run stops


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard/


@dataclass
class RunConfig:
    name: str = "run"  # runs go to run.dir/run.name
    dir: str = "runs"
    overwrite: bool = False  # reuse an existing run dir instead of numbering a new one


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(key: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, options, n=1)
    if close:
        return f" Did you mean {prefix + close[0]!r}?"
    return f" Known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(options)}."


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is Any:
        if isinstance(value, str):
            return _parse_scalar(value)
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config key {key}: expected {typ.__name__}, got {value!r}")


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML reads it: 4e-4 -> float, true -> bool, null -> None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and value.strip() != text.strip():
        return text
    # YAML 1.1 reads 4e-4 as a string; accept it as a number
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {full!r}.{_suggest(key, names, prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {full!r} is a section; set its keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_overrides(overrides: list[str]) -> dict:
    """['train.lr=1e-3', 'model.encoder=convnext_tiny'] -> nested dict."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. train.lr=4e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = raw
    return nested


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``tiny``, ``convnext_small``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if shipped.is_file() and len(p.parts) == 1:
        return shipped
    names = sorted(c.stem for c in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config file {path} not found; give a YAML path or a shipped config: {', '.join(names)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping of sections (data:, model:, train:, run:)")
        _apply(cfg, data)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


TF_SCHEDULES = ("constant", "linear", "inverse_sigmoid")
LR_SCHEDULES = ("none", "plateau", "cosine", "linear")
OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")
BEST_METRICS = ("auto", "bleu4", "cider")


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{key} must be one of {', '.join(options)}, got {value!r}.{hint}")


def _fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UserError(f"{key} must be a number in [0, 1], got {value!r}")


def parse_val_every(value: Any, key: str = "train.val_every") -> tuple[int, str]:
    """``train.val_every`` -> (N, "epochs" | "steps"): 2 -> (2, "epochs"), "500 steps" -> (500, "steps")."""
    if isinstance(value, int) and not isinstance(value, bool):
        n, unit = value, "epochs"
    else:
        parts = str(value).replace("_", " ").split()
        units = {"epoch": "epochs", "epochs": "epochs", "step": "steps", "steps": "steps"}
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in units:
            n, unit = int(parts[0]), units[parts[1]]
        else:
            raise UserError(f"{key} must be a number of epochs (2) or steps (\"500 steps\"), got {value!r}")
    if n < 1:
        raise UserError(f"{key} must be at least 1, got {value!r}")
    return n, unit


def parse_scst_after(value: Any) -> tuple[str, float]:
    """``train.scst_after`` -> (kind, value): 0 -> ("never", 0), 3 -> ("epochs", 3), "60%" ->
    ("share", 0.6), "auto" -> ("auto", 0)."""
    if isinstance(value, bool):
        raise UserError(f"train.scst_after must be 0, a number of epochs, a share of the budget (\"60%\") or auto, "
                        f"got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UserError(f"train.scst_after must be 0 or more epochs, got {value}")
        return ("never", 0.0) if value == 0 else ("epochs", float(value))
    text = str(value).strip()
    if text == "auto":
        return "auto", 0.0
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if 0.0 < share < 1.0:
            return "share", share
    raise UserError(f"train.scst_after must be 0 (never), N epochs, a share of train.max_minutes between 0% and "
                    f"100% (\"60%\") or auto, got {value!r}")


def validate(cfg: Config) -> None:
    """Check values that types alone cannot: ranges, choices and combinations. One-line errors."""
    t, m = cfg.train, cfg.model
    tf = t.teacher_forcing
    if isinstance(tf, str):
        if tf != "scheduled":
            raise UserError(f"train.teacher_forcing must be true, false, a ratio in [0, 1] or scheduled, got {tf!r}")
    elif not isinstance(tf, bool):
        _fraction("train.teacher_forcing (true, false, scheduled or a ratio)", tf)
    _one_of("train.tf_schedule", t.tf_schedule, TF_SCHEDULES)
    if t.tf_schedule != "constant" and tf is not True and tf != "scheduled":
        raise UserError(f"train.tf_schedule={t.tf_schedule} moves the ratio from train.tf_start to train.tf_end; "
                        f"leave train.teacher_forcing at true (or scheduled), not {tf!r}")
    _fraction("train.tf_start", t.tf_start)
    _fraction("train.tf_end", t.tf_end)
    if t.tf_k < 0 or (0 < t.tf_k < 1):
        raise UserError(f"train.tf_k must be 0 (auto) or at least 1, got {t.tf_k!r}")
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("train.objective", t.objective, OBJECTIVES)
    _one_of("train.best_metric", t.best_metric, BEST_METRICS)
    _one_of("train.scst_baseline", t.scst_baseline, SCST_BASELINES)
    if t.scst_samples < 1 or (t.scst_baseline == "mean" and t.scst_samples < 2):
        raise UserError(f"train.scst_samples must be at least {2 if t.scst_baseline == 'mean' else 1} "
                        f"(the mean baseline averages the other samples of an image), got {t.scst_samples}")
    kind, after = parse_scst_after(t.scst_after)
    if kind != "never":
        if t.objective != "xe":
            raise UserError(f"train.scst_after switches from cross-entropy to self-critical training; it needs "
                            f"train.objective=xe (now {t.objective}), or set train.scst_after=0")
        if kind == "epochs" and after >= t.epochs:
            raise UserError(f"train.scst_after={t.scst_after} leaves no self-critical epoch within "
                            f"train.epochs={t.epochs}; lower it or raise train.epochs")
        if kind == "share" and not t.max_minutes:
            raise UserError(f"train.scst_after={t.scst_after} is a share of the time budget; set train.max_minutes "
                            "(or give a number of epochs)")
    if not t.scst_temperature > 0:
        raise UserError(f"train.scst_temperature must be positive, got {t.scst_temperature!r}")
    if t.scst_lr <= 0:
        raise UserError(f"train.scst_lr must be positive, got {t.scst_lr!r}")
    if not 0.0 < t.scst_auto_share < 1.0:
        raise UserError(f"train.scst_auto_share must be between 0 and 1, got {t.scst_auto_share!r}")
    if t.init_from is not None and not isinstance(t.init_from, str):
        raise UserError(f"train.init_from must be a run dir or checkpoint path, got {t.init_from!r}")
    for key in ("lr", "encoder_lr"):
        if getattr(t, key) <= 0:
            raise UserError(f"train.{key} must be positive, got {getattr(t, key)!r}")
    if not 0.0 < t.lr_factor <= 1.0:
        raise UserError(f"train.lr_factor must be in (0, 1], got {t.lr_factor!r}")
    _fraction("train.min_lr_ratio", t.min_lr_ratio)
    for key in ("lr_patience", "warmup_steps", "scst_warmup_steps", "scst_max_length", "scst_top_k", "finetune_after", "patience", "max_length", "weight_decay",
                "grad_clip", "alpha_c", "max_minutes"):
        if getattr(t, key) < 0:
            raise UserError(f"train.{key} must be 0 or more, got {getattr(t, key)!r}")
    if t.lr_patience < 1:
        raise UserError(f"train.lr_patience must be at least 1, got {t.lr_patience!r}")
    if t.max_bad_steps < 1:
        raise UserError(f"train.max_bad_steps must be at least 1, got {t.max_bad_steps!r}")
    if t.log_every < 1:
        raise UserError(f"train.log_every must be at least 1, got {t.log_every!r}")
    if t.val_beam < 1:
        raise UserError(f"train.val_beam must be at least 1, got {t.val_beam!r}")
    parse_val_every(t.val_every)
    if t.scst_val_every is not None:
        parse_val_every(t.scst_val_every, "train.scst_val_every")
    if t.finetune_after and not m.finetune:
        raise UserError("train.finetune_after fine-tunes the encoder after N frozen epochs; it needs "
                        "model.finetune=true (or set train.finetune_after=0)")
    if t.finetune_after >= t.epochs and t.finetune_after:
        raise UserError(f"train.finetune_after={t.finetune_after} leaves no fine-tuning epoch within "
                        f"train.epochs={t.epochs}; lower it or raise train.epochs")
    check_amp(cfg.train.amp, "train.amp")
    if cfg.train.batch_size < 1:
        raise UserError("train.batch_size must be at least 1")
    if cfg.train.epochs < 1:
        raise UserError("train.epochs must be at least 1")
    nw = cfg.data.num_workers
    if nw != "auto" and (isinstance(nw, bool) or not isinstance(nw, int) or nw < 0):
        raise UserError(f"data.num_workers must be auto or a number >= 0, got {nw!r}")
    if cfg.data.val_max_images < 0:
        raise UserError(f"data.val_max_images must be 0 (all) or more, got {cfg.data.val_max_images!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError("model.dropout must be in [0, 1)")
    if m.channels_last not in ("auto", True, False):
        raise UserError(f"model.channels_last must be auto, true or false, got {m.channels_last!r}")
    if m.image_size is not None and (isinstance(m.image_size, bool) or not isinstance(m.image_size, int)
                                     or m.image_size < 16):
        raise UserError(f"model.image_size must be an integer >= 16 or null, got {m.image_size!r}")
    if not isinstance(m.pretrained, (bool, str)):
        raise UserError(f"model.pretrained must be true, false or a path, got {m.pretrained!r}")
    if m.grid < 0:
        raise UserError(f"model.grid must be 0 (no pooling) or more, got {m.grid!r}")
    for key in ("emb_dim", "att_dim", "dec_dim"):
        if getattr(m, key) < 1:
            raise UserError(f"model.{key} must be at least 1, got {getattr(m, key)!r}")
    _check_run_dir(cfg.run)


def _check_run_dir(run: RunConfig) -> None:
    """run.dir/run.name must be a folder that can be made: not a file, not under one."""
    target = Path(run.dir).expanduser()
    for path in (target / run.name, target, *target.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"run.dir={run.dir}: {path} is a file, not a folder; choose another run.dir "
                                "(or run.name)")
            break


def best_metric(cfg: Config) -> str:
    """The score that picks best.pt: ``train.best_metric``, or the objective's own (auto)."""
    if cfg.train.best_metric != "auto":
        return cfg.train.best_metric
    scst = cfg.train.objective == "scst" or parse_scst_after(cfg.train.scst_after)[0] != "never"
    return "cider" if scst else "bleu4"


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
