"""BatchNorm folding for backbones run without gradients (capcli.models.fast.fold, Encoder.regions)."""

import timm
import torch
from torch import nn

from capcli.models.encoder import Encoder
from capcli.models.fast.fold import conv_bn_pairs, fold_batchnorm


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine terms far from identity (a fresh BatchNorm is nearly one)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.3)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


class Toy(nn.Module):
    """conv -> bn -> relu; conv2 -> bn2 (+ conv2's output again when ``leak``); bn3 on an input."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.leak = leak
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward_features(self, x):
        y = torch.relu(self.bn(self.conv(self.bn_in(x))))
        z = self.conv2(y)
        return self.bn2(z) + (z if self.leak else 0)


def test_pairs_follow_data_flow():
    toy = Toy().eval()
    assert sorted(conv_bn_pairs(toy, torch.randn(1, 3, 8, 8))) == [("conv", "bn"), ("conv2", "bn2")]


def test_folded_copy_equals_the_backbone_and_leaves_it_alone():
    toy = Toy().double().eval()
    _randomise_bn(toy)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    folded = fold_batchnorm(toy, x[:1])
    assert folded is not None and folded is not toy
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn_in, nn.BatchNorm2d)  # reads an input, not a convolution: kept
    # hand-folded: w * g / sqrt(v + eps), (b - m) * g / sqrt(v + eps) + beta
    s = toy.bn2.weight / torch.sqrt(toy.bn2.running_var + toy.bn2.eps)
    torch.testing.assert_close(folded.conv2.weight, toy.conv2.weight * s.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded.conv2.bias, (toy.conv2.bias - toy.bn2.running_mean) * s + toy.bn2.bias)
    with torch.no_grad():
        torch.testing.assert_close(folded.forward_features(x), toy.forward_features(x), rtol=1e-10, atol=1e-10)
    for k, v in toy.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_convolution_read_twice_is_not_folded():
    toy = Toy(leak=True).eval()
    _randomise_bn(toy)
    assert ("conv2", "bn2") in conv_bn_pairs(toy, torch.randn(1, 3, 8, 8))
    assert fold_batchnorm(toy, torch.randn(1, 3, 8, 8)) is None  # its output check refuses the copy


def test_timm_backbones_fold_exactly_in_float64():
    for name, kind in (("resnet18", nn.Identity), ("tf_efficientnet_lite0", nn.Sequential)):
        backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").double().eval()
        _randomise_bn(backbone)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        folded = fold_batchnorm(backbone, x[:1])
        assert folded is not None, name
        bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name  # every one folded
        assert sum(isinstance(m, kind) for m in folded.modules()) >= len(bns), name
        with torch.no_grad():
            torch.testing.assert_close(folded.forward_features(x), backbone.forward_features(x),
                                       rtol=1e-9, atol=1e-9)


def test_encoder_runs_the_folded_copy_only_without_gradients():
    torch.manual_seed(0)
    enc = Encoder("resnet18", pretrained=False, finetune=True, grid=2)
    _randomise_bn(enc.backbone)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    enc.eval()
    with torch.no_grad(), enc.derived_weights():  # a fine-tuned backbone runs folded inside the promise
        folded_out = enc.regions(images)
        backbone = enc._folded._module
        assert backbone is not enc.backbone
        assert enc._inference_backbone(enc.normalize(images)) is backbone  # made once
        plain = enc._pooled(enc.backbone.forward_features(enc.normalize(images)))
    torch.testing.assert_close(folded_out, plain, rtol=1e-4, atol=1e-4)
    assert "_folded" not in " ".join(enc.state_dict())
    # gradients (fine-tuning) run the backbone itself
    out = enc.regions(images)
    assert out.requires_grad
    # a weight changed in place (an optimiser step) makes a new copy that sees it
    with torch.no_grad(), enc.derived_weights():
        enc.backbone.conv1.weight.mul_(2)
        refolded = enc.regions(images)
        assert enc._folded._module is not backbone
        plain = enc._pooled(enc.backbone.forward_features(enc.normalize(images)))
    torch.testing.assert_close(refolded, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(refolded, folded_out, rtol=1e-3, atol=1e-3)


def test_a_fused_optimiser_step_never_leaves_a_stale_folded_copy():
    """Fused Adam updates weights in place without bumping their version counters: a backbone
    being fine-tuned runs folded only inside derived_weights(), whose copy is made afresh."""
    torch.manual_seed(0)
    enc = Encoder("resnet18", pretrained=False, finetune=True, grid=2)
    _randomise_bn(enc.backbone)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    opt = torch.optim.Adam([p for p in enc.backbone.parameters() if p.requires_grad], lr=0.01, fused=True)

    def validate():
        enc.eval()
        with torch.no_grad(), enc.derived_weights():
            got = enc.regions(images)
            want = enc._pooled(enc.backbone.forward_features(enc.normalize(images)))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        with torch.no_grad():  # outside the promise: the backbone itself
            torch.testing.assert_close(enc.regions(images), want, rtol=1e-3, atol=1e-3)
        return got

    first = validate()
    # a step in eval mode (BatchNorm statistics fixed, so no buffer's version moves either)
    enc.regions(images).square().mean().backward()
    opt.step()
    assert not torch.allclose(validate(), first, rtol=1e-3, atol=1e-3)


def test_encoder_without_batchnorm_keeps_its_backbone():
    enc = Encoder("convnext_atto", pretrained=False, finetune=False, grid=2).eval()
    with torch.inference_mode():
        enc.regions(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert enc._folded._module is enc.backbone
