"""Every shipped config (capcli/configs/*.yaml) loads, says how to run it, and builds a captioner whose
attention runs over the regions expected of its encoder: P regions of C features at the image size
the config trains at.

Big encoders are built and run on the meta device (shapes only, no memory, no arithmetic), so the
whole file takes seconds; the small ones (convnext_atto) run for real on the CPU.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import timm
import torch

from capcli.config import CONFIG_DIR, load_config, resolve_config_path
from capcli.models.captioner import CaptionModel

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))

# timm name -> (kind, feature dim C, stride of the last feature map (conv) or patch size (tokens));
# a config with an encoder missing here fails test_encoder_is_known: add the encoder's row
ENCODERS: dict[str, tuple[str, int, int]] = {
    "convnext_atto": ("conv", 320, 32),
    "convnext_tiny": ("conv", 768, 32),
    "convnext_small": ("conv", 768, 32),
    "convnext_base": ("conv", 1024, 32),
    "convnext_large": ("conv", 1536, 32),
    "convnextv2_tiny": ("conv", 768, 32),
    "convnextv2_base": ("conv", 1024, 32),
    "resnet101": ("conv", 2048, 32),
    "resnet152": ("conv", 2048, 32),
    "resnext101_32x8d": ("conv", 2048, 32),
    "vgg16": ("conv", 512, 32),
    "mobilenetv3_large_100": ("conv", 960, 32),
    "tf_efficientnet_lite0": ("conv", 1280, 32),
    "vit_base_patch16_224": ("tokens", 768, 16),
    "deit_base_patch16_224": ("tokens", 768, 16),
}

# built and run for real on the CPU; everything else on the meta device
REAL = {"convnext_atto", "tf_efficientnet_lite0"}

# the side `capcli prepare SOURCE` stores images at when --size is not given
PREPARE_DEFAULT_SIZE = {"synthetic": 96}
DATASET_DEFAULT_SIZE = 256


BATCH, CAPTIONS, STEPS, VOCAB = 2, 2, 3, 11


def header(path: Path) -> list[str]:
    """The comment lines at the top of a config file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def stored_size(path: Path) -> int:
    """The image side of the dataset the header's `capcli prepare` command writes (256 by default)."""
    for line in header(path):
        m = re.search(r"capcli prepare (\w+)", line)
        if m:
            size = re.search(r"--size[ =](\d+)", line)
            return int(size.group(1)) if size else PREPARE_DEFAULT_SIZE.get(m.group(1), DATASET_DEFAULT_SIZE)
    return DATASET_DEFAULT_SIZE


def expected_regions(encoder: str, grid: int, size: int) -> tuple[int, int]:
    """(P, C) for an encoder at a square input side ``size``."""
    kind, channels, stride = ENCODERS[encoder]
    if kind == "tokens":
        return (size // stride) ** 2, channels
    side = math.ceil(size / stride)
    return (grid * grid if grid else side * side), channels


@functools.cache
def run_once(path: Path) -> dict:
    """Build a shipped config's captioner (on the meta device unless small), run it once forward and
    backward on a dummy batch at the config's image size, and keep what the tests check."""
    cfg = load_config(path.stem)
    size = cfg.model.image_size or stored_size(path)
    real = cfg.model.encoder in REAL
    torch.manual_seed(0)
    with torch.device("cpu" if real else "meta"):
        model = CaptionModel(cfg.model, VOCAB, pretrained=False)
        images = torch.zeros(BATCH, 3, size, size, dtype=torch.uint8)
        captions = torch.ones(BATCH, CAPTIONS, STEPS + 1, dtype=torch.long)
        logits, alphas = model(images, captions)
        (logits.float().sum() + alphas.float().sum()).backward()
    return {
        "cfg": cfg, "size": size, "real": real,
        "out_dim": model.encoder.out_dim, "enc_dim": model.decoder.enc_dim,
        "logits": tuple(logits.shape), "alphas": tuple(alphas.shape),
        "finite": bool(torch.isfinite(logits).all()) if real else None,
        "alpha_sums": alphas.detach().sum(-1) if real else None,
        "no_grad": [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None],
    }


def test_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"tiny", "convnext_small", "convnext_tiny", "convnext_base", "convnext_large",
            "convnextv2_tiny"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_resolves_by_name(path):
    assert resolve_config_path(path.stem) == path
    cfg = load_config(path.stem)
    assert timm.is_model(cfg.model.encoder), cfg.model.encoder
    # run dirs are named after the config (tiny, convnext_small) or its encoder
    assert cfg.run.name in (path.stem, cfg.model.encoder)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_encoder_is_known(path):
    encoder = load_config(path.stem).model.encoder
    assert encoder in ENCODERS, f"{path.name}: add {encoder!r} (kind, C, stride) to ENCODERS in {__file__}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_header_shows_how_to_run_it(path):
    lines = header(path)
    train = [line for line in lines if line.startswith("capcli train ")]
    assert train, f"{path.name}: the header comment shows no `capcli train` command"
    assert train[0].split()[2] == path.stem, f"{path.name}: `{train[0]}` does not train this config"
    prepare = [line for line in lines if line.startswith("capcli prepare ")]
    cfg = load_config(path.stem, [t for t in train[0].split()[3:] if "=" in t and not t.startswith("-")])
    if prepare:  # the train command reads the dataset the prepare command writes
        out = re.search(r"--out[ =](\S+)", prepare[0])
        assert out and cfg.data.dir == out.group(1), f"{path.name}: data.dir is not the prepared --out"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_attention_grid(path):
    r = run_once(path)
    cfg = r["cfg"]
    P, C = expected_regions(cfg.model.encoder, cfg.model.grid, r["size"])
    assert r["out_dim"] == C and r["enc_dim"] == C
    # one attention weight per region at each decoding step
    assert r["alphas"] == (BATCH * CAPTIONS, STEPS, P), f"{cfg.model.encoder} at {r['size']} px"
    assert r["logits"] == (BATCH * CAPTIONS, STEPS, VOCAB)
    if r["real"]:
        assert r["finite"]
        torch.testing.assert_close(r["alpha_sums"], torch.ones(BATCH * CAPTIONS, STEPS))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_trainable_parameter_gets_a_gradient(path):
    """A fine-tuned encoder trains only what forward_features uses: parameters marked trainable but
    never reached make DistributedDataParallel fail and bloat the optimizer."""
    r = run_once(path)
    assert not r["no_grad"], f"{len(r['no_grad'])} trainable parameters get no gradient, e.g. {r['no_grad'][:3]}"
