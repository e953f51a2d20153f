import pytest
import torch

from bitdance import BinaryTokenizer, BitDance, FlowSampler, bitdance_preset
from bitdance.models.config import ConfigError
from bitdance.models.presets import list_presets
from bitdance.models.quantizer import binarize
from bitdance.models.transformer import flip_bits, generation_order
from bitdance.sampling.masks import block_causal_mask


def tiny_config(P: int, **kw):
    kw.setdefault("image_size", 32)
    return bitdance_preset(f"BitDance-T-{P}x", num_classes=10, cls_token_num=4, tokenizer="tiny-d4c16", **kw)


def tiny_model(P: int, seed: int = 0, **kw) -> BitDance:
    torch.manual_seed(seed)
    m = BitDance(tiny_config(P, **kw))
    with torch.no_grad():  # move off the zero init so every part of the network matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def test_generation_order_patchwise_raster():
    order = generation_order(4, 4, 2)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert generation_order(4, 4, 2, "raster").tolist() == list(range(16))
    assert generation_order(4, 4, 1).tolist() == list(range(16))


def test_block_causal_mask():
    m = block_causal_mask(7, 2, 2).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(m, expected)
    assert torch.equal(block_causal_mask(5, 2, 1), torch.ones(5, 5).tril().bool())


def test_flip_bits_rate():
    x = torch.ones(200_000)
    flipped = (flip_bits(x, 0.3, torch.Generator().manual_seed(0)) < 0).float().mean().item()
    assert flipped == pytest.approx(0.15, abs=0.01)  # expected rate p/2
    assert torch.equal(flip_bits(x, 0.0), x)


@pytest.mark.parametrize("P", [1, 4, 16])
def test_sequence_roundtrip(P):
    m = tiny_model(P)
    lat = binarize(torch.randn(2, 16, 8, 8))
    seq = m.to_sequence(lat)
    assert seq.shape == (2, 64, 16)
    assert torch.equal(m.from_sequence(seq), lat)
    p = int(P**0.5)
    assert torch.equal(seq[:, :P], lat[:, :, :p, :p].flatten(2).transpose(1, 2))  # first patch first


