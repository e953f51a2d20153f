"""Loading and saving weights (official layout and our folders), and refusing bad input.

Every model here is tiny (BitDance-T-4x at 64x64 with the tiny-d16c16 tokenizer: a 4x4 token grid,
4 AR steps), so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, CheckpointError, bitdance_preset
from bitdance.files import atomic_write, save_safetensors
from bitdance.formats.official import (
    load_official_generator,
    load_tokenizer,
    save_official_generator,
    save_official_tokenizer,
)
from bitdance.formats.weights import load_file
from bitdance.images import to_uint8
from bitdance.models.config import BitDanceConfig, ConfigError, TokenizerConfig
from bitdance.models.presets import tokenizer_preset
from bitdance.pipelines.base import PipelineOutput

SIZE = 64
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def tiny_config(**overrides) -> BitDanceConfig:
    kw = {"image_size": SIZE, "num_classes": NUM_CLASSES, "cls_token_num": 4, "tokenizer": "tiny-d16c16"}
    kw.update(overrides)
    return bitdance_preset("BitDance-T-4x", **kw)


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter (the head's output layer starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def make_generator(seed: int = 0, **overrides) -> BitDance:
    torch.manual_seed(seed)
    return perturb(BitDance(tiny_config(**overrides)), seed + 1000)


def make_tokenizer(seed: int = 0, cfg: TokenizerConfig | None = None) -> BinaryTokenizer:
    torch.manual_seed(seed)
    return perturb(BinaryTokenizer(cfg or tokenizer_preset("tiny-d16c16")), seed + 2000)


def make_pipeline(seed: int = 0) -> BitDancePipeline:
    return BitDancePipeline(make_generator(seed), make_tokenizer(seed))


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def sample(pipe: BitDancePipeline, seed: int = 0, output_type: str = "np", labels=(1, 2)) -> PipelineOutput:
    return pipe(list(labels), num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                output_type=output_type)


def raises_one_line(exc_type, fn, *needles):
    """Call ``fn``; it must raise ``exc_type`` with a one-line message containing every needle."""
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, f"multi-line error message: {msg!r}"
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message {msg!r}"
    return msg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------
# Shared files (written once per module)
# --------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_generator(0)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(0)


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory, model, tok) -> Path:
    path = tmp_path_factory.mktemp("official") / "BitDance_T_4x.pt"
    save_official_generator(path, model, tok, epochs=7)
    return path


@pytest.fixture(scope="module")
def official_state(official_pt) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(official_pt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_images(model, tok):
    return sample(BitDancePipeline(model, tok), seed=0).images


# --------------------------------------------------------------------------------------------
# 1. Official-format round trips
# --------------------------------------------------------------------------------------------
def test_official_generator_round_trip(official_pt, model, tok):
    gen, tokenizer, info = load_official_generator(official_pt)
    assert gen.config == model.config
    assert tokenizer is not None and tokenizer.config == tok.config
    assert_same_state(gen, model)
    assert_same_state(tokenizer, tok)
    assert info["weights"] == "ema" and info["epochs"] == 7
    assert info["args"]["image_size"] == SIZE and info["args"]["num_classes"] == NUM_CLASSES
    assert not gen.training and not tokenizer.training


def test_official_file_layout(official_state, model, tok):
    assert set(official_state) == {"model", "ema", "epochs", "args"}
    assert isinstance(official_state["args"], argparse.Namespace)
    sd = official_state["model"]
    assert {k for k in sd if not k.startswith("vae.")} == set(model.state_dict())
    assert {k[4:] for k in sd if k.startswith("vae.")} == set(tok.state_dict())


def test_official_generator_without_tokenizer(tmp_path, model):
    path = tmp_path / "gen_only.pt"
    save_official_generator(path, model)
    gen, tokenizer, _ = load_official_generator(path)
    assert tokenizer is None
    assert_same_state(gen, model)
    # Without vae.* the tokenizer architecture is unknown; everything else must match.
    assert gen.config.latent_dim == model.config.latent_dim
    assert gen.config.replace(tokenizer=model.config.tokenizer) == model.config


def test_use_ema_false_picks_model_weights(tmp_path, model, tok):
    ema = make_generator(5)
    assert differs(ema, model)
    path = tmp_path / "with_ema.pt"
    save_official_generator(path, model, tok, ema=ema)

    gen_ema, _, info_ema = load_official_generator(path)
    gen_model, _, info_model = load_official_generator(path, use_ema=False)
    assert info_ema["weights"] == "ema" and info_model["weights"] == "model"
    assert_same_state(gen_ema, ema)
    assert_same_state(gen_model, model)

    pipe = BitDancePipeline.from_pretrained(path, use_ema=False)
    assert_same_state(pipe.model, model)
    assert_same_state(BitDancePipeline.from_pretrained(path).model, ema)


def test_checkpoint_without_ema_falls_back_to_model(tmp_path, official_state, model, tok):
    path = tmp_path / "no_ema.pt"
    torch.save({"model": official_state["model"], "epochs": 3, "args": official_state["args"]}, path)
    gen, tokenizer, info = load_official_generator(path)  # use_ema=True by default
    assert info["weights"] == "model" and info["epochs"] == 3
    assert_same_state(gen, model)
    assert_same_state(tokenizer, tok)


def test_bare_generator_state_dict_safetensors(tmp_path, official_state, model, tok):
    path = tmp_path / "bare.safetensors"
    save_safetensors(official_state["ema"], path)
    gen, tokenizer, info = load_official_generator(path)
    assert info["weights"] == "state_dict"
    assert gen.config == model.config
    assert_same_state(gen, model)
    assert_same_state(tokenizer, tok)


@pytest.mark.parametrize("name", ["ae_tiny.pt", "ae_tiny.safetensors"])
def test_official_tokenizer_round_trip(tmp_path, tok, name):
    path = tmp_path / name
    save_official_tokenizer(path, tok)
    if path.suffix == ".safetensors":
        side = json.loads((tmp_path / "ae_tiny_config.json").read_text())
        assert side == {"ddconfig": tok.config.ddconfig, "gan_decoder": False}
        assert set(safetensors.torch.load_file(path)) == set(tok.state_dict())
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"state_dict"}
    loaded = load_tokenizer(path)
    assert loaded.config == tok.config
    assert_same_state(loaded, tok)
    assert not loaded.training


def test_load_tokenizer_from_generator_checkpoint(official_pt, tok):
    loaded = load_tokenizer(official_pt)
    assert loaded.config == tok.config
    assert_same_state(loaded, tok)


def test_load_tokenizer_from_pipeline_folder(tmp_path, model, tok):
    BitDancePipeline(model, tok).save_pretrained(tmp_path / "m")
    loaded = load_tokenizer(tmp_path / "m")
    assert loaded.config == tok.config
    assert_same_state(loaded, tok)


def test_loaded_tokenizer_codes_match(tmp_path, tok):
    save_official_tokenizer(tmp_path / "t.safetensors", tok)
    loaded = load_tokenizer(tmp_path / "t.safetensors")
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = tok.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), tok.decode(z))


# Fields that change what the model computes but that the official layout does not carry.
@pytest.mark.parametrize("field,value", [("n_head", 4), ("class_dropout_prob", 0.3), ("order", "raster")])
def test_official_round_trip_keeps_non_default_config(tmp_path, tok, field, value):
    model = make_generator(0, **{field: value})
    path = tmp_path / "custom.pt"
    save_official_generator(path, model, tok)
    gen, _, _ = load_official_generator(path)
    assert getattr(gen.config, field) == value
    assert gen.config == model.config


def test_official_round_trip_keeps_recorded_hyperparameters(tmp_path, tok):
    model = make_generator(0, perturb_rate=0.25, time_shift=2.5, P_mean=-0.5, P_std=1.1, diff_batch_mul=2,
                           time_schedule="uniform")
    path = tmp_path / "hp.pt"
    save_official_generator(path, model, tok)
    gen, _, _ = load_official_generator(path)
    assert gen.config == model.config


# --------------------------------------------------------------------------------------------
# 2. Pipeline
# --------------------------------------------------------------------------------------------
def test_pipeline_from_official_pt(official_pt, model, tok, reference_images):
    pipe = BitDancePipeline.from_pretrained(official_pt)
    assert pipe.config == model.config
    assert_same_state(pipe.model, model)
    assert_same_state(pipe.tokenizer, tok)
    assert pipe.meta["source"] == str(official_pt) and pipe.meta["epochs"] == 7
    images = sample(pipe, seed=0).images
    assert isinstance(images, np.ndarray)
    assert images.dtype == np.uint8 and images.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(images, reference_images)


def test_pipeline_seeds(official_pt):
    pipe = BitDancePipeline.from_pretrained(official_pt)
    a, b, c = (sample(pipe, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.images, b.images)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images[0], a.images[1])  # different classes / noise per row


def test_pipeline_with_separate_tokenizer_file(tmp_path, official_pt, model):
    other = make_tokenizer(9)
    path = tmp_path / "ae_other.safetensors"
    save_official_tokenizer(path, other)
    pipe = BitDancePipeline.from_pretrained(official_pt, tokenizer=path)
    assert_same_state(pipe.tokenizer, other)
    assert_same_state(pipe.model, model)
    np.testing.assert_array_equal(sample(pipe).images, sample(BitDancePipeline(model, other)).images)

    # A generator file without vae.* needs tokenizer=...
    gen_only = tmp_path / "gen_only.pt"
    save_official_generator(gen_only, model)
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(gen_only),
                    gen_only, "tokenizer")
    pipe2 = BitDancePipeline.from_pretrained(gen_only, tokenizer=path)
    assert_same_state(pipe2.tokenizer, other)

    # ... and a folder accepts an override too.
    pipe.save_pretrained(tmp_path / "folder")
    tpt = tmp_path / "ae_tok.pt"
    save_official_tokenizer(tpt, make_tokenizer(0))
    pipe3 = BitDancePipeline.from_pretrained(tmp_path / "folder", tokenizer=tpt)
    assert_same_state(pipe3.tokenizer, make_tokenizer(0))


def test_generator_only_file_with_non_default_tokenizer(tmp_path):
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=NUM_CLASSES, cls_token_num=4,
                          tokenizer="tiny-d4c16")
    torch.manual_seed(0)
    gen, tok4 = BitDance(cfg).eval(), BinaryTokenizer(cfg.tokenizer).eval()
    save_official_generator(tmp_path / "gen.pt", gen)
    save_official_tokenizer(tmp_path / "ae_d4.pt", tok4)
    pipe = BitDancePipeline.from_pretrained(tmp_path / "gen.pt", tokenizer=tmp_path / "ae_d4.pt")
    assert pipe.config.image_size == 32 and pipe.config.down_size == 4
    assert_same_state(pipe.model, gen)


def test_save_pretrained_round_trip(tmp_path, official_pt):
    pipe = BitDancePipeline.from_pretrained(official_pt)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generator.safetensors",
                                                         "tokenizer.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "bitdance" and cfg["kind"] == "class_conditional"
    again = BitDancePipeline.from_pretrained(folder)
    assert again.config == pipe.config
    assert again.tokenizer.config == pipe.tokenizer.config
    assert_same_state(again.model, pipe.model)
    assert_same_state(again.tokenizer, pipe.tokenizer)
    assert again.meta == pipe.meta
    for seed in (0, 3):
        np.testing.assert_array_equal(sample(again, seed).images, sample(pipe, seed).images)

    # Saving again over the folder is stable (same bytes for the weights).
    before = snapshot(folder)
    again.save_pretrained(folder)
    after = snapshot(folder)
    assert before["generator.safetensors"] == after["generator.safetensors"]
    assert before["tokenizer.safetensors"] == after["tokenizer.safetensors"]
    assert json.loads(before["config.json"]) == json.loads(after["config.json"])


def test_output_types(model, tok):
    pipe = BitDancePipeline(model, tok)
    lat = sample(pipe, output_type="latent")
    assert isinstance(lat.images, torch.Tensor) and lat.images.shape == (2, 16, 4, 4)
    assert set(lat.images.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(lat.images, lat.latents)

    pt = sample(pipe, output_type="pt")
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (2, 3, SIZE, SIZE)
    assert pt.images.dtype == torch.float32
    assert pt.images.min() >= -1 and pt.images.max() <= 1
    assert torch.equal(pt.latents, lat.latents)

    arr = sample(pipe, output_type="np").images
    np.testing.assert_array_equal(arr, to_uint8(pt.images).numpy())

    pil = sample(pipe, output_type="pil").images
    assert isinstance(pil, list) and len(pil) == 2
    for im, a in zip(pil, arr):
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), a)

    one = pipe(3, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert one.images.shape == (1, SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------------
# 3. Bad input
# --------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(missing), missing)
    raises_one_line(CheckpointError, lambda: load_official_generator(missing), missing)
    raises_one_line(CheckpointError, lambda: load_tokenizer(missing), missing)
    raises_one_line(CheckpointError, lambda: load_file(tmp_path / "nope.safetensors"), "nope.safetensors")
    assert issubclass(CheckpointError, ValueError)


def test_directory_without_config(tmp_path, model):
    folder = tmp_path / "empty"
    folder.mkdir()
    save_safetensors(model.state_dict(), folder / "generator.safetensors")
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), folder, "config.json")
    raises_one_line(CheckpointError, lambda: load_tokenizer(folder), folder, "config.json")
    raises_one_line(CheckpointError, lambda: load_file(folder), folder, "directory")


def test_folder_missing_weights(tmp_path, model, tok):
    folder = tmp_path / "m"
    BitDancePipeline(model, tok).save_pretrained(folder)
    (folder / "tokenizer.safetensors").unlink()
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder),
                    folder / "tokenizer.safetensors")


@pytest.mark.parametrize("damage", ["random", "truncated", "garbled_header"])
def test_corrupt_pt(tmp_path, official_pt, damage):
    good = official_pt.read_bytes()
    rng = np.random.default_rng(0)
    if damage == "random":
        data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif damage == "truncated":
        data = good[: len(good) // 2]
    else:
        b = bytearray(good)
        b[64:256] = rng.integers(0, 256, 192, dtype=np.uint8).tobytes()
        data = bytes(b)
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    raises_one_line(CheckpointError, lambda: load_official_generator(path), path)
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(path), path)
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path)


def test_random_bytes_pt_is_reported_as_corrupt(tmp_path):
    """Garbage is 'corrupt', not a refused pickle; the message carries torch's detail, not its advice."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = raises_one_line(CheckpointError, lambda: load_file(path), path, "corrupt")
    assert "refusing" not in msg and "weights_only" not in msg


