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


@pytest.mark.parametrize("finetune", [False, True])
def test_cpu_inference_in_chunks_gives_the_whole_batchs_features(finetune):
    """Without gradients a CPU encodes CPU_CHUNK images per backbone call: the same features as one
    call over the batch, whatever the remainder; with gradients (fine-tuning) one call."""
    torch.manual_seed(0)
    enc = Encoder("convnext_atto", pretrained=False, grid=2, finetune=finetune).eval()
    images = torch.randint(0, 256, (2 * Encoder.CPU_CHUNK + 1, 3, 32, 32), dtype=torch.uint8)
    calls = []
    hook = enc.backbone.stem.register_forward_hook(lambda m, i, o: calls.append(i[0].size(0)))
    with torch.no_grad():
        chunked = enc(images)
    with torch.no_grad():
        enc.CPU_CHUNK = len(images)
        whole = enc(images)
    hook.remove()
    assert calls == [Encoder.CPU_CHUNK, Encoder.CPU_CHUNK, 1, len(images)]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    if finetune:  # with gradients: one call, and the backbone gets its gradient
        calls.clear()
        enc.train()
        enc(images).sum().backward()
        assert any(p.grad is not None for p in enc.backbone.parameters())