@pytest.mark.parametrize("P", [1, 4, 16])
def test_block_causality(P):
    """Changing generated token k changes the head condition only of later blocks."""
    m = tiny_model(P)
    lat = binarize(torch.randn(1, 16, 8, 8))
    ids = torch.tensor([3])
    cond = m.condition(lat, ids).cond
    seq = m.to_sequence(lat)
    k = 2 * P + (P - 1)  # last token of block 2
    seq2 = seq.clone()
    seq2[0, k] = -seq2[0, k]
    cond2 = m.condition(m.from_sequence(seq2), ids).cond
    diff = (cond2 - cond).abs().amax(-1)[0]
    first_affected = (k // P + 1) * P
    assert diff[:first_affected].max() == 0
    assert diff[first_affected:first_affected + P].min() > 0


@pytest.mark.parametrize("P", [1, 4, 16])
def test_kv_cache_gives_same_tokens(P):
    m = tiny_model(P)
    kw = dict(sampler=FlowSampler(num_steps=3), guidance_scale=3.0)
    ids = torch.tensor([1, 7])
    a = m.generate(ids, generator=torch.Generator().manual_seed(0), use_kv_cache=True, **kw)
    b = m.generate(ids, generator=torch.Generator().manual_seed(0), use_kv_cache=False, **kw)
    assert torch.equal(a, b)
    assert a.shape == (2, 16, 8, 8) and set(a.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("block_attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("P", [1, 4])
def test_cached_step_attention_writes_the_block_and_attends_under_the_mask(P, block_attention):
    """The compiled step's cache op (called eagerly here): it writes the block's keys/values in place and
    attends over the filled cache exactly as masked attention does; the cache's ``dense`` flag (attend without
    the mask) holds where every decoded block's mask rows are True up to the block's end, and only there."""
    m = tiny_model(P, block_attention=block_attention)
    cache = m._kv_cache(2)
    H, D = m.config.n_head, m.config.dim // m.config.n_head
    steps = list(range(m.config.num_steps - 1))
    ends = [m.prefix_len + (b + 1) * P for b in steps]
    rows_dense = all(bool(m.attn_mask[e - P: e, :e].all()) for e in ends)
    assert cache.dense == rows_dense == (block_attention == "bidirectional" or P == 1)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    for end in (ends[0], ends[len(ends) // 2]):
        positions = torch.arange(end - P, end)
        q, k, v = (torch.randn(2, H, P, D, generator=g) for _ in range(3))
        before_k, before_v = cache.k.clone(), cache.v.clone()
        out = torch.ops.bitdance.cached_attention(q, k, v, cache.k, cache.v, 1, positions, m.attn_mask[positions],
                                                  cache.dense)
        before_k[1, :, :, end - P: end], before_v[1, :, :, end - P: end] = k, v
        assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
        mask = m.attn_mask[positions][:, :end]
        want = torch.nn.functional.scaled_dot_product_attention(q, before_k[1, :, :, :end], before_v[1, :, :, :end],
                                                                 attn_mask=mask)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, keys", [(torch.float32, 4), (torch.float32, 40), (torch.bfloat16, 40),
                                         (torch.bfloat16, 200)])
def test_cached_step_attention_returns_the_layout_its_fake_promises(dtype, keys):
    """The compiled step checks the op's output against its fake implementation's layout (that of the
    queries, a transposed view as the step makes them), whichever of attention's paths ran: fp32 over a few
    keys and bf16 over up to 128 take paths that return contiguous tensors, the fused kernel the queries'
    layout."""
    B, H, P, D, layers = 2, 2, 4, 16, 2
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = (torch.randn(layers, B, H, keys, D, generator=g).to(dtype) for _ in range(2))
    q, k, v = (torch.randn(B, P, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    positions = torch.arange(keys - P, keys)
    mask = torch.ones(P, keys + 8, dtype=torch.bool)
    # the op itself, run eagerly; its registered fake implementation returns torch.empty_like(q)
    out = torch.ops.bitdance.cached_attention(q, k, v, cache_k, cache_v, 1, positions, mask, True)
    assert out.shape == q.shape and out.stride() == torch.empty_like(q).stride() == q.stride()
    cache_k[1, :, :, keys - P:], cache_v[1, :, :, keys - P:] = k, v
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), cache_k[1].float(), cache_v[1].float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_sampling_is_seeded():
    m = tiny_model(4)
    ids = torch.tensor([0, 5])
    run = lambda s, **kw: m.generate(ids, sampler=FlowSampler(num_steps=2), guidance_scale=2.0,  # noqa: E731
                                     generator=torch.Generator().manual_seed(s), **kw)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), run(0, guidance_schedule="constant"))


def test_callback_sees_growing_grid():
    m = tiny_model(16)
    filled = []
    m.generate(torch.tensor([1]), sampler=FlowSampler(num_steps=2),
               callback=lambda step, n, lat: filled.append((step, n, int((lat != 0).all(1).sum()))))
    assert filled == [(i, 4, 16 * (i + 1)) for i in range(4)]


def test_bad_class_ids():
    m = tiny_model(4)
    with pytest.raises(ValueError, match="class ids"):
        m.generate(torch.tensor([11]))
    with pytest.raises(ValueError, match="expected latents"):
        m(torch.zeros(1, 16, 4, 4), torch.tensor([0]))


def test_presets_and_config_errors():
    assert len(list_presets()) == 20 and "BitDance-H-64x" in list_presets()
    assert bitdance_preset("BitDance-B-64x").num_steps == 4
    with pytest.raises(ConfigError, match="unknown preset"):
        bitdance_preset("BitDance-XXL-4x")
    with pytest.raises(ConfigError, match="not divisible by the tokenizer's down factor"):
        bitdance_preset("BitDance-B-4x", image_size=250)
    with pytest.raises(ConfigError, match="cannot be cut into 4x4 patches"):
        bitdance_preset("BitDance-B-16x", image_size=16 * 6)
    with pytest.raises(ConfigError, match="must be a square"):
        bitdance_preset("BitDance-B-1x", parallel_num=8)


def test_raster_order_ablation_runs():
    m = tiny_model(4, order="raster")
    lat = binarize(torch.randn(2, 16, 8, 8))
    assert torch.isfinite(m.train()(lat, torch.tensor([1, 2])))
    assert torch.equal(m.to_sequence(lat), lat.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("P", [1, 4, 16])
def test_end_to_end_encode_train_sample_decode(P):
    """Tiny path on CPU: encode images -> a few training steps -> sample -> decode."""
    torch.manual_seed(0)
    cfg = tiny_config(P, diff_batch_mul=2, perturb_rate=0.1)
    tok = BinaryTokenizer(cfg.tokenizer).eval()
    model = BitDance(cfg).train()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        latents = tok.encode(images)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        loss = model(latents, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "unused params"
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]
    model.eval()
    out = model.generate(labels[:2], sampler=FlowSampler(num_steps=2), guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    imgs = tok.decode(out)
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()
