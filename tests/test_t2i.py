"""Text-to-image BitDance (bitdance.models.t2i): folder layout, sequence, mask, embeddings, generation.

Everything runs on a tiny random model written in the released folder layout.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bitdance.formats.t2i_folder import load_folder, save_folder
from bitdance.formats.weights import CheckpointError
from bitdance.models.config import RESOLUTIONS_512, RESOLUTIONS_1024, T2IConfig, TokenizerConfig
from bitdance.models.t2i import BitDanceT2I, sincos_1d, sincos_2d, special_tokens, t2i_attention_mask
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.sampling.flow import FlowSampler

torch.set_num_threads(1)

P = 4
RES = [(64, 64), (32, 128)]
SAMPLER = FlowSampler(num_steps=2)


def tiny_text_tokenizer(parallel_num=P):
    """Character-level fast tokenizer + the Qwen chat / vision tokens and the BitDance special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    fast.add_tokens(["<|endoftext|>"] + special_tokens(parallel_num), special_tokens=True)
    return fast


def tiny_model(parallel_num=P, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    text_tok = tiny_text_tokenizer(parallel_num)
    cfg = Qwen3Config(vocab_size=len(text_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    llm = Qwen3ForCausalLM(cfg).eval()
    ae = BinaryTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32))
    config = T2IConfig(parallel_num=parallel_num, head_width=32, head_depth=2, head_adaln=2, head_dim=16,
                       resolutions=RES)
    model = BitDanceT2I(llm, text_tok, config, ae=ae)
    # Non-zero head output layers so that the condition matters.
    for p in model.vision_head.parameters():
        if p.abs().sum() == 0 and p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bitdance_t2i")
    save_folder(tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return load_folder(folder, resolutions=RES)


# --------------------------------------------------------------------------------------------
# Folder layout
# --------------------------------------------------------------------------------------------
def test_folder_layout(folder):
    names = set(os.listdir(folder))
    for n in ["config.json", "model.safetensors", "tokenizer.json", "ae_config.json", "ae.safetensors",
              "vision_head_config.json", "vision_head.safetensors", "projector.safetensors"]:
        assert n in names, n
    head = json.loads((folder / "vision_head_config.json").read_text())
    for k in ["ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "parallel_num", "time_shift",
              "time_schedule", "P_mean", "P_std", "use_swiglu"]:
        assert k in head
    assert head["parallel_num"] == P and head["ch_cond"] == 64 and head["ch_target"] == 32
    from safetensors.torch import load_file

    assert all(k.startswith("net.") for k in load_file(folder / "vision_head.safetensors"))
    assert set(load_file(folder / "projector.safetensors")) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    ae = json.loads((folder / "ae_config.json").read_text())
    assert "ddconfig" in ae and ae["gan_decoder"] is False


def test_roundtrip_weights(folder, model):
    ref = tiny_model()
    for a, b in [(ref.llm, model.llm), (ref.vision_head, model.vision_head), (ref.projector, model.projector),
                 (ref.ae, model.ae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert model.vision_head.config.output_activation == "tanh"
    assert model.vision_head.net.res_blocks[0].attn.n_head == 2  # width 32 / head_dim 16


@pytest.mark.parametrize("name", ["ae.safetensors", "ae_config.json", "vision_head.safetensors",
                                  "vision_head_config.json", "projector.safetensors", "model.safetensors",
                                  "config.json", "tokenizer.json"])
def test_missing_file(folder, tmp_path, name):
    import shutil

    dst = tmp_path / "f"
    shutil.copytree(folder, dst)
    os.remove(dst / name)
    if name == "tokenizer.json" and (dst / "vocab.json").exists():
        os.remove(dst / "vocab.json")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_folder(dst, resolutions=RES)


@pytest.mark.parametrize("key, value, words", [
    ("ch_latent", 10**9, "ch_latent = 1000000000 but vision_head.safetensors has ch_latent = 32"),
    ("depth_latent", 10**9, "depth_latent = 1000000000 but"),
    ("ch_cond", 4096, "ch_cond = 4096 but"),
    ("ch_latent", "32", "ch_latent must be int, got '32'"),
    ("depth_latent", -2, "depth_latent must be a positive integer"),
    ("time_shift", "fast", "time_shift must be a finite number"),
])
def test_vision_head_config_checked_against_the_weights_first(folder, tmp_path, key, value, words):
    import shutil

    dst = tmp_path / "f"
    shutil.copytree(folder, dst)
    head = json.loads((dst / "vision_head_config.json").read_text())
    head[key] = value
    (dst / "vision_head_config.json").write_text(json.dumps(head))
    with pytest.raises(CheckpointError, match=re.escape(words)):
        load_folder(dst, resolutions=RES)


def test_generate_shapes_and_determinism(model):
    for (H, W) in RES:
        g = torch.Generator().manual_seed(0)
        lat = model.generate(["a red cat", "blue"], height=H, width=W, sampler=SAMPLER, guidance_scale=3.0,
                             generator=g)
        assert lat.shape == (2, 32, H // 16, W // 16)
        assert set(lat.unique().tolist()) <= {-1.0, 1.0}
        lat2 = model.generate(["a red cat", "blue"], height=H, width=W, sampler=SAMPLER, guidance_scale=3.0,
                              generator=torch.Generator().manual_seed(0))
        assert torch.equal(lat, lat2)
    img = model.decode(lat)
    assert img.shape == (2, 3, 32, 128)


def test_kv_cache_matches_no_cache(model):
    kw = {"height": 32, "width": 128, "sampler": SAMPLER, "guidance_scale": 4.0}
    a = model.generate(["a cat", "a much longer prompt here"], generator=torch.Generator().manual_seed(1),
                       use_kv_cache=True, **kw)
    b = model.generate(["a cat", "a much longer prompt here"], generator=torch.Generator().manual_seed(1),
                       use_kv_cache=False, **kw)
    assert torch.equal(a, b)


def test_batch_padding_does_not_change_result(model):
    """Left padding is masked: a prompt's block-0 LLM outputs are the same alone or next to a longer
    prompt (rows of one batch draw different noise, so the LLM outputs are compared, not the latents)."""
    h, w = 4, 4
    ha = _hidden(model, model.build_inputs(["hi"], h, w))[0]
    hb = _hidden(model, model.build_inputs(["hi", "a considerably longer prompt"], h, w))[0]
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)


def _hidden(model, inp, attn=None):
    from bitdance.models.t2i import additive_mask

    valid = inp.valid
    mask = additive_mask(t2i_attention_mask(valid, inp.num_causal, P), torch.float32)
    pos = model.position_ids(valid)
    emb = model.llm.get_input_embeddings()(inp.input_ids)
    with torch.no_grad():
        return model.llm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state[:, -P:]


def test_unknown_resolution(model):
    with pytest.raises(ValueError, match="allowed resolutions: 64x64, 32x128"):
        model.generate("x", height=128, width=32, sampler=SAMPLER)
    with pytest.raises(ValueError, match="1024x1024"):
        T2IConfig().check_resolution(1000, 1000)
    assert T2IConfig().check_resolution(2048, 512) == (128, 32)
    assert T2IConfig(parallel_num=16).check_resolution(384, 640) == (24, 40)
    any_res = T2IConfig(parallel_num=4, allow_any_resolution=True)
    assert any_res.check_resolution(96, 32) == (6, 2)
    with pytest.raises(ValueError, match="multiples of 32"):
        any_res.check_resolution(48, 32)


def test_released_resolution_lists():
    assert len(RESOLUTIONS_1024) == 11 and len(RESOLUTIONS_512) == 7
    assert (512, 2048) in RESOLUTIONS_1024 and (384, 640) in RESOLUTIONS_512
    for P_ in (16, 64):
        cfg = T2IConfig(parallel_num=P_)
        for H, W in cfg.resolutions:
            h, w = cfg.check_resolution(H, W)
            assert h % cfg.patch_size == 0 and w % cfg.patch_size == 0
    with pytest.raises(Exception, match="square"):
        T2IConfig(parallel_num=8)


# --------------------------------------------------------------------------------------------
# Sequence layout, positions, mask
# --------------------------------------------------------------------------------------------
def test_sequence_layout(model):
    tok = model.text_tokenizer
    inp = model.build_inputs(["ab", None], 2, 8)
    ids = inp.input_ids
    conv = tok.convert_tokens_to_ids
    cond = ([conv("<|im_start|>")] + tok("user\nab", add_special_tokens=False)["input_ids"] + [conv("<|im_end|>")]
            + tok("\n", add_special_tokens=False)["input_ids"] + [conv("<|im_start|>")]
            + tok("assistant\n", add_special_tokens=False)["input_ids"]
            + [conv("<|vision_start|>"), conv("<|res_2|>")])
    uncond = ([conv("<|im_start|>")] + tok("assistant\n", add_special_tokens=False)["input_ids"]
              + [conv("<|vision_start|>"), conv("<|res_2|>")])
    first = [conv("<|res_8|>")] + [conv(f"<|query_{i}|>") for i in range(1, P)]
    assert len(tok("user\nab", add_special_tokens=False)["input_ids"]) == 7  # character-level
    assert ids[0].tolist() == cond + first
    L = len(cond)
    assert inp.num_causal == L
    pad = tok.pad_token_id
    assert ids[1].tolist() == [pad] * (L - len(uncond)) + uncond + first
    assert inp.valid[1].tolist() == [False] * (L - len(uncond)) + [True] * (len(uncond) + P)
    pos = model.position_ids(inp.valid)
    assert pos[0].tolist() == list(range(L + P))
    assert pos[1, L - len(uncond):].tolist() == list(range(len(uncond) + P))
    assert inp.text_lengths.tolist() == [L, len(uncond)]


def test_attention_mask_structure():
    valid = torch.tensor([[True] * 3 + [True] * 6, [False, False, True] + [True] * 6])
    m = t2i_attention_mask(valid, num_causal=3, block=3)  # 3 causal, then blocks [3,4,5], [6,7,8]
    r0 = m[0]
    # text causal
    assert r0[:3, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # blocks bidirectional inside, causal across
    assert r0[3:6, 3:6].all() and r0[6:9, 3:9].all() and not r0[3:6, 6:9].any()
    assert r0[3:9, :3].all()
    # padding keys invisible, padding queries see only themselves
    r1 = m[1]
    assert not r1[2:, :2].any()
    assert r1[0].tolist() == [True] + [False] * 8 and r1[1, 1] and not r1[1, 0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mask_is_applied(attn):
    """The 4D mask reaches the HF model: a later block cannot affect an earlier one, the tokens of a block
    see each other, padding does not leak, and eager == sdpa."""
    from transformers import Qwen3Config, Qwen3Model

    from bitdance.models.t2i import additive_mask

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg._attn_implementation = attn
    net = Qwen3Model(cfg).eval()
    valid = torch.tensor([[True] * 9, [False, False] + [True] * 7])
    mask = additive_mask(t2i_attention_mask(valid, 3, 3), torch.float32)
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    x = torch.randn(2, 9, 32)

    def run(x):
        with torch.no_grad():
            return net(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state

    base = run(x)
    y = x.clone()
    y[:, 8] += 1.0  # last token of the last block
    out = run(y)
    torch.testing.assert_close(out[:, :6], base[:, :6])
    assert (out[:, 6] - base[:, 6]).abs().max() > 1e-4  # same block sees it (bidirectional)
    z = x.clone()
    z[1, :2] = torch.randn(2, 32)  # change padding of row 1
    torch.testing.assert_close(run(z)[1, 2:], base[1, 2:])
    # eager and sdpa agree
    cfg2 = Qwen3Config(**cfg.to_dict())
    cfg2._attn_implementation = "sdpa" if attn == "eager" else "eager"
    other = Qwen3Model(cfg2).eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        o2 = other(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(o2[:, 2:], base[:, 2:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 2D sin-cos embedding
# --------------------------------------------------------------------------------------------
def test_sincos_2d_formula():
    h, w, D = 3, 5, 16
    emb = sincos_2d(h, w, D)
    assert emb.shape == (h * w, D)
    for r in range(h):
        for c in range(w):
            row = emb[r * w + c]
            expect = []
            for p in (c, r):  # column first, then row
                s = [math.sin(p / 10000 ** (i / (D / 4))) for i in range(D // 4)]
                co = [math.cos(p / 10000 ** (i / (D / 4))) for i in range(D // 4)]
                expect += s + co
            torch.testing.assert_close(row, torch.tensor(expect, dtype=torch.float32))
    torch.testing.assert_close(sincos_1d(torch.tensor([0]), 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]],
                                                                             dtype=torch.float64))


def test_image_pos_embed_patch_order(model):
    emb = model.image_pos_embed(2, 8)  # p = 2: first patch = (0,0), (0,1), (1,0), (1,1)
    full = sincos_2d(2, 8, 64)
    torch.testing.assert_close(emb[:4], full[[0, 1, 8, 9]])
    torch.testing.assert_close(emb[4:8], full[[2, 3, 10, 11]])


def test_condition_uses_predicted_positions(model, monkeypatch):
    """The head condition of step k = LLM output + sin-cos of block k's positions; fed tokens get their own."""
    seen = []
    orig = model.vision_head.sample

    def spy(cond, **kw):
        seen.append(cond.clone())
        return orig(cond, **kw)

    monkeypatch.setattr(model.vision_head, "sample", spy)
    fed = []
    orig_embed = model.embed_image_tokens

    def spy_embed(bits, pos):
        fed.append(pos.clone())
        return orig_embed(bits, pos)

    monkeypatch.setattr(model, "embed_image_tokens", spy_embed)
    hidden = []
    hook = model.llm.model.register_forward_hook(lambda m, a, out: hidden.append(out.last_hidden_state[:, -P:]))
    try:
        model.generate("x", height=32, width=128, sampler=SAMPLER, guidance_scale=1.0)
    finally:
        hook.remove()
    pe = model.image_pos_embed(2, 8)
    assert len(seen) == 4 and len(fed) == 3 and len(hidden) == 4
    for k in range(4):
        torch.testing.assert_close(seen[k], hidden[k] + pe[k * P:(k + 1) * P])
    for k in range(3):
        torch.testing.assert_close(fed[k], pe[k * P:(k + 1) * P])


def test_sharded_llm_folder(tmp_path):
    """Released folders ship sharded model-*.safetensors + index; a missing shard is named."""
    m = tiny_model()
    save_folder(m, tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    loaded = load_folder(tmp_path, resolutions=RES)
    for k, v in m.llm.state_dict().items():
        torch.testing.assert_close(loaded.llm.state_dict()[k], v, rtol=0, atol=0)
    os.remove(tmp_path / shards[-1])
    with pytest.raises(CheckpointError, match=shards[-1]):
        load_folder(tmp_path, resolutions=RES)


def test_offload_keeps_parts_off_the_device(folder):
    """offload=("ae", "lm_head") leaves those on the CPU while the rest moves (the meta device stands in
    for a GPU on this CPU-only test machine: nothing is allocated there)."""
    m = load_folder(folder, resolutions=RES, device="meta", offload=("ae", "lm_head"))
    assert m.llm.model.embed_tokens.weight.device.type == "meta"
    assert m.projector.fc1.weight.device.type == "meta"
    assert all(p.device.type == "meta" for p in m.vision_head.parameters())
    assert all(p.device.type == "cpu" for p in m.ae.parameters())
    assert m.llm.lm_head.weight.device.type == "cpu"
    plain = load_folder(folder, resolutions=RES, device="meta")
    assert all(p.device.type == "meta" for p in plain.parameters())
    with pytest.raises(ValueError, match="offload takes"):
        load_folder(folder, resolutions=RES, offload=("vision_head",))


def test_decode_with_offloaded_ae(model):
    """The ae may live elsewhere than the latents: decode moves them to it."""
    lat = torch.ones(1, 32, 2, 2, dtype=torch.float64)  # a dtype the ae does not use
    img = model.decode(lat)
    assert img.shape == (1, 3, 32, 32) and img.dtype == next(model.ae.parameters()).dtype
