"""Text-to-image training (bitdance.models.t2i): packed batches, the training loss, 16x -> 64x-style distillation.

Tiny random Qwen3 model (hidden 64, 2 layers), P = 4, any resolution that is a multiple of 32 px.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bitdance.formats.t2i_folder import load_folder
from bitdance.models.config import T2IConfig
from bitdance.models.t2i import BitDanceT2I, additive_mask, query_token, special_tokens, t2i_attention_mask
from bitdance.sampling.flow import FlowSampler
from bitdance.training.t2i_packing import (
    IGNORE_INDEX,
    distill_from,
    pack_batch,
    packed_head_condition,
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
    from bitdance.models.transformer import generation_order

    inp = model.build_inputs([prompt], h, w)
    tokens = lat.reshape(D, h * w).t()[generation_order(h, w, model.config.patch_size)][None]
    pe = model.image_pos_embed(h, w)
    embeds = torch.cat([model.llm.get_input_embeddings()(inp.input_ids),
                        model.embed_image_tokens(tokens[:, :-Pn], pe[:-Pn])], 1)
    T = embeds.shape[1]
    valid = torch.cat([inp.valid, torch.ones(1, T - inp.valid.shape[1], dtype=torch.bool)], 1)
    mask = additive_mask(t2i_attention_mask(valid, inp.num_causal, Pn), embeds.dtype)
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
        text = model.text_ids(model.prompt_text(prompt))
        st = starts[s]
        assert ids[st:st + len(text)].tolist() == text
        assert lab[st:st + len(text) - 1].tolist() == text[1:]
    n_text = sum(len(model.text_ids(model.prompt_text(p))) - 1 for p, _ in samples)
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
    uncond = model.text_ids(model.prompt_text(None))
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


# --------------------------------------------------------------------------------------------
# The `t2i` task of bitdance.training: a tiny synthetic captioned image folder, mixed resolutions
# --------------------------------------------------------------------------------------------
TASK_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 512}
TASK_T2I = {"parallel_num": 4, "head_width": 32, "head_depth": 2, "head_adaln": 2, "head_dim": 16,
            "max_res_tokens": 16}


@pytest.fixture(scope="module")
def t2i_files(tmp_path_factory):
    """Image folder (3 classes x 3 images, 32 px, one sidecar caption), a character-level HF tokenizer
    folder, and an untrained 4x-down, 16-bit binary tokenizer folder."""
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bitdance.formats.folders import save_tokenizer_folder
    from bitdance.models.config import TokenizerConfig
    from bitdance.models.tokenizer import BinaryTokenizer

    root = tmp_path_factory.mktemp("t2i_task")
    for k, (name, col) in enumerate([("red_square", (230, 20, 20)), ("blue_bar", (20, 20, 230)),
                                     ("green_dot", (20, 200, 20))]):
        (root / "data" / name).mkdir(parents=True)
        for i in range(3):
            a = np.full((32, 32, 3), 255, np.uint8)
            a[8 + i:24, 4 * k + 4:28 - i] = col
            Image.fromarray(a).save(root / "data" / name / f"{i}.png")
    (root / "data" / "red_square" / "0.txt").write_text("a large red square")
    chars = ["<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    fast.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"],
                    special_tokens=True)
    fast.save_pretrained(str(root / "texttok"))
    torch.manual_seed(0)
    ae = BinaryTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=16, groups=2))
    save_tokenizer_folder(ae, root / "ae")
    return root


def t2i_cfg(files, out, **kw):
    from bitdance.training.config import TrainConfig

    base = dict(task="t2i", out=str(out), data=str(files / "data"), split=None, image_size=32,
                tokenizer=str(files / "ae"), text_tokenizer=str(files / "texttok"), llm_config=dict(TASK_LLM),
                model_overrides=dict(TASK_T2I), resolutions="32x32:1,16x32:1", steps=4, batch_size=4,
                micro_batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=0.9, precision="fp32", log_every=1,
                ckpt_every=0, progress=False, final_samples=False, cache_dir=str(files / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_t2i_task_trains_resumes_and_exports(t2i_files, tmp_path):
    from bitdance.formats.weights import load_file
    from bitdance.training.t2i import dataset_captions
    from bitdance.training.trainer import Trainer, train

    full = train(t2i_cfg(t2i_files, tmp_path / "full"))
    assert full["steps"] == 4 and math.isfinite(full["final"]["loss"])
    assert {"vision", "text", "grad_norm"} <= set(full["final"])
    # The same run killed after 2 steps and resumed: identical weights, EMA and metrics.
    killed = Trainer(t2i_cfg(t2i_files, tmp_path / "split"))
    for _ in range(2):
        killed.train_step()
    killed.save_checkpoint()  # what the periodic checkpoint of a run killed at step 2 leaves
    del killed
    tr = Trainer(t2i_cfg(t2i_files, tmp_path / "split", resume=True))
    assert tr.step == 2
    # Mixed resolutions: both sizes were encoded (latent cache) and packed with their own res tokens.
    assert set(tr.task.latents) == {(32, 32), (16, 32)}
    assert {tuple(v.shape[2:]) for v in tr.task.latents.values()} == {(8, 8), (4, 8)}
    assert "a large red square" in dataset_captions(tr.task.data)
    tr.fit()
    a, b = load_file(tmp_path / "full" / "checkpoint.pt"), load_file(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in a["history"][2:]] == [r["loss"] for r in b["history"]]  # steps 3, 4
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # The export is a released-layout folder (EMA weights) that from_folder loads and generates from.
    folder = tmp_path / "full" / "model"
    head_json = json.loads((folder / "vision_head_config.json").read_text())
    assert head_json["parallel_num"] == 4 and head_json["down_factor"] == 4 and head_json["ch_target"] == 16
    assert not any(p.name.startswith(".") for p in (tmp_path / "full").iterdir() if p.is_dir())
    model = load_folder(folder, allow_any_resolution=True, max_res_tokens=16)
    # ... and the pipeline loads it with its own settings, no overrides needed
    from bitdance.pipelines.class_conditional import BitDancePipeline

    pipe = BitDancePipeline.from_pretrained(folder)
    assert pipe.kind == "text_to_image" and pipe.config.max_res_tokens == 16
    assert pipe.meta["step"] == 4
    img = pipe("blue bar", height=16, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 16, 32, 3)
    for k, v in a["ema"].items():
        if k.startswith("net.projector."):
            torch.testing.assert_close(model.projector.state_dict()[k.removeprefix("net.projector.")], v)
    g = torch.Generator().manual_seed(0)
    lat = model.generate(["a large red square", "blue bar"], height=16, width=32, guidance_scale=2.0,
                         sampler=FlowSampler(num_steps=2), generator=g)
    assert lat.shape == (2, 16, 4, 8) and set(lat.unique().tolist()) <= {-1.0, 1.0}
    assert model.decode(lat).shape == (2, 3, 16, 32)


def test_t2i_task_distills_into_larger_patches(t2i_files, tmp_path):
    from bitdance.models.t2i import query_token
    from bitdance.training.trainer import Trainer

    train(t2i_cfg(t2i_files, tmp_path / "p4", steps=1, resolutions="32x32"))
    teacher = load_folder(tmp_path / "p4" / "model", allow_any_resolution=True, max_res_tokens=16)
    over = {"parallel_num": 16, "max_res_tokens": 16, "allow_any_resolution": True}
    cfg = t2i_cfg(t2i_files, tmp_path / "p16", steps=2, resolutions="32x32", model_overrides=over,
                  distill_from=str(tmp_path / "p4" / "model"), llm_config={}, text_tokenizer="", tokenizer="")
    tr = Trainer(cfg)
    net = tr.model.net
    assert net.config.parallel_num == 16 and tr.task.tokenizer.down_factor == 4
    for a, b in [(teacher.vision_head, net.vision_head), (teacher.projector, net.projector)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    summary = tr.fit()
    assert summary["steps"] == 2 and math.isfinite(summary["final"]["loss"])
    student = load_folder(tmp_path / "p16" / "model", allow_any_resolution=True, max_res_tokens=16)
    assert student.config.parallel_num == 16 and query_token(15) in student.text_tokenizer.get_vocab()
    lat = student.generate(["green dot"], height=32, width=32, sampler=FlowSampler(num_steps=2),
                           generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 16, 8, 8)


def train(cfg):
    from bitdance.training.trainer import train as _train

    return _train(cfg)


def _cli_error(capsys, argv):
    from bitdance.training.trainer import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert err[-1].startswith("bitdance training: error: ") and not any("Traceback" in e for e in err)
    return err[-1]


def test_t2i_task_bad_inputs_give_one_line_errors(t2i_files, tmp_path, capsys):
    import json as _json

    common = ["t2i", "--image-size", "32", "--tokenizer", str(t2i_files / "ae"), "--text-tokenizer",
              str(t2i_files / "texttok"), "--llm-config", _json.dumps(TASK_LLM), "--model-overrides",
              _json.dumps(TASK_T2I), "--steps", "1", "--batch-size", "2", "--no-progress", "--precision", "fp32",
              "--cache-dir", str(t2i_files / "cache"), "--no-final-samples"]
    msg = _cli_error(capsys, common + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert "not found" in msg
    data = ["--data", str(t2i_files / "data"), "--split", "none"]
    msg = _cli_error(capsys, ["t2i"] + data + ["--out", str(tmp_path / "b"), "--tokenizer", str(t2i_files / "ae")])
    assert "needs an LLM" in msg
    msg = _cli_error(capsys, common + data + ["--out", str(tmp_path / "c"), "--resolutions", "30x30"])
    assert "30x30" in msg
    # Resume from a foreign checkpoint: another task's, then a file that is no checkpoint at all.
    out = tmp_path / "d"
    out.mkdir()
    torch.save({"format": "bitdance-train", "task": "generator", "model_config": {}, "step": 3}, out / "checkpoint.pt")
    msg = _cli_error(capsys, common + data + ["--out", str(out), "--resume"])
    assert "different task/model config" in msg
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    msg = _cli_error(capsys, common + data + ["--out", str(out), "--resume"])
    assert "checkpoint.pt" in msg
    # `bitdance train-t2i` is the same entry point.
    from bitdance.apps.cli import main as cli_main

    assert cli_main(["train-t2i"] + common[1:] + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bitdance train-t2i: error: ") and "not found" in err[-1]
