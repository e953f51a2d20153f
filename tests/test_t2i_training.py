"""Text-to-image training (bitdance.t2i): packed batches, the training loss, 16x -> 64x-style distillation.

Tiny random Qwen3 model (hidden 64, 2 layers), P = 4, any resolution that is a multiple of 32 px.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bitdance.sampler import FlowSampler
from bitdance.t2i import (
    IGNORE_INDEX,
    BitDanceT2I,
    T2IConfig,
    _additive,
    distill_from,
    pack_batch,
    packed_head_condition,
    query_token,
    special_tokens,
    t2i_attention_mask,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

P = 4
D = 32


def tiny_model(parallel_num=P, seed=0):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    chars = ["<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    text_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    text_tok.add_tokens(["<|endoftext|>"] + special_tokens(parallel_num, 16), special_tokens=True)
    cfg = Qwen3Config(vocab_size=len(text_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    llm = Qwen3ForCausalLM(cfg)
    config = T2IConfig(parallel_num=parallel_num, head_width=32, head_depth=2, head_adaln=2, head_dim=16,
                       max_res_tokens=16, allow_any_resolution=True, P_mean=-0.8, P_std=0.8)
    model = BitDanceT2I(llm, text_tok, config)
    for p in model.vision_head.parameters():  # non-zero output layers so that the condition matters
        if p.abs().sum() == 0 and p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def bits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def samples():
    # 64x64 px (4x4 tokens, 4 blocks) and 32x128 px (2x8 tokens, 4 blocks).
    return [("a red cat", bits(D, 4, 4, seed=1)), ("blue sky", bits(D, 2, 8, seed=2))]


def unpacked_condition(model, prompt, lat):
    """Teacher-forced head condition computed the way generate (no KV cache) builds its sequence."""
    h, w = lat.shape[1:]
    Pn = model.config.parallel_num
    from bitdance.transformer import generation_order

    inp = model.build_inputs([prompt], h, w)
    tokens = lat.reshape(D, h * w).t()[generation_order(h, w, model.config.patch_size)][None]
    pe = model.image_pos_embed(h, w)
    embeds = torch.cat([model.llm.get_input_embeddings()(inp.input_ids),
                        model.embed_image_tokens(tokens[:, :-Pn], pe[:-Pn])], 1)
    T = embeds.shape[1]
    valid = torch.cat([inp.valid, torch.ones(1, T - inp.valid.shape[1], dtype=torch.bool)], 1)
    mask = _additive(t2i_attention_mask(valid, inp.num_causal, Pn), embeds.dtype)
    hid = model.llm.model(inputs_embeds=embeds, attention_mask=mask,
                          position_ids=model.position_ids(valid)).last_hidden_state
    return hid[0, inp.num_causal:] + pe


def per_sample(packed, x):
    """Split (M, ...) rows of the packed predictions into per-sample chunks."""
    sizes = [h * w for h, w in packed.grids]
    return list(torch.split(x, sizes))


def test_training_step_mixed_resolution(model, samples):
    packed = pack_batch(model, samples, text_dropout=0.0)
    assert packed.mask.shape[1] == packed.input_ids.shape[1] == packed.position_ids.shape[1]
    assert packed.targets.shape == (16 + 16, D)
    model.train()
    model.zero_grad()
    loss, logs = training_loss(model, packed, generator=torch.Generator().manual_seed(0))
    loss.backward()
    model.eval()
    assert math.isfinite(loss.item()) and logs["text"] > 0 and logs["vision"] > 0
    assert loss.item() == pytest.approx(logs["vision"] + 0.01 * logs["text"], rel=1e-5)
    for name, mod in [("embeddings", model.llm.get_input_embeddings()), ("llm layers", model.llm.model.layers),
                      ("lm head", model.llm.lm_head), ("projector", model.projector),
                      ("head", model.vision_head)]:
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    model.zero_grad()


def test_position_ids_and_labels(model, samples):
    packed = pack_batch(model, samples, text_dropout=0.0)
    pos = packed.position_ids[0]
    sid = packed.sample_ids
    starts = [int((sid == s).nonzero()[0]) for s in range(2)]
    assert pos[starts[0]] == 0 and pos[starts[1]] == 0
    assert torch.equal(pos[starts[1]:], torch.arange(len(pos) - starts[1]))
    ids, lab = packed.input_ids[0], packed.labels[0]
    for s, (prompt, _) in enumerate(samples):
        text = model._text_ids(model.prompt_text(prompt))
        st = starts[s]
        assert ids[st:st + len(text)].tolist() == text
        assert lab[st:st + len(text) - 1].tolist() == text[1:]
    n_text = sum(len(model._text_ids(model.prompt_text(p))) - 1 for p, _ in samples)
    assert int((lab != IGNORE_INDEX).sum()) == n_text


def test_packed_mask_isolates_samples_and_is_block_causal(model, samples):
    packed = pack_batch(model, samples, text_dropout=0.0)
    m, sid = packed.mask[0], packed.sample_ids
    assert not (m & (sid[:, None] != sid[None, :])).any()
    with torch.no_grad():
        cond, _ = packed_head_condition(model, packed)
        other = pack_batch(model, [samples[0], ("something else", bits(D, 2, 8, seed=9))], text_dropout=0.0)
        cond2, _ = packed_head_condition(model, other)
        a, b = per_sample(packed, cond), per_sample(other, cond2)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        assert not torch.allclose(a[1], b[1])
        # Block-causal: changing the fed tokens of generated block 1 (input block 2) leaves the
        # conditions of blocks 0, 1 unchanged and changes those of blocks 2, 3.
        toks = packed.image_tokens.clone()
        toks[P:2 * P] = -toks[P:2 * P]
        cond3, _ = packed_head_condition(model, packed, toks)
    c0, c3 = per_sample(packed, cond)[0], per_sample(packed, cond3)[0]
    torch.testing.assert_close(c0[:2 * P], c3[:2 * P], rtol=0, atol=1e-6)
    for k in (2, 3):
        assert not torch.allclose(c0[k * P:(k + 1) * P], c3[k * P:(k + 1) * P])
    # Inside a block every token sees every other one (first image block of sample 0).
    blk = packed.image_index[P:2 * P]
    assert m[blk][:, blk].all()


def test_packed_equals_unpacked_generation_condition(model, samples):
    with torch.no_grad():
        for group in ([samples[0]], samples):
            packed = pack_batch(model, group, text_dropout=0.0)
            cond, _ = packed_head_condition(model, packed)
            for (prompt, lat), c in zip(group, per_sample(packed, cond)):
                torch.testing.assert_close(c, unpacked_condition(model, prompt, lat), rtol=0, atol=1e-5)


def test_text_dropout(model, samples):
    packed = pack_batch(model, samples, text_dropout=1.0)
    assert packed.dropped == [True, True]
    assert (packed.labels == IGNORE_INDEX).all()
    uncond = model._text_ids(model.prompt_text(None))
    assert packed.input_ids[0, :len(uncond)].tolist() == uncond
    with torch.no_grad():
        cond, _ = packed_head_condition(model, packed)
        ref = unpacked_condition(model, None, samples[0][1])
    torch.testing.assert_close(per_sample(packed, cond)[0], ref, rtol=0, atol=1e-5)
    assert pack_batch(model, samples, text_dropout=0.0).dropped == [False, False]
    many = [("x", bits(D, 2, 2, seed=i)) for i in range(40)]
    d1 = pack_batch(model, many, text_dropout=0.5, generator=torch.Generator().manual_seed(3)).dropped
    d2 = pack_batch(model, many, text_dropout=0.5, generator=torch.Generator().manual_seed(3)).dropped
    assert d1 == d2 and 0 < sum(d1) < 40


def test_overfit_two_samples_reduces_loss(samples):
    model = tiny_model(seed=1).train()
    packed = pack_batch(model, samples, text_dropout=0.0)

    def eval_loss():
        with torch.no_grad():
            return training_loss(model, packed, perturb_rate=0.0, generator=torch.Generator().manual_seed(0))[0].item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        loss, _ = training_loss(model, packed, generator=g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_distillation_4_to_16(model):
    new = distill_from(model, parallel_num=16)
    assert new.config.parallel_num == 16 and model.config.parallel_num == P
    # Inherited weights are equal; the teacher is unchanged.
    for a, b in [(model.projector, new.projector), (model.vision_head, new.vision_head)]:
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    old_sd, new_sd = model.llm.state_dict(), new.llm.state_dict()
    n_old = model.llm.get_input_embeddings().num_embeddings
    for k, x in old_sd.items():
        y = new_sd[k]
        if y.shape != x.shape:  # resized embedding / lm head: old rows kept
            y = y[:x.shape[0]]
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    assert new.llm.get_input_embeddings().num_embeddings >= n_old
    assert query_token(15) not in model.text_tokenizer.get_vocab()
    vocab = new.text_tokenizer.get_vocab()
    old_q = [vocab[query_token(i)] for i in range(1, P)]
    new_q = [vocab[query_token(i)] for i in range(P, 16)]
    W = new.llm.get_input_embeddings().weight
    assert all(i >= n_old for i in new_q)
    torch.testing.assert_close(W[new_q], W[old_q].mean(0).expand(len(new_q), -1))
    # Generation at a grid divisible into 4x4 patches (64x128 px = 4x8 tokens, 2 blocks of 16).
    g = torch.Generator().manual_seed(0)
    lat = new.generate(["a red cat"], height=64, width=128, sampler=FlowSampler(num_steps=2),
                       guidance_scale=2.0, generator=g)
    assert lat.shape == (1, D, 4, 8) and set(lat.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError):
        new.generate(["x"], height=32, width=64, sampler=FlowSampler(num_steps=2))
    # A short fine-tune step of the distilled model.
    new.train()
    packed = pack_batch(new, [("a red cat", bits(D, 4, 4, seed=5)), ("blue", bits(D, 4, 8, seed=6))],
                        text_dropout=0.0)
    assert packed.targets.shape == (16 + 32, D)
    opt = torch.optim.AdamW(new.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    loss, _ = training_loss(new, packed, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    loss.backward()
    assert W.grad is not None and W.grad[new_q].abs().sum() > 0
    opt.step()
    assert math.isfinite(loss.item())
