"""The paper's ablations, selectable by config: the head type (binary diffusion head vs. bit-wise and
token classification heads) and the attention inside a block (block-causal vs. plain causal).

Everything runs on tiny models (BitDance-T at 32x32 with the tiny-d4c16 tokenizer: an 8x8 grid of
16-bit tokens) with one CPU thread.
"""

from __future__ import annotations

import json

import pytest
import torch

from bitdance import BitDance, FlowSampler, HeadConfig, bitdance_preset
from bitdance.models.config import BitDanceConfig, ConfigError
from bitdance.models.head import BitwiseHead, DiffusionHead, TokenHead, build_head
from bitdance.models.quantizer import binarize, bits_to_indices, indices_to_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(P: int = 4, **kw) -> BitDanceConfig:
    return bitdance_preset(f"BitDance-T-{P}x", image_size=32, num_classes=10, cls_token_num=4,
                           tokenizer="tiny-d4c16", **kw)


def tiny_model(P: int = 4, seed: int = 0, **kw) -> BitDance:
    torch.manual_seed(seed)
    m = BitDance(tiny_config(P, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move off the zero init so every part of the network matters
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def small_head(head_type: str, P: int = 1, **kw):
    cfg = HeadConfig(variant="mlp" if P == 1 else "transformer", in_channels=8, cond_channels=12, width=64,
                     depth=2, adaln_blocks=2, head_dim=32, parallel_num=P, head_type=head_type, **kw)
    return build_head(cfg)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def test_config_fields_defaults_validation_roundtrip():
    c = tiny_config()
    assert c.head_type == "diffusion" and c.block_attention == "bidirectional"
    assert c.head.head_type == "diffusion"
    with pytest.raises(ConfigError, match="unknown head_type 'softmax'"):
        tiny_config(head_type="softmax")
    with pytest.raises(ConfigError, match="unknown block_attention 'full'"):
        tiny_config(block_attention="full")
    with pytest.raises(ConfigError, match="unknown head_type"):
        HeadConfig(head_type="gaussian")
    for kw in [{"head_type": "bitwise", "block_attention": "causal"}, {"head_type": "token"}, {}]:
        cfg = tiny_config(**kw)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert BitDanceConfig.from_dict(d) == cfg
        assert cfg.head.head_type == cfg.head_type
        assert HeadConfig.from_dict(cfg.head.to_dict()) == cfg.head
    # A config.json written before these fields existed still loads, with the official behaviour.
    old = {k: v for k, v in tiny_config().to_dict().items() if k not in ("head_type", "block_attention")}
    assert BitDanceConfig.from_dict(old) == tiny_config()


def test_official_presets_unchanged():
    for name, expected in [("BitDance-B-1x", 242373152), ("BitDance-B-4x", 260102432)]:
        with torch.device("meta"):  # no memory, no initialisation cost
            m = BitDance(bitdance_preset(name))
        assert sum(p.numel() for p in m.parameters()) == expected
        assert isinstance(m.head, DiffusionHead)
    # The default model's head keys are the official ones; ablation heads have no time/noise input.
    d = tiny_model(4)
    keys = {k for k in d.state_dict() if k.startswith("head.")}
    assert "head.net.time_embed.mlp.0.weight" in keys and "head.net.input_proj.weight" in keys
    b = BitDance(tiny_config(4, head_type="bitwise"))
    bkeys = {k for k in b.state_dict() if k.startswith("head.")}
    assert not any(".time_embed." in k or ".input_proj." in k for k in bkeys)
    assert b.state_dict()["head.net.final_layer.linear.weight"].shape == (16, 128)
    assert {k for k in b.state_dict() if not k.startswith("head.")} == \
        {k for k in d.state_dict() if not k.startswith("head.")}


def test_token_head_refuses_large_codebooks():
    with pytest.raises(ConfigError, match=r"2\^32 .*bytes"):
        HeadConfig(head_type="token", in_channels=32, width=64)
    with pytest.raises(ConfigError, match="bytes"):
        bitdance_preset("BitDance-T-4x", head_type="token")  # default d16c32 tokenizer: 32 bits per token
    with pytest.raises(ConfigError, match="bytes"):
        HeadConfig(head_type="token", in_channels=21, width=16)
    with pytest.raises(ConfigError, match="bytes"):  # 2^20 codes x 1281 float32 weights > 4 GiB
        HeadConfig(head_type="token", in_channels=20, width=1280)
    assert HeadConfig(head_type="token", in_channels=16, width=1280).num_codes == 65536
    # The other heads have no such limit (that is their point).
    HeadConfig(head_type="bitwise", in_channels=256)
    with pytest.raises(ConfigError, match="output_activation"):
        HeadConfig(head_type="bitwise", output_activation="tanh")


# --------------------------------------------------------------------------------------------
# Classification heads on their own
# --------------------------------------------------------------------------------------------
def test_code_index_and_bit_layout():
    """Token head: code index has bit k at weight 2^k; bitwise head: logit k decides bit k."""
    tok = small_head("token")
    with torch.no_grad():
        tok.net.final_layer.linear.bias[5] = 10.0  # 5 = 0b101: bits 0 and 2 set
    cond = torch.randn(3, 12)
    out = tok.sample(cond, temperature=0.0)
    expected = torch.tensor([1, -1, 1, -1, -1, -1, -1, -1.0])
    assert torch.equal(out, expected.expand(3, 8))
    assert bits_to_indices(out).flatten().tolist() == [5, 5, 5]
    # top_k=1 leaves only the best code, whatever the temperature
    assert torch.equal(tok.sample(cond, top_k=1, temperature=2.0, generator=torch.Generator().manual_seed(0)), out)
    # its loss is the cross-entropy on that index
    target = indices_to_bits(torch.tensor([[5], [7], [0]]), bits_per_group=8)
    logits = tok.net(cond)
    torch.testing.assert_close(tok.loss(target, cond),
                               torch.nn.functional.cross_entropy(logits, torch.tensor([5, 7, 0])))

    bw = small_head("bitwise")
    with torch.no_grad():
        bw.net.final_layer.linear.bias.copy_(torch.tensor([20.0, -20, 20, 20, -20, -20, 20, -20]))
    s = bw.sample(cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, binarize(bw.net.final_layer.linear.bias).expand(3, 8))
    target = binarize(torch.randn(3, 8))
    torch.testing.assert_close(bw.loss(target, cond), torch.nn.functional.binary_cross_entropy_with_logits(
        bw.net(cond), (target + 1) / 2))
    with pytest.raises(ValueError, match="top_k"):
        bw.sample(cond, top_k=3)
    with pytest.raises(ValueError, match="temperature"):
        tok.sample(cond, temperature=-1.0)


@pytest.mark.parametrize("head_type", ["bitwise", "token"])
def test_guidance_on_logits_and_row_layout(head_type):
    torch.manual_seed(0)
    head = small_head(head_type, P=4)
    for p in head.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    cond = torch.randn(6, 4, 12)  # 3 conditional rows, then 3 unconditional rows
    raw = head.net(cond)
    c, u = raw.chunk(2)
    torch.testing.assert_close(head.logits(cond, 3.0), u + 3.0 * (c - u))
    g = lambda s: torch.Generator().manual_seed(s)
    out = head.sample(cond, sampler=FlowSampler(num_steps=2), guidance_scale=3.0, generator=g(0))
    assert out.shape == (3, 4, 8) and set(out.unique().tolist()) <= {-1.0, 1.0}
    assert head.sample(cond, guidance_scale=1.0, generator=g(0)).shape == (6, 4, 8)
    assert torch.equal(out, head.sample(cond, guidance_scale=3.0, generator=g(0)))  # seeded
    assert not torch.equal(head.sample(cond, generator=g(0)), head.sample(cond, generator=g(1)))


@pytest.mark.parametrize("head_type", ["bitwise", "token"])
@pytest.mark.parametrize("variant", ["mlp", "transformer"])
def test_classification_head_learns_a_conditional_distribution(head_type, variant):
    """Two conditions, each with its own fixed 8-bit code: after a short fit the sampled bits match."""
    torch.manual_seed(0)
    P = 2 if variant == "transformer" else 1
    head = small_head(head_type, P=P)
    assert isinstance(head, BitwiseHead if head_type == "bitwise" else TokenHead)
    codes = binarize(torch.randn(2, P, 8))
    conds = torch.randn(2, P, 12)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        which = torch.randint(0, 2, (64,), generator=g)
        loss = head.loss(codes[which], conds[which], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    which = torch.arange(32) % 2
    x = head.sample(conds[which], generator=g)
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    acc = (x == codes[which]).float().mean().item()
    assert acc > 0.95


# --------------------------------------------------------------------------------------------
# Inside BitDance
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type,P", [("diffusion", 4), ("bitwise", 4), ("token", 4), ("diffusion", 1),
                                         ("bitwise", 1), ("token", 1)])
def test_head_types_train_and_generate(head_type, P):
    torch.manual_seed(0)
    model = BitDance(tiny_config(P, head_type=head_type, diff_batch_mul=2)).train()
    latents = binarize(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)))
    labels = torch.tensor([1, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(10):
        loss = model(latents, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), "unused parameters"
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.95 * losses[0], losses

    model.eval()
    ids = torch.tensor([1, 7])
    kw = {"sampler": FlowSampler(num_steps=2), "guidance_scale": 2.0}
    run = lambda s, **k: model.generate(ids, generator=torch.Generator().manual_seed(s), **kw, **k)
    a = run(0)
    assert a.shape == (2, 16, 8, 8) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, run(0))
    assert torch.equal(a, run(0, use_kv_cache=False))
    assert not torch.equal(a, run(1))
    if head_type == "diffusion":
        with pytest.raises(ValueError, match="classification heads"):
            run(0, temperature=0.5)
    else:
        greedy = run(0, temperature=0.0)
        assert torch.equal(greedy, run(5, temperature=0.0))  # greedy decoding ignores the seed
        if head_type == "token":
            assert torch.equal(greedy, run(3, top_k=1))


def _assert_block_dependence(m: BitDance, P: int, causal: bool):
    lat = binarize(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)))
    ids = torch.tensor([3])
    cond = m.condition(lat, ids).cond
    seq = m.to_sequence(lat)
    r = P // 2
    k = 2 * P + r  # a token inside block 2, with earlier and later tokens in its block
    seq2 = seq.clone()
    seq2[0, k] = -seq2[0, k]
    diff = (m.condition(m.from_sequence(seq2), ids).cond - cond).abs().amax(-1)[0]
    nxt = (k // P + 1) * P  # first token of the next block
    # Either way, a block's own conditions never depend on its own tokens, nor do earlier blocks'.
    assert diff[:nxt].max() == 0
    if causal:  # in the next block only the positions from k's offset on see token k
        assert diff[nxt: nxt + r].max() == 0
        assert diff[nxt + r: nxt + P].min() > 0
    else:  # the whole next block sees it
        assert diff[nxt: nxt + P].min() > 0


@pytest.mark.parametrize("P", [4, 16])
def test_causal_block_attention(P):
    m_causal = tiny_model(P, block_attention="causal")
    m_bidir = tiny_model(P)
    _assert_block_dependence(m_causal, P, causal=True)
    _assert_block_dependence(m_bidir, P, causal=False)
    L = m_causal.seq_len
    assert torch.equal(m_causal.attn_mask, torch.ones(L, L).tril().bool())
    assert not torch.equal(m_bidir.attn_mask, m_causal.attn_mask)
    # Same weights, the mask is the only difference.
    m_bidir.load_state_dict(m_causal.state_dict())
    lat = binarize(torch.randn(1, 16, 8, 8))
    assert not torch.allclose(m_causal.condition(lat, torch.tensor([0])).cond,
                              m_bidir.condition(lat, torch.tensor([0])).cond)


@pytest.mark.parametrize("block_attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_generation_follows_the_training_mask(block_attention, use_kv_cache):
    """The head conditions seen while generating equal the teacher-forced ones of the result."""
    P = 4
    m = tiny_model(P, block_attention=block_attention, head_type="bitwise")
    seen = []
    sample = m.head.sample

    def recording_sample(cond, **kw):
        seen.append(cond.clone())
        return sample(cond, **kw)

    m.head.sample = recording_sample
    ids = torch.tensor([2, 5])
    lat = m.generate(ids, generator=torch.Generator().manual_seed(0), use_kv_cache=use_kv_cache)
    assert len(seen) == m.config.num_steps
    torch.testing.assert_close(torch.cat(seen, dim=1), m.condition(lat, ids).cond, atol=1e-4, rtol=1e-4)
    if block_attention == "causal":
        b = tiny_model(P, head_type="bitwise")
        b.load_state_dict(m.state_dict())
        assert not torch.allclose(b.condition(lat, ids).cond, m.condition(lat, ids).cond, atol=1e-4)
    ref = tiny_model(P, block_attention=block_attention, head_type="bitwise")
    other = ref.generate(ids, generator=torch.Generator().manual_seed(0), use_kv_cache=not use_kv_cache)
    assert torch.equal(lat, other)
