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

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dir: str = "data/synthetic"  # dataset dir written by `capcli prepare`
    num_workers: int = 0  # DataLoader worker processes (HDF5 is opened lazily in each)
    train_split: str = "train"
    val_split: str = "val"
    val_max_images: int = 0  # validate on the first N val images only (0 = all)


@dataclass
class ModelConfig:
    encoder: str = "convnext_small"  # any timm model name; ConvNeXt v1/v2 are the paper's
    pretrained: Any = True  # true (hub weights) | false (random init) | path to a weights file
    finetune: bool = True  # false: frozen encoder
    finetune_stages: int = 0  # with finetune, train only the last N encoder stages (0 = all)
    grid: int = 7  # encoder features are pooled to grid x grid regions (7x7 = 49, as the paper)
    feature_norm: bool = True  # LayerNorm over region features (raw ConvNeXt features are unnormalised)
    image_size: Any = None  # resize images to this size for the encoder (null = dataset size)
    emb_dim: int = 512  # word embedding size
    att_dim: int = 512  # attention MLP size
    dec_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5  # dropout before the vocabulary projection


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
    teacher_forcing: Any = True  # true | false | scheduled (ratio from tf_start to tf_end over the epochs)
    tf_start: float = 1.0  # scheduled teacher forcing: ratio of ground-truth inputs at the first epoch
    tf_end: float = 0.0  # ... and at the last epoch
    amp: Any = "auto"  # mixed precision: auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    patience: int = 0  # early stopping: epochs without a better val BLEU-4 (0 = never stop early)
    cache_features: bool = True  # frozen encoder: encode each image once into DATA/features/, train on the cache
    val_beam: int = 1  # beam size of the free-running validation decode (1 = greedy)
    max_length: int = 0  # longest decoded caption (0 = the dataset's max length)
    log_every: int = 10  # steps between progress updates


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


def validate(cfg: Config) -> None:
    tf = cfg.train.teacher_forcing
    if isinstance(tf, str) and tf not in ("scheduled",):
        raise UserError(f"train.teacher_forcing must be true, false or scheduled, got {tf!r}")
    if not isinstance(tf, (bool, str)):
        raise UserError(f"train.teacher_forcing must be true, false or scheduled, got {tf!r}")
    if cfg.train.amp not in ("auto", "off", "bf16", "fp16", False, True):
        raise UserError(f"train.amp must be auto, off, bf16 or fp16, got {cfg.train.amp!r}")
    if cfg.train.batch_size < 1:
        raise UserError("train.batch_size must be at least 1")
    if cfg.train.epochs < 1:
        raise UserError("train.epochs must be at least 1")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise UserError("model.dropout must be in [0, 1)")
    if cfg.model.image_size is not None and not isinstance(cfg.model.image_size, int):
        raise UserError(f"model.image_size must be an integer or null, got {cfg.model.image_size!r}")
    if not isinstance(cfg.model.pretrained, (bool, str)):
        raise UserError(f"model.pretrained must be true, false or a path, got {cfg.model.pretrained!r}")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
