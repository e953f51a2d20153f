import math

import pytest
import torch

from bitdance import BinaryQuantizer, BinaryTokenizer, TokenizerConfig, tokenizer_preset
from bitdance.models.config import ConfigError
from bitdance.models.quantizer import binarize, bits_to_indices, indices_to_bits
from bitdance.models.tokenizer import depth_to_space


def test_binarize_never_zero():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-9, 3.0])
    assert binarize(x).tolist() == [-1, -1, -1, 1, 1]


def test_bits_indices_roundtrip_little_endian():
    bits = torch.tensor([[1.0, -1, -1, 1, -1, 1, 1, 1]])  # groups of 4: bits 0 and 3 set; bits 1, 2, 3 set
    idx = bits_to_indices(bits, groups=2)
    assert idx.tolist() == [[1 + 8, 2 + 4 + 8]]
    assert torch.equal(indices_to_bits(idx, bits_per_group=4), bits)
    all_bits = binarize(torch.randn(100, 32))
    assert torch.equal(indices_to_bits(bits_to_indices(all_bits, groups=4), bits_per_group=8), all_bits)


def test_quantizer_entropy_terms():
    q = BinaryQuantizer(bits=8, groups=2).train()
    # Features spread over all codes of each 4-bit group, far from 0: confident and diverse.
    codes = indices_to_bits(torch.arange(16).repeat(2)[:, None].view(-1, 2), bits_per_group=4)
    x = (codes * 3.0).T.reshape(1, 8, 4, 4)
    out = q(x)
    assert out.per_sample_entropy.item() < 1e-3
    assert math.isclose(out.codebook_entropy.item(), math.log(16), rel_tol=1e-3)
    assert out.entropy_loss.item() == pytest.approx(out.per_sample_entropy.item() - out.codebook_entropy.item())
    # Collapsed onto one code: codebook entropy ~ 0, so the loss is ~0 instead of -log(16).
    collapsed = q(torch.full((1, 8, 4, 4), 3.0))
    assert collapsed.codebook_entropy.item() < 1e-3
    assert collapsed.entropy_loss.item() > out.entropy_loss.item() + 2.0
    assert out.commitment.item() == pytest.approx(4.0)  # (3 - 1)^2


def test_quantizer_straight_through_and_eval():
    q = BinaryQuantizer(bits=4, groups=1)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q.train()(x)
    assert set(out.quantized.unique().tolist()) <= {-1.0, 1.0}
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    ev = q.eval()(x.detach())
    assert ev.entropy_loss.item() == 0 and ev.commitment.item() == 0
    with pytest.raises(AssertionError, match="expected features"):
        q(torch.randn(2, 5, 3, 3))


def test_quantizer_refuses_huge_groups():
    with pytest.raises(AssertionError, match="bits per group"):
        BinaryQuantizer(bits=64, groups=2)
    with pytest.raises(ConfigError, match="groups"):
        TokenizerConfig(z_channels=64, groups=2)


def test_depth_to_space_dcr_order():
    C = 3
    x = torch.arange(4 * C, dtype=torch.float32).view(1, 4 * C, 1, 1)
    y = depth_to_space(x, 2)
    for a in range(2):
        for b in range(2):
            for c in range(C):
                assert y[0, c, a, b] == (a * 2 + b) * C + c


def _tiny_tokenizer(**kw):
    torch.manual_seed(0)
    return BinaryTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, groups=2, **kw))


@pytest.mark.parametrize("hw", [(16, 16), (32, 24), (8, 40)])
def test_tokenizer_any_divisible_resolution(hw):
    tok = _tiny_tokenizer().eval()
    img = torch.rand(2, 3, *hw) * 2 - 1
    lat = tok.encode(img)
    assert lat.shape == (2, 16, hw[0] // 4, hw[1] // 4)
    assert set(lat.unique().tolist()) <= {-1.0, 1.0}
    assert tok.decode(lat).shape == img.shape
    torch.testing.assert_close(tok.decode_indices(tok.indices(img)), tok.decode(lat))


def test_tokenizer_rejects_bad_shapes():
    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match="divisible by the tokenizer's down factor 4"):
        tok.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        tok.decode(torch.zeros(1, 8, 4, 4))


def test_gan_decoder_noise_is_seeded():
    tok = _tiny_tokenizer(gan_decoder=True).eval()
    assert tok.decoder.conv_in.in_channels == 32
    lat = binarize(torch.randn(1, 16, 4, 4))
    a = tok.decode(lat, generator=torch.Generator().manual_seed(1))
    b = tok.decode(lat, generator=torch.Generator().manual_seed(1))
    c = tok.decode(lat, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chunked_decode_matches():
    tok = _tiny_tokenizer().eval()
    lat = binarize(torch.randn(5, 16, 4, 4))
    torch.testing.assert_close(tok.decode(lat, chunk_size=2), tok.decode(lat))


def test_training_step_reduces_reconstruction_loss():
    tok = _tiny_tokenizer().train()
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        out = tok(img)
        loss = (out.reconstruction - img).abs().mean() + 0.1 * out.quant.entropy_loss + 0.25 * out.quant.commitment
        opt.zero_grad()
        loss.backward()
        assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # gradients reach the encoder (straight-through)
        opt.step()
        losses.append((out.reconstruction - img).abs().mean().item())
    assert losses[-1] < 0.8 * losses[0]


def test_tokenizer_presets():
    assert tokenizer_preset("d16c32").down_factor == 16 and tokenizer_preset("d16c32").z_channels == 32
    assert tokenizer_preset("ae_d32c256").down_factor == 32 and tokenizer_preset("d32c256").gan_decoder
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        tokenizer_preset("d8c4")
