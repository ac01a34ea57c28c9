import pytest

from capcli.config import CONFIG_DIR, Config, load_config, parse_overrides
from capcli.errors import UserError


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    import timm

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert timm.is_model(cfg.model.encoder)


def test_paper_setup_values():
    cfg = load_config("convnext_small")
    m, t = cfg.model, cfg.train
    assert (m.emb_dim, m.att_dim, m.dec_dim, m.dropout) == (512, 512, 512, 0.5)
    assert (t.lr, t.encoder_lr, t.grad_clip, t.alpha_c, t.batch_size) == (4e-4, 1e-4, 5.0, 1.0, 32)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.lr=4e-4", "train.epochs=3", "model.finetune=false",
                               "model.encoder=convnext_tiny", "train.teacher_forcing=scheduled",
                               "model.pretrained=/tmp/w.safetensors", "model.image_size=128"])
    assert cfg.train.lr == 4e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.model.finetune is False
    assert cfg.model.encoder == "convnext_tiny"
    assert cfg.train.teacher_forcing == "scheduled"
    assert cfg.model.pretrained == "/tmp/w.safetensors"
    assert cfg.model.image_size == 128
    assert load_config("tiny", ["train.teacher_forcing=false"]).train.teacher_forcing is False


def test_unknown_key_suggests():
    with pytest.raises(UserError, match="Did you mean 'train.lr'"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(UserError, match="unknown config key 'modle'"):
        load_config("tiny", ["modle.encoder=x"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "expected int"),
    ("train.teacher_forcing=sometimes", "teacher_forcing"),
    ("train.amp=fp8", "train.amp"),
    ("model.finetune=maybe", "expected bool"),
    ("train", "not key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny", [override])


def test_missing_config_file_lists_shipped(tmp_path):
    with pytest.raises(UserError, match="tiny"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "seed=3"]) == {"a": {"b": "1", "c": "x"}, "seed": "3"}