def test_truncated_safetensors(tmp_path, tok):
    path = tmp_path / "ae.safetensors"
    save_official_tokenizer(path, tok)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path, "safetensors")
    raises_one_line(CheckpointError, lambda: load_file(path), path)

    path.write_bytes(data[:5])  # shorter than the header length field
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path)


def test_truncated_safetensors_in_folder(tmp_path, model, tok):
    folder = tmp_path / "m"
    BitDancePipeline(model, tok).save_pretrained(folder)
    w = folder / "generator.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), w)


def test_random_bytes_named_safetensors(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path, "safetensors")
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(path), path)
    raises_one_line(CheckpointError, lambda: load_official_generator(path), path)


# A pickle payload: if unpickling ever executed it, the marker file would appear.
_MARKER_ENV = "BITDANCE_TEST_PWNED_MARKER"


def _side_effect(path: str) -> int:
    Path(path).write_text("executed")
    return 0


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


class StatefulPayload:
    """Pickled as GLOBAL + BUILD; __setstate__ would run on load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("executed")
        self.__dict__.update(state)


@pytest.mark.parametrize("payload_cls", [Payload, StatefulPayload])
def test_pickle_with_foreign_object_is_refused(tmp_path, official_state, payload_cls):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    # A checkpoint that looks official, plus one object outside the allow-list.
    torch.save({"model": official_state["model"], "args": official_state["args"],
                "extra": payload_cls(str(marker))}, path)
    assert not marker.exists()
    for fn in (lambda: load_official_generator(path), lambda: BitDancePipeline.from_pretrained(path),
               lambda: load_tokenizer(path), lambda: load_file(path)):
        raises_one_line(CheckpointError, fn, path)
        assert not marker.exists(), "unpickling executed code from the file"


@pytest.mark.parametrize("payload_cls,global_name", [(Payload, "_side_effect"),
                                                     (StatefulPayload, "StatefulPayload")])
def test_pickle_refusal_names_the_global(tmp_path, payload_cls, global_name):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"x": payload_cls(str(marker))}, path)
    msg = raises_one_line(CheckpointError, lambda: load_file(path), path, "refusing", global_name)
    assert "\x1b" not in msg and "corrupt" not in msg
    assert not marker.exists()


def _resnet_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(16, 3, 7, 7, generator=g),
        "bn1.weight": torch.ones(16), "bn1.bias": torch.zeros(16),
        "bn1.running_mean": torch.zeros(16), "bn1.running_var": torch.ones(16),
        "layer1.0.conv1.weight": torch.randn(16, 16, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 16, generator=g), "fc.bias": torch.zeros(10),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_foreign_state_dict(tmp_path, suffix):
    path = tmp_path / f"resnet{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(_resnet_like(), str(path))
    else:
        torch.save(_resnet_like(), path)
    raises_one_line(CheckpointError, lambda: load_official_generator(path), path, "not a BitDance")
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(path), path, "not a BitDance")
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path, "not a BitDance")


def test_foreign_training_checkpoint_and_non_dict(tmp_path):
    path = tmp_path / "other_train.pt"
    torch.save({"model": _resnet_like(), "epochs": 1}, path)
    raises_one_line(CheckpointError, lambda: load_official_generator(path), path, "not a BitDance",
                    "emb_norm.weight")
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path, "not a BitDance")

    path2 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path2)
    raises_one_line(CheckpointError, lambda: load_official_generator(path2),
                    path2, "not a BitDance", "Tensor")
    raises_one_line(CheckpointError, lambda: load_tokenizer(path2), path2, "not a BitDance")


def _edit(sd: dict, edit: str) -> tuple[dict, str]:
    sd = dict(sd)
    if edit == "shape":
        key = "layers.1.feed_forward.w2.weight"
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    elif edit == "missing":
        key = "layers.1.attention.wo.weight"
        del sd[key]
    else:
        key = "bogus.extra_weight"
        sd[key] = torch.zeros(3)
    return sd, key


@pytest.mark.parametrize("edit", ["shape", "missing", "extra"])
def test_generator_checkpoint_does_not_fit(tmp_path, official_state, edit):
    sd, key = _edit(official_state["ema"], edit)
    path = tmp_path / "broken.pt"
    torch.save({**official_state, "ema": sd}, path)
    raises_one_line(CheckpointError, lambda: load_official_generator(path), path.name, key)
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(path), key)
    # The intact "model" weights still load.
    load_official_generator(path, use_ema=False)


@pytest.mark.parametrize("edit", ["shape", "missing", "extra"])
def test_folder_generator_does_not_fit(tmp_path, model, tok, edit):
    folder = tmp_path / "m"
    BitDancePipeline(model, tok).save_pretrained(folder)
    sd, key = _edit(safetensors.torch.load_file(folder / "generator.safetensors"), edit)
    safetensors.torch.save_file(sd, str(folder / "generator.safetensors"))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), key,
                    folder / "generator.safetensors")


@pytest.mark.parametrize("edit", ["shape", "missing", "extra"])
def test_tokenizer_file_does_not_fit(tmp_path, tok, edit):
    sd = dict(tok.state_dict())
    if edit == "shape":
        key = "decoder.conv_out.bias"
        sd[key] = torch.zeros(4)  # out_ch is inferred from decoder.conv_out.weight
    elif edit == "missing":
        key = "decoder.norm_out.weight"
        del sd[key]
    else:
        key = "encoder.extra.weight"
        sd[key] = torch.zeros(2)
    path = tmp_path / "ae.pt"
    torch.save({"state_dict": sd}, path)
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path.name, key)


def test_tokenizer_missing_architecture_key(tmp_path, tok):
    key = "encoder.down.1.block.0.conv2.weight"
    sd = {k: v for k, v in tok.state_dict().items() if k != key}
    path = tmp_path / "ae.pt"
    torch.save({"state_dict": sd}, path)
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), path, key)


def test_bad_config_json(tmp_path, model, tok):
    folder = tmp_path / "m"
    BitDancePipeline(model, tok).save_pretrained(folder)
    cfg_path = folder / "config.json"
    good = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**good, "format": "diffusers"}))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), cfg_path, "diffusers")
    raises_one_line(CheckpointError, lambda: load_tokenizer(folder), cfg_path, "format")

    cfg_path.write_text(json.dumps([1, 2]))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), cfg_path)

    cfg_path.write_text('{"format": "bitdance", "generator": {')
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder),
                    cfg_path, "invalid JSON")

    bad_gen = {**good["generator"], "wings": 2}
    cfg_path.write_text(json.dumps({**good, "generator": bad_gen}))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), "wings", "generator")

    bad_gen = {**good["generator"], "image_size": 72}
    cfg_path.write_text(json.dumps({**good, "generator": bad_gen}))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), "image_size=72")

    cfg_path.write_text(json.dumps({**good, "kind": "text_to_image"}))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), "text_to_image")

    no_tok = {k: v for k, v in good.items() if k != "tokenizer"}
    cfg_path.write_text(json.dumps(no_tok))
    raises_one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(folder), folder, "tokenizer")


def test_bad_tokenizer_sidecar(tmp_path, tok):
    path = tmp_path / "ae.safetensors"
    save_official_tokenizer(path, tok)
    side = tmp_path / "ae_config.json"
    side.write_text("{not json")
    raises_one_line(CheckpointError, lambda: load_tokenizer(path), side, "invalid JSON")


def test_unknown_preset():
    msg = raises_one_line(ConfigError, lambda: bitdance_preset("BitDance-X-4x"), "BitDance-X-4x")
    assert "BitDance-B-1x" in msg and "BitDance-T-4x" in msg
    raises_one_line(ConfigError, lambda: bitdance_preset("DiT-T-4x"), "DiT-T-4x")
    msg = raises_one_line(ConfigError, lambda: tokenizer_preset("d99c1"), "d99c1")
    assert "tiny-d16c16" in msg and "d16c32" in msg
    raises_one_line(ConfigError, lambda: tiny_config(wings=3), "wings")


def test_impossible_resolution():
    raises_one_line(ConfigError, lambda: tiny_config(image_size=72), "image_size=72", "16")
    # 48 / 16 = 3: a 3x3 grid cannot be cut into the 2x2 patches of a 4x model.
    raises_one_line(ConfigError, lambda: tiny_config(image_size=48), "3x3", "parallel_num=4")
    # An 8x8 grid does cut into 4x4 patches: valid.
    cfg = bitdance_preset("BitDance-T-16x", image_size=32, tokenizer="tiny-d4c16")
    assert cfg.grid_size == 8 and cfg.num_steps == 4
    raises_one_line(ConfigError,
                    lambda: bitdance_preset("BitDance-T-64x", image_size=40, tokenizer="tiny-d4c16"),
                    "10x10", "parallel_num=64")
    raises_one_line(ConfigError, lambda: tiny_config(parallel_num=3), "parallel_num=3")


def test_pipeline_bad_arguments(model, tok):
    pipe = BitDancePipeline(model, tok)
    g = torch.Generator().manual_seed(0)

    def call(labels=(1,), **kw):
        return pipe(list(labels), num_inference_steps=2, generator=g, **kw)

    raises_one_line(ValueError, lambda: call(height=32), "height=32", f"{SIZE}x{SIZE}")
    raises_one_line(ValueError, lambda: call(width=128), "width=128")
    raises_one_line(ValueError, lambda: call((1, NUM_CLASSES)), f"[1, {NUM_CLASSES}]", f"{NUM_CLASSES - 1}")
    raises_one_line(ValueError, lambda: call((-1,)), "-1")
    raises_one_line(ValueError, lambda: call(()), "empty")
    raises_one_line(ValueError, lambda: call(output_type="jpeg"), "'jpeg'")
    # The right size given explicitly is fine.
    assert call(height=SIZE, width=SIZE, output_type="latent").images.shape == (1, 16, 4, 4)


def test_tokenizer_bad_images(tok):
    raises_one_line(ValueError, lambda: tok.encode(torch.zeros(1, 1, SIZE, SIZE)),
                    "(1, 1, 64, 64)", "(B, 3, H, W)")
    raises_one_line(ValueError, lambda: tok.encode(torch.zeros(3, SIZE, SIZE)), "(3, 64, 64)")
    raises_one_line(ValueError, lambda: tok.encode(torch.zeros(1, 3, 40, 40)), "40x40", "16")
    raises_one_line(ValueError, lambda: tok.decode(torch.zeros(1, 8, 4, 4)), "(1, 8, 4, 4)")


def test_pipeline_mismatched_tokenizer(model):
    wide = BinaryTokenizer(tokenizer_preset("tiny-d16c16", z_channels=32, groups=4))
    raises_one_line(ConfigError, lambda: BitDancePipeline(model, wide), "16 bits", "32")
    small = BinaryTokenizer(tokenizer_preset("tiny-d4c16"))  # 16 bits, but 4x down-sampling
    raises_one_line(ConfigError, lambda: BitDancePipeline(model, small), "16x", "4x")


def test_from_pretrained_mismatched_tokenizer_file(tmp_path, official_pt):
    path = tmp_path / "ae_wide.pt"
    save_official_tokenizer(path, BinaryTokenizer(tokenizer_preset("tiny-d16c16", z_channels=32, groups=4)))
    raises_one_line(ValueError, lambda: BitDancePipeline.from_pretrained(official_pt, tokenizer=path), "32")


# --------------------------------------------------------------------------------------------
# 4. Never lose written work
# --------------------------------------------------------------------------------------------
class DiskFull(RuntimeError):
    pass


def _failing_save_file(fail_on_call: int = 1):
    """A stand-in for safetensors.torch.save_file that writes part of a file, then fails."""
    real = safetensors.torch.save_file
    calls = {"n": 0, "paths": []}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        calls["paths"].append(str(filename))
        if calls["n"] == fail_on_call:
            with open(filename, "wb") as f:
                f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"half\": ")
            raise DiskFull("disk full (simulated)")
        return real(tensors, filename, metadata=metadata)

    return save_file, calls


def test_save_pretrained_failure_keeps_old_folder(tmp_path, monkeypatch, model, tok):
    folder = tmp_path / "model"
    BitDancePipeline(model, tok).save_pretrained(folder)
    before = snapshot(folder)
    old_images = sample(BitDancePipeline.from_pretrained(folder)).images

    fake, calls = _failing_save_file(1)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(DiskFull):
        make_pipeline(7).save_pretrained(folder)
    assert calls["n"] == 1
    tmp_written = Path(calls["paths"][0])
    assert folder not in tmp_written.parents  # written beside the folder, never into it
    monkeypatch.undo()

    assert snapshot(folder) == before  # same names (no stray temporary files), same bytes
    np.testing.assert_array_equal(sample(BitDancePipeline.from_pretrained(folder)).images, old_images)


def test_save_pretrained_failure_on_second_file_keeps_old_folder(tmp_path, monkeypatch, model, tok):
    folder = tmp_path / "model"
    BitDancePipeline(model, tok).save_pretrained(folder)
    before = snapshot(folder)
    fake, _ = _failing_save_file(2)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(DiskFull):
        make_pipeline(7).save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(snapshot(folder)) == sorted(before)  # no stray temporary files
    assert snapshot(folder) == before


def test_save_pretrained_failure_into_new_folder_leaves_no_temp(tmp_path, monkeypatch, model, tok):
    folder = tmp_path / "fresh"
    fake, _ = _failing_save_file(1)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(DiskFull):
        BitDancePipeline(model, tok).save_pretrained(folder)
    assert not folder.exists()  # nothing half-written under the target name
    assert list(tmp_path.iterdir()) == []  # and no temporary folder left beside it


def test_save_official_failure_keeps_old_file(tmp_path, monkeypatch, model, tok):
    path = tmp_path / "ckpt.pt"
    save_official_generator(path, model, tok)
    tpath = tmp_path / "ae.pt"
    save_official_tokenizer(tpath, tok)
    before = snapshot(tmp_path)

    def failing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise DiskFull("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFull):
        save_official_generator(path, make_generator(3), tok)
    with pytest.raises(DiskFull):
        save_official_tokenizer(tpath, make_tokenizer(3))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert_same_state(load_official_generator(path)[0], model)

    sfpath = tmp_path / "ae.safetensors"
    save_official_tokenizer(sfpath, tok)
    before = snapshot(tmp_path)
    fake, _ = _failing_save_file(1)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(DiskFull):
        save_official_tokenizer(sfpath, make_tokenizer(3))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert_same_state(load_tokenizer(sfpath), tok)


@pytest.mark.parametrize("exc", [DiskFull("disk full"), KeyboardInterrupt()])
def test_atomic_write_failure(tmp_path, exc):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"good old bytes")
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        assert Path(tmp).parent == tmp_path and Path(tmp) != target
        Path(tmp).write_bytes(b"half of the new")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert seen and not seen[0].exists()
    assert target.read_bytes() == b"good old bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_atomic_write_success(tmp_path):
    target = tmp_path / "sub" / "weights.bin"  # parent folders are created
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"first"))
    assert target.read_bytes() == b"first"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["weights.bin"]


def test_saved_files_respect_umask(tmp_path, model, tok):
    old = os.umask(0o022)
    try:
        BitDancePipeline(model, tok).save_pretrained(tmp_path / "m")
        save_official_generator(tmp_path / "g.pt", model, tok)
    finally:
        os.umask(old)
    for p in [*(tmp_path / "m").iterdir(), tmp_path / "g.pt"]:
        assert p.stat().st_mode & 0o777 == 0o644, f"{p.name}: {oct(p.stat().st_mode & 0o777)}"
