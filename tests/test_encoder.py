"""The timm encoder wrapper: shapes, preprocessing from the pretrained config, local weights,
freezing and partial fine-tuning."""

import pytest
import timm
import torch

from capcli.errors import UserError
from capcli.models.encoder import Encoder


def test_region_grid_and_shapes():
    enc = Encoder("convnext_atto", pretrained=False, grid=7)
    out = enc(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, 49, enc.out_dim) and enc.out_dim == 320
    assert Encoder("convnext_atto", grid=3)(torch.zeros(1, 3, 96, 96, dtype=torch.uint8)).shape == (1, 9, 320)


def test_normalisation_comes_from_the_models_pretrained_config():
    conv = Encoder("convnext_atto")
    vit = Encoder("vit_tiny_patch16_224.augreg_in21k")
    assert conv.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert vit.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])  # this tag's own statistics
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    x = vit.normalize(white)
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    # uint8 and the same image as [0, 1] floats are the same input
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(conv.normalize(img), conv.normalize(img.float() / 255))


def test_local_weights_file(tmp_path):
    torch.manual_seed(3)
    src = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "atto.pth"
    torch.save(src.state_dict(), path)
    enc = Encoder("convnext_atto", pretrained=str(path))
    for name, p in enc.backbone.state_dict().items():
        torch.testing.assert_close(p, src.state_dict()[name], msg=name)
    with pytest.raises(UserError, match="does not exist"):
        Encoder("convnext_atto", pretrained=str(tmp_path / "missing.pth"))


def test_unknown_name_suggests_close_models():
    with pytest.raises(UserError, match="convnext_atto"):
        Encoder("convnext_atomic")


def test_freeze_and_last_stages():
    frozen = Encoder("convnext_atto", finetune=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    frozen.train()
    assert not frozen.backbone.training  # frozen backbones stay in eval mode
    last = Encoder("convnext_atto", finetune=True, finetune_stages=1)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in last.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"stages.3"}
    full = Encoder("convnext_atto", finetune=True)
    names = [n for n, p in full.backbone.named_parameters() if p.requires_grad]
    assert any(n.startswith("stem") for n in names) and not any(n.startswith("head") for n in names)


def test_frozen_encoder_gives_no_backbone_gradient():
    enc = Encoder("convnext_atto", finetune=False)
    out = enc(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    out.sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.feature_norm.weight.grad is not None
