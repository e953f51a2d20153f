"""Smaller weights: int8 / fp8 / bf16 linear layers, their files (ours and the shared fp8 copies' layout), the
pipelines' ``weights=``, ``bitdance convert --weights``, ``bitdance eval weights`` and ``bench --memory``."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save
from torch import nn

from bitdance import BitDancePipeline
from bitdance.apps.cli import main
from bitdance.formats.quantized import stored_weights_format
from bitdance.formats.weights import CheckpointError
from bitdance.models.quantized import QuantizedLinear, quantize_, quantize_weight, weights_format

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
T2I = Path(os.environ.get("BITDANCE_T2I_REFERENCE_DIR", ROOT.parent / "shared" / "reference" / "official_t2i")) \
    / "t2i_p16_128x192" / "model"
T2I_KW = dict(height=128, width=192, num_inference_steps=2, output_type="latent")


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage,qmax", [(torch.int8, 127), (torch.float8_e4m3fn, 448)])
def test_quantized_weight_error_is_bounded_per_channel(storage, qmax):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.linspace(0.01, 3, 48)[:, None]  # channels of very different size
    w[5] = 0  # an all-zero channel stays zero (no division by zero)
    q, s = quantize_weight(w, storage)
    assert q.dtype == storage and s.shape == (48,) and s.dtype == torch.float32
    deq = q.float() * s[:, None]
    amax = w.abs().amax(1)
    assert torch.equal(deq[5], torch.zeros(96))
    assert torch.allclose(deq.abs().amax(1), amax, rtol=1e-6)  # the largest weight of a channel is kept exactly
    err = (deq - w).abs().amax(1)
    bound = amax / qmax / 2 if storage == torch.int8 else amax / 16  # e4m3: 3 mantissa bits
    assert torch.all(err <= bound + 1e-7)


@pytest.mark.parametrize("weights", ["int8", "fp8", "bf16"])
def test_layer_computes_with_its_stored_weight_and_keeps_it_through_to(weights):
    torch.manual_seed(0)
    lin = nn.Linear(80, 24)
    q = QuantizedLinear.from_linear(lin, {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[weights])
    x = torch.randn(5, 80)
    expected = nn.functional.linear(x, q.dequantized(), lin.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    assert (q(x) - lin(x)).abs().max() < 0.05  # and close to the full-precision layer
    stored = q.weight.dtype
    q.to(torch.bfloat16)
    assert q.weight.dtype == stored and q.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    if q.weight_scale is not None:
        assert q.weight_scale.dtype == torch.float32  # never rounded to the compute dtype
    assert q(x.bfloat16()).dtype == torch.bfloat16
    keys = set(q.state_dict())
    assert keys == ({"weight", "bias"} if weights == "bf16" else {"weight", "weight_scale", "bias"})


def test_layer_runs_under_no_grad_after_inference_mode():
    """The reused widening buffer, first made under torch.inference_mode, is written again under no_grad (a
    benchmark, then sampling, in one process)."""
    q = QuantizedLinear.from_linear(nn.Linear(96, 8), torch.int8)
    x = torch.randn(3, 96)
    with torch.inference_mode():
        first = q(x)
    with torch.no_grad():
        torch.testing.assert_close(q(x), first)


def test_layer_loads_per_tensor_and_column_scales():
    q = QuantizedLinear(8, 4, storage=torch.int8, bias=False)
    w = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    for scale in (torch.tensor(0.5), torch.full((4, 1), 0.5), torch.full((4,), 0.5)):
        q.load_state_dict({"weight": w, "weight_scale": scale})
        torch.testing.assert_close(q.dequantized(), w.float() * 0.5)
    with pytest.raises(RuntimeError, match="stored as torch.float8_e4m3fn"):
        q.load_state_dict({"weight": w.float().to(torch.float8_e4m3fn), "weight_scale": torch.ones(4)})


def test_quantize_skips_the_layers_that_read_the_bits_and_named_ones():
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 8)))
    assert quantize_(model, "int8", skip=("2.1",)) == 1
    assert isinstance(model[0], nn.Linear)  # 16 inputs: a token's bits
    assert isinstance(model[2][0], QuantizedLinear) and isinstance(model[2][1], nn.Linear)
    assert weights_format(model) == "int8"
    with pytest.raises(ValueError, match="weights='int4'"):
        quantize_(model, "int4")


# --------------------------------------------------------------------------------------------
# Class-conditional pipelines
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "model"
    pipe = tiny_pipeline()
    for p in pipe.model.parameters():  # non-zero head outputs: the condition and the weights matter
        if p.dim() == 2 and p.abs().sum() == 0:
            nn.init.normal_(p, std=0.1)
    pipe.save_pretrained(path)
    return path


def _sample(pipe, seed=0):
    return pipe([1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                output_type="latent").latents


@pytest.mark.parametrize("weights", ["int8", "fp8", "bf16"])
def test_class_conditional_weights_roundtrip_through_a_folder(folder, tmp_path, weights):
    full = BitDancePipeline.from_pretrained(folder)
    pipe = BitDancePipeline.from_pretrained(folder, weights=weights)
    assert weights_format(pipe.model) == weights and weights_format(pipe.tokenizer) is None
    lat = _sample(pipe)
    assert set(lat.unique().tolist()) <= {-1.0, 1.0}
    assert (lat == _sample(full)).float().mean() > 0.5  # the same model, give or take its rounding
    pipe.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["weights"] == {"generator": weights}
    stored = st_load(tmp_path / "q" / "generator.safetensors")
    assert stored["layers.0.attention.wqkv.weight"].dtype == pipe.model.layers[0].attention.wqkv.weight.dtype
    assert os.path.getsize(tmp_path / "q" / "generator.safetensors") < os.path.getsize(folder / "generator.safetensors")
    again = BitDancePipeline.from_pretrained(tmp_path / "q")
    assert weights_format(again.model) == weights
    assert torch.equal(_sample(again), lat)  # the stored weights are exactly the ones sampled with


def test_refusals(folder, tmp_path):
    with pytest.raises(ValueError, match="weights='int4'"):
        BitDancePipeline.from_pretrained(folder, weights="int4")
    BitDancePipeline.from_pretrained(folder, weights="fp8").save_pretrained(tmp_path / "fp8")
    with pytest.raises(CheckpointError, match="stored as fp8"):
        BitDancePipeline.from_pretrained(tmp_path / "fp8", weights="int8")
    from bitdance.formats.official import save_official_generator

    pipe = BitDancePipeline.from_pretrained(tmp_path / "fp8")
    with pytest.raises(CheckpointError, match="full-precision"):
        save_official_generator(tmp_path / "x.pt", pipe.model)
    assert not (tmp_path / "x.pt").exists()


def test_convert_and_sample_cli(folder, tmp_path, capsys):
    assert main(["convert", str(folder), str(tmp_path / "int8"), "--weights", "int8"]) == 0
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["weights"] == {"generator": "int8"}
    assert main(["convert", str(folder), str(tmp_path / "x.pt"), "--weights", "int8"]) == 2
    assert "writes a bitdance folder" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert main(["sample", str(folder), "--weights", "fp8", "--classes", "1", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_studio_loads_with_weights(folder):
    from bitdance.apps.cli import build_parser
    from bitdance.apps.studio import _load  # the loader serve calls for each --model

    assert build_parser().parse_args(["serve", "--model", str(folder), "--weights", "int8"]).weights == "int8"
    assert weights_format(_load(folder, None, "cpu", None, "int8").model) == "int8"


def test_eval_weights_cli(folder, tmp_path, capsys):
    out = tmp_path / "agreement.json"
    assert main(["eval", "weights", str(folder), "--classes", "1", "2", "--steps", "2", "--out", str(out),
                 "--classifier", "mnist"]) == 0
    report = json.loads(out.read_text())
    assert set(report["formats"]) == {"bf16", "full", "int8", "fp8"} and report["samples"] == 2
    for name in ("full", "int8", "fp8"):
        r = report["formats"][name]
        assert 0.0 <= r["token_agreement"] <= r["bit_agreement"] <= 1.0
        assert r["class_accuracy"] in (0.0, 0.5, 1.0)  # of 2 samples
    assert report["formats"]["int8"]["bytes"] < report["formats"]["bf16"]["bytes"] < report["formats"]["full"]["bytes"]
    assert "int8:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Text-to-image folders
# --------------------------------------------------------------------------------------------
def _t2i(path, **kw):
    return BitDancePipeline.from_pretrained(path, allow_any_resolution=True, dtype=torch.float32, **kw)


def _t2i_sample(pipe):
    return pipe(["a cat"], generator=torch.Generator().manual_seed(0), **T2I_KW).latents


@pytest.mark.parametrize("weights", ["int8", "fp8"])
def test_t2i_weights_roundtrip(tmp_path, weights):
    pipe = _t2i(T2I, weights=weights)
    m = pipe.model
    assert isinstance(m.llm.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert isinstance(m.vision_head.net.cond_embed, QuantizedLinear)
    assert isinstance(m.projector.fc1, nn.Linear)  # reads the 32 bits: kept
    lat = _t2i_sample(pipe)
    pipe.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["bitdance"]["weights"] == weights
    assert stored_weights_format([tmp_path / "q" / "model.safetensors"]) == weights
    again = _t2i(tmp_path / "q")
    assert weights_format(again.model) == weights
    assert torch.equal(_t2i_sample(again), lat)


def _fp8_copy(dst: Path) -> dict[str, torch.Tensor]:
    """The reference folder as the fp8 copies users share lay it out: several scale key names, per tensor and
    per channel, activation scales and tool metadata beside them, one layer cast without a scale."""
    shutil.copytree(T2I, dst)
    expected = {}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        sd = st_load(dst / shard)
        out = {}
        for i, (k, v) in enumerate(sorted(sd.items())):
            if not (k.endswith("proj.weight") and v.dim() == 2):
                out[k] = v
                continue
            layer = k[: -len(".weight")]
            if i % 3 == 0:  # a plain cast: no scale
                q = v.to(torch.float8_e4m3fn)
                out[k] = q
                expected[layer] = q.float()
                continue
            per_channel = i % 3 == 1
            s = (v.abs().amax(1) if per_channel else v.abs().amax()) / 448
            q = (v / (s[:, None] if per_channel else s)).to(torch.float8_e4m3fn)
            out[k] = q
            out[layer + (".weight_scale" if per_channel else ".scale_weight")] = s
            out[layer + ".input_scale"] = torch.tensor(1.0)
            out[layer + ".comfy_quant"] = torch.tensor([1], dtype=torch.uint8)
            expected[layer] = q.float() * (s[:, None] if per_channel else s)
        st_save(out, str(dst / shard))
    return expected


def test_t2i_loads_the_shared_fp8_layout(tmp_path):
    expected = _fp8_copy(tmp_path / "fp8")
    assert stored_weights_format([tmp_path / "fp8" / "model-00001-of-00003.safetensors",
                                  tmp_path / "fp8" / "model-00002-of-00003.safetensors",
                                  tmp_path / "fp8" / "model-00003-of-00003.safetensors"]) == "fp8"
    pipe = _t2i(tmp_path / "fp8")
    assert weights_format(pipe.model) == "fp8"
    mods = dict(pipe.model.llm.named_modules())
    assert len(expected) >= 6
    for layer, w in expected.items():
        assert torch.equal(mods[layer].dequantized(), w), layer  # q.float() * scale, exactly
    lat = _t2i_sample(pipe)
    assert set(lat.unique().tolist()) <= {-1.0, 1.0}


def test_t2i_bad_quantized_files_are_one_line_errors(tmp_path):
    _fp8_copy(tmp_path / "bad")
    shard = tmp_path / "bad" / "model-00001-of-00003.safetensors"
    sd = st_load(shard)
    key = next(k for k in sd if k.endswith(".weight_scale") or k.endswith(".scale_weight"))
    sd[key] = torch.ones(3)
    st_save(sd, str(shard))
    with pytest.raises(CheckpointError, match=r"weight scale of shape \(3,\)") as e:
        _t2i(tmp_path / "bad")
    assert "\n" not in str(e.value)
    sd[key] = torch.tensor(1.0)
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    st_save(sd, str(shard))
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        _t2i(tmp_path / "bad")


# --------------------------------------------------------------------------------------------
# bench --memory
# --------------------------------------------------------------------------------------------
def test_memory_bench_planning_and_refusals(capsys):
    from bitdance.apps.bench_memory import weight_bytes

    int8 = weight_bytes("BitDance-14B-64x", "int8") / 2**30
    bf16 = weight_bytes("BitDance-14B-64x", None) / 2**30
    assert 15 < int8 < 19 < 30 < bf16 < 34  # the 14B model: 34 GB in bf16 (release), about half in int8
    assert main(["bench", "--memory"]) == 2
    assert "give --model" in capsys.readouterr().err
    assert main(["bench", "--memory", "--random-weights", "--model", "BitDance-B-16x"]) == 2
    assert "--random-weights builds the shapes of" in capsys.readouterr().err
    assert main(["bench", "--random-weights"]) == 2  # the timing bench takes --weights (one storage), not this
    assert "--random-weights goes with --memory" in capsys.readouterr().err
    assert main(["bench", "--weights", "int4"]) == 2
    assert "the timing bench takes one storage" in capsys.readouterr().err
    assert main(["bench", "--memory", "--model", "BitDance-14B-64x", "--weights", "int4"]) == 2
    assert "memory option 'int4'" in capsys.readouterr().err
    assert main(["bench", "--memory", "--model", "BitDance-14B-64x", "--weights", "int8+swap"]) == 2


def test_memory_measure_on_a_small_stand_in(monkeypatch):
    from bitdance.apps import bench_memory
    from bitdance.models import presets

    small = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=700, max_position_embeddings=4096,
                 tie_word_embeddings=False)
    monkeypatch.setitem(presets.T2I_SHAPES, "small", {"llm": small, "parallel_num": 16, "tokenizer": "tiny-d16c16"})
    import bitdance.models.config as config

    orig = config.T2IConfig

    class Small(orig):
        def __init__(self, **kw):
            super().__init__(**{"head_width": 128, "head_depth": 1, "head_adaln": 1, "latent_dim": 16,
                                "allow_any_resolution": True, **kw})

    monkeypatch.setattr(config, "T2IConfig", Small)
    r = bench_memory.measure("small", weights="int8", random_weights=True, height=128, width=128, steps=2,
                             ar_steps=2, guidance_scale=2.0, dtype=torch.float32, decode=True)
    assert r["measured_ar_steps"] == 2 and r["ar_steps_per_image"] == 4
    assert r["load_peak_gib"] is None or r["load_peak_gib"] > 0
    assert r["projected_image_s"] >= r["first_step_s"] > 0
    assert torch.is_grad_enabled()  # measuring leaves the caller's autograd mode alone
    r = bench_memory.measure("small", weights="int8", random_weights=True, height=128, width=128, steps=2,
                             ar_steps=2, guidance_scale=2.0, dtype=torch.float32, decode=True, offload=True)
    assert r["offload"] and r["measured_ar_steps"] == 2 and "device_step_peak_gib" not in r  # a CPU: host peaks only


# --------------------------------------------------------------------------------------------
# Sequential offload (the copies are no-ops on a CPU; tests/test_devices.py runs it on a GPU)
# --------------------------------------------------------------------------------------------
def test_sequential_offload_visits_each_unit_once_per_use():
    from bitdance.offload import offloaded_units

    pipe = _t2i(T2I, offload=("sequential",), device="cpu", weights="int8")
    units = offloaded_units(pipe.model)
    n_layers = len(pipe.model.llm.model.layers)
    assert len(units) == n_layers + 2  # layers, head, image tokenizer
    out = pipe(["a cat"], generator=torch.Generator().manual_seed(0), height=128, width=192, num_inference_steps=2)
    ar_steps = (8 * 12) // 16
    assert [u.visits for u in units[:n_layers]] == [ar_steps] * n_layers  # prefill + each fed-back block
    assert units[n_layers].visits == ar_steps and units[-1].visits == 1  # head per AR step; one decode
    assert out.images[0].size == (192, 128)
    q = _t2i(T2I, weights="int8")
    same = q(["a cat"], generator=torch.Generator().manual_seed(0), **T2I_KW).latents
    assert torch.equal(_t2i_sample(pipe), same)
    with pytest.raises(ValueError, match="needs the device"):
        _t2i(T2I, offload=("sequential",))
