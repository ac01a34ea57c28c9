"""The timm encoder wrapper: shapes, preprocessing from the pretrained config, local weights,
freezing and partial fine-tuning."""

import pytest
import timm
import torch

from capcli.errors import UserError
from capcli.models.encoder import Encoder
from capcli.models.fast.chunks import CPU_CHUNK, ChunkSizer


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
    """Without gradients a CPU encodes CPU_CHUNK images per backbone call (tiny images: far under
    the byte budget): the same features as one call over the batch, whatever the remainder; with
    gradients (fine-tuning) one call."""
    torch.manual_seed(0)
    enc = Encoder("convnext_atto", pretrained=False, grid=2, finetune=finetune).eval()
    images = torch.randint(0, 256, (2 * CPU_CHUNK + 1, 3, 32, 32), dtype=torch.uint8)
    calls = []
    hook = enc.backbone.stem.register_forward_hook(lambda m, i, o: calls.append(i[0].size(0)))
    with torch.no_grad():
        chunked = enc(images)
    with torch.no_grad():
        enc._chunks = ChunkSizer(most=len(images))
        whole = enc(images)
    # each setting first runs one image to size its chunks (ChunkSizer), then the chunks
    assert calls == [1, CPU_CHUNK, CPU_CHUNK, 1, 1, len(images)]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    if finetune:  # with gradients: one call, and the backbone gets its gradient
        calls.clear()
        enc.train()
        enc(images).sum().backward()
        assert any(p.grad is not None for p in enc.backbone.parameters())
        with torch.no_grad():  # train mode (batch statistics, drop-path) never splits the batch
            enc(images)
        assert calls == [len(images), len(images)]
    hook.remove()


def test_cpu_chunks_keep_the_largest_activation_under_the_byte_budget():
    """The chunk holds as many images as keep its largest activation (any module's output) under
    CPU_CHUNK_BYTES, at most CPU_CHUNK, at least one; found once per input shape."""
    torch.manual_seed(0)
    enc = Encoder("convnext_atto", pretrained=False, grid=2, finetune=False).eval()
    x = torch.randn(20, 3, 64, 64)
    # convnext_atto at 64 px: its largest output per image is the first stage's MLP, 160 x 16 x 16 floats
    per_image = 160 * 16 * 16 * 4
    assert ChunkSizer(max_bytes=3 * per_image + 100)(enc.backbone, x) == 3
    assert ChunkSizer(max_bytes=per_image - 1)(enc.backbone, x) == 1
    assert ChunkSizer(max_bytes=100 * per_image)(enc.backbone, x) == CPU_CHUNK
    calls = []
    hook = enc.backbone.stem.register_forward_hook(lambda m, i, o: calls.append(i[0].size(0)))
    enc._chunks = ChunkSizer(max_bytes=3 * per_image + 100)
    with torch.no_grad():
        enc.regions(x)
        enc.regions(x)  # the chunk size is remembered: no second probe
    hook.remove()
    assert calls == [1] + [3] * 6 + [2] + [3] * 6 + [2]  # one probe, then the chunks, twice
    assert not any(m._forward_hooks for m in enc.backbone.modules())  # the probe's hooks are gone


def test_depthwise_convolutions_give_torchs_gradients():
    """The depthwise convolutions (switched to DepthwiseConv2d, with a hand-written weight gradient
    on maps no larger than the kernel) give the gradients of torch's own convolution."""
    from torch import nn

    from capcli.models.fast.depthwise import DepthwiseConv2d

    torch.manual_seed(0)
    enc = Encoder("convnext_atto", pretrained=False, grid=1, finetune=True)
    dw = [m for m in enc.backbone.modules() if isinstance(m, DepthwiseConv2d)]
    assert len(dw) == 2 + 2 + 6 + 2  # every block's conv_dw
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # the last stages' maps: 4x4, 2x2
    enc(images).square().sum().backward()
    fast = {n: p.grad.clone() for n, p in enc.backbone.named_parameters() if p.grad is not None}
    for m in dw:
        m.__class__ = nn.Conv2d
    enc.backbone.zero_grad()
    enc(images).square().sum().backward()
    ref = {n: p.grad for n, p in enc.backbone.named_parameters() if p.grad is not None}
    assert fast.keys() == ref.keys() and any("conv_dw" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("shape", [(3, 24, 7, 5), (2, 8, 4, 3), (2, 8, 12, 12)])  # shifted, shifted, torch's
@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_backward_equals_torchs_in_double_precision(shape, channels_last):
    import torch.nn.functional as F

    from capcli.models.fast.depthwise import _Depthwise

    torch.manual_seed(0)
    b, c, h, w = shape
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, 1, 7, 5, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    for t in (x, weight, bias):
        t.requires_grad_()
    grad = torch.randn(b, c, h, w, dtype=torch.float64)
    ref = torch.autograd.grad(F.conv2d(x, weight, bias, 1, (3, 2), 1, c), (x, weight, bias), grad)
    got = torch.autograd.grad(_Depthwise.apply(x, weight, bias, (3, 2)), (x, weight, bias), grad)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
