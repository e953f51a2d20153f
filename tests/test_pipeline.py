"""diffusers-style pipelines (bitdance.pipelines.base): class-conditional and text-to-image front doors.

from_pretrained -> __call__ -> save_pretrained -> from_pretrained round trips, dispatch by folder kind, the
per-step callback (same contract for both kinds), output types, input checks and ``bitdance sample --prompt``.
Tiny random models only.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import bitdance.pipelines.text_to_image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_t2i import RES, tiny_model
from test_t2i import P as T2I_P  # tests/ is on sys.path under pytest

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
from bitdance.apps.cli import main
from bitdance.formats.official import save_official_generator, save_official_tokenizer
from bitdance.formats.t2i_folder import is_text_to_image_folder, load_folder, save_folder
from bitdance.formats.weights import CheckpointError
from bitdance.models.config import T2IConfig
from bitdance.pipelines.base import PipelineOutput
from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

CC_P = 4  # class-conditional tiny model: 4x (2x2 patches), 32 px images, 4x tokenizer -> 8x8 grid, 16 steps


def seed(s=0):
    return torch.Generator().manual_seed(s)


def one_line(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def tokens_done(latents):
    """Per image: how many tokens of the (B, d, h, w) grid are generated (non-zero)."""
    return (latents != 0).any(1).flatten(1).sum(1).tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=10, cls_token_num=4, tokenizer="tiny-d4c16")
    gen, tok = BitDance(cfg), BinaryTokenizer(cfg.tokenizer)
    with torch.no_grad():  # off the zero init, so the class and the partial grid matter
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_official_generator(root / "gen.pt", gen)
    save_official_tokenizer(root / "ae.pt", tok)
    save_folder(tiny_model(), root / "t2i_official")  # the released layout, no resolutions stored
    return root


@pytest.fixture(scope="module")
def t2i(files):
    return BitDancePipeline.from_pretrained(files / "t2i_official", resolutions=RES)


@pytest.fixture(scope="module")
def t2i_saved(files, t2i):
    t2i.save_pretrained(files / "t2i_ours")
    return files / "t2i_ours"


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
def test_class_conditional_round_trip(files, tmp_path):
    pipe = BitDancePipeline.from_pretrained(files / "gen.pt", tokenizer=files / "ae.pt")
    assert type(pipe) is BitDancePipeline and pipe.kind == "class_conditional"
    a = pipe([1, 7], num_inference_steps=2, generator=seed(3), output_type="np").images
    pipe.save_pretrained(tmp_path / "m")
    again = BitDancePipeline.from_pretrained(tmp_path / "m")
    assert type(again) is BitDancePipeline
    b = again([1, 7], num_inference_steps=2, generator=seed(3), output_type="np").images
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b)
    c = again([1, 7], num_inference_steps=2, generator=seed(4), output_type="np").images
    assert not np.array_equal(a, c)


def test_text_to_image_round_trip(t2i, t2i_saved):
    assert type(t2i) is BitDanceT2IPipeline and t2i.kind == "text_to_image"
    prompts = ["a red heart", "a blue square"]
    a = t2i(prompts, height=32, width=128, num_inference_steps=2, generator=seed(1), output_type="np")
    again = BitDancePipeline.from_pretrained(t2i_saved)  # resolutions come back from config.json
    assert type(again) is BitDanceT2IPipeline and again.config.resolutions == tuple(RES)
    b = again(prompts, height=32, width=128, num_inference_steps=2, generator=seed(1), output_type="np")
    assert a.images.shape == (2, 32, 128, 3)
    assert np.array_equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    c = again(prompts, height=32, width=128, num_inference_steps=2, generator=seed(2), output_type="np")
    assert not torch.equal(a.latents, c.latents)


def test_saved_text_to_image_folder_keeps_the_released_layout(t2i, t2i_saved):
    names = set(os.listdir(t2i_saved))
    for n in ["config.json", "model.safetensors", "tokenizer.json", "ae_config.json", "ae.safetensors",
              "vision_head_config.json", "vision_head.safetensors", "projector.safetensors"]:
        assert n in names, n
    cfg = json.loads((t2i_saved / "config.json").read_text())
    assert cfg["model_type"] == "qwen3"  # still a Hugging Face config
    assert cfg["bitdance"]["kind"] == "text_to_image" and cfg["bitdance"]["t2i"]["resolutions"] == [[64, 64], [32, 128]]
    m = load_folder(t2i_saved, resolutions=RES)  # the plain loader reads it as a released folder
    for k, v in t2i.model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_save_is_atomic(t2i, t2i_saved, tmp_path, monkeypatch):
    import shutil

    dst = tmp_path / "m"
    shutil.copytree(t2i_saved, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def broken(model, path, **kw):
        (path / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(bitdance.pipelines.text_to_image, "save_folder", broken)
    with pytest.raises(OSError, match="disk full"):
        t2i.save_pretrained(dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def test_dispatch(files, t2i_saved, tmp_path):
    assert is_text_to_image_folder(files / "t2i_official") and is_text_to_image_folder(t2i_saved)
    assert not is_text_to_image_folder(files / "gen.pt")
    assert isinstance(BitDancePipeline.from_pretrained(files / "t2i_official"), BitDanceT2IPipeline)
    # Our class-conditional folder stays class-conditional; one whose config says text_to_image dispatches.
    BitDancePipeline.from_pretrained(files / "gen.pt", tokenizer=files / "ae.pt").save_pretrained(tmp_path / "cc")
    assert type(BitDancePipeline.from_pretrained(tmp_path / "cc")) is BitDancePipeline
    cfg_path = tmp_path / "cc" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "kind": "text_to_image"}))
    assert is_text_to_image_folder(tmp_path / "cc")
    one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(tmp_path / "cc"), "text_to_image",
             "vision_head_config.json")
    one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(t2i_saved, tokenizer=files / "ae.pt"),
             "tokenizer")
    one_line(TypeError, lambda: BitDancePipeline.from_pretrained(files / "gen.pt", tokenizer=files / "ae.pt",
                                                                 resolutions=RES), "resolutions")
    one_line(TypeError, lambda: BitDanceT2IPipeline.from_pretrained(t2i_saved, resolution=RES), "resolution")
    one_line(CheckpointError, lambda: BitDanceT2IPipeline.from_pretrained(tmp_path / "nope"), "no such file or folder")


def test_bad_stored_t2i_config(t2i_saved, tmp_path):
    import shutil

    dst = tmp_path / "m"
    shutil.copytree(t2i_saved, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["bitdance"]["t2i"]["wings"] = 2
    (dst / "config.json").write_text(json.dumps(cfg))
    one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(dst), "wings")
    del cfg["bitdance"]["t2i"]["wings"]
    cfg["bitdance"]["t2i"]["resolutions"] = 5
    (dst / "config.json").write_text(json.dumps(cfg))
    one_line(CheckpointError, lambda: BitDancePipeline.from_pretrained(dst), "invalid text-to-image config")


# --------------------------------------------------------------------------------------------
# Callback and partial decoding (same contract for both kinds)
# --------------------------------------------------------------------------------------------
def _check_callback(pipe, cond, P, **kw):
    seen = []
    out = pipe(cond, num_inference_steps=2, generator=seed(0), output_type="latent",
               callback=lambda step, n, lat: seen.append((step, n, lat)), **kw)
    B, d, h, w = out.latents.shape
    n = (h * w) // P
    assert [(s, m) for s, m, _ in seen] == [(k, n) for k in range(n)]
    for k, (_, _, lat) in enumerate(seen):
        assert lat.shape == (B, d, h, w)
        assert tokens_done(lat) == [P * (k + 1)] * B  # P more tokens per step, the rest still 0
        assert set(lat.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(seen[-1][2], out.latents)
    # A partial grid decodes: what a UI shows while the image forms.
    img = pipe.decode(seen[len(seen) // 2][2])
    assert img.dtype == torch.float32 and img.shape[:2] == (B, 3) and img.abs().max() <= 1
    return img


def test_callback_class_conditional(files):
    pipe = BitDancePipeline.from_pretrained(files / "gen.pt", tokenizer=files / "ae.pt")
    img = _check_callback(pipe, [3, 5], CC_P)
    assert img.shape == (2, 3, 32, 32)


def test_callback_text_to_image(t2i):
    img = _check_callback(t2i, ["a cat", "x"], T2I_P, height=32, width=128)
    assert img.shape == (2, 3, 32, 128)
    # guidance off: the same contract
    _check_callback(t2i, "a cat", T2I_P, height=64, width=64, guidance_scale=1.0)


# --------------------------------------------------------------------------------------------
# Output types, defaults, device / dtype
# --------------------------------------------------------------------------------------------
def test_output_types(t2i):
    kw = {"height": 32, "width": 128, "num_inference_steps": 2}
    pil = t2i(["a", "b"], generator=seed(5), **kw)
    assert isinstance(pil, PipelineOutput) and len(pil.images) == 2
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (128, 32)
    arr = t2i(["a", "b"], generator=seed(5), output_type="np", **kw).images
    assert arr.dtype == np.uint8 and arr.shape == (2, 32, 128, 3)
    assert np.array_equal(np.asarray(pil.images[1]), arr[1])
    pt = t2i(["a", "b"], generator=seed(5), output_type="pt", **kw)
    assert pt.images.shape == (2, 3, 32, 128) and pt.images.abs().max() <= 1
    lat = t2i(["a", "b"], generator=seed(5), output_type="latent", **kw)
    assert lat.images.shape == (2, 32, 2, 8) and torch.equal(lat.images, lat.latents)
    assert torch.equal(lat.latents, pt.latents)


def test_default_resolution_and_properties(t2i):
    assert t2i.default_resolution == (64, 64)  # the largest allowed square
    out = t2i("a red heart", num_inference_steps=1, generator=seed(0), output_type="latent")
    assert out.latents.shape == (1, 32, 4, 4)
    assert t2i("x", height=64, num_inference_steps=1, output_type="latent").latents.shape == (1, 32, 4, 4)
    released = SimpleNamespace(config=T2IConfig(parallel_num=16))  # the released resolution lists
    assert BitDanceT2IPipeline.default_resolution.fget(released) == (1024, 1024)
    assert isinstance(t2i.config, T2IConfig) and t2i.device.type == "cpu" and t2i.dtype == torch.float32


def test_to_dtype(files):
    pipe = BitDancePipeline.from_pretrained(files / "t2i_official", resolutions=RES)
    assert pipe.to("cpu", torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    out = pipe("a", height=64, width=64, num_inference_steps=1, generator=seed(0), output_type="pt")
    assert out.images.dtype == torch.float32 and out.images.shape == (1, 3, 64, 64)
    loaded = BitDanceT2IPipeline.from_pretrained(files / "t2i_official", dtype=torch.bfloat16, resolutions=RES)
    assert loaded.dtype == torch.bfloat16


def test_stored_dtype_gives_way_to_bitdance_dtype(files, monkeypatch):
    """dtype=None keeps the folder's dtype (fp32 here) unless $BITDANCE_DTYPE forces one; an explicit dtype wins."""
    monkeypatch.setenv("BITDANCE_DTYPE", "bf16")
    assert BitDanceT2IPipeline.from_pretrained(files / "t2i_official", resolutions=RES).dtype == torch.bfloat16
    explicit = BitDanceT2IPipeline.from_pretrained(files / "t2i_official", dtype=torch.float32, resolutions=RES)
    assert explicit.dtype == torch.float32
    monkeypatch.setenv("BITDANCE_DTYPE", "auto")
    assert BitDanceT2IPipeline.from_pretrained(files / "t2i_official", resolutions=RES).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Bad inputs: one-line errors
# --------------------------------------------------------------------------------------------
def test_bad_inputs(t2i):
    kw = {"num_inference_steps": 1}
    one_line(ValueError, lambda: t2i([], **kw), "empty")
    one_line(ValueError, lambda: t2i(["ok", 3], **kw), "prompt 1 must be a string")
    one_line(ValueError, lambda: t2i(None, **kw), "string")
    one_line(ValueError, lambda: t2i("x" * 600, **kw), "too long", "512 positions")
    one_line(ValueError, lambda: t2i("x" * (t2i.max_prompt_chars + 1), **kw), "too long", "characters")
    one_line(ValueError, lambda: t2i("x", output_type="jpg", **kw), "output_type", "jpg")
    one_line(ValueError, lambda: t2i("x", height=128, width=32, **kw), "allowed resolutions: 64x64, 32x128")
    one_line(ValueError, lambda: t2i("x", sampler="heun", **kw), "heun")
    one_line(ValueError, lambda: t2i.decode(torch.zeros(1, 16, 2, 2)), "(B, 32, h, w)")


def test_bad_inputs_class_conditional(files):
    pipe = BitDancePipeline.from_pretrained(files / "gen.pt", tokenizer=files / "ae.pt")
    one_line(ValueError, lambda: pipe([1], output_type="jpg"), "output_type")
    one_line(ValueError, lambda: pipe([10]), "class labels must be in [0, 9]")
    one_line(ValueError, lambda: pipe.decode(torch.zeros(8, 8)), "(B, 16, h, w)")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_sample_prompt(t2i_saved, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(t2i_saved), "--prompt", "a red heart", "--prompt", "a blue square",
                 "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 64, 64)
    assert main(["sample", str(t2i_saved), "--prompt", "a red heart!", "--height", "32", "--width", "128",
                 "--steps", "2", "--cfg", "3", "--separate", "--out", str(tmp_path / "sep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sep").iterdir()) == ["0000_prompt-a-red-heart.png"]
    # The same as the Python API for the same seed.
    pipe = BitDancePipeline.from_pretrained(t2i_saved)
    ref = pipe(["a red heart", "a blue square"], num_inference_steps=2, generator=seed(1), output_type="np").images
    assert np.array_equal(np.asarray(Image.open(out)), np.concatenate(list(ref), axis=1))


def test_cli_sample_class_conditional_still_works(files, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(files / "gen.pt"), "--tokenizer", str(files / "ae.pt"), "--classes", "1", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 32, 32)
    assert main(["sample", "--model", str(files / "gen.pt"), "--tokenizer", str(files / "ae.pt"), "--classes", "1",
                 "--steps", "2", "--separate", "--out", str(tmp_path / "sep")]) == 0
    assert [p.name for p in (tmp_path / "sep").iterdir()] == ["0000_class1.png"]


@pytest.mark.parametrize("args, needle", [
    (["{t2i}", "--classes", "1"], "text-to-image model: give --prompt"),
    (["{t2i}"], "give --prompt"),
    (["{t2i}", "--prompt", "x", "--schedule", "linear"], "--schedule"),
    (["{t2i}", "--prompt", "x", "--height", "48"], "48x48"),
    (["{gen}", "--tokenizer", "{ae}", "--prompt", "x"], "class-conditional model: give --classes"),
    (["--out", "x.png"], "no model given"),
])
def test_cli_errors_are_one_line(files, t2i_saved, tmp_path, capsys, args, needle):
    paths = {"t2i": t2i_saved, "gen": files / "gen.pt", "ae": files / "ae.pt"}
    argv = ["sample"] + [a.format(**paths) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Hugging Face's loading progress bar
    assert err.startswith("bitdance sample: error:") and needle in err
    assert not (tmp_path / "x.png").exists()


def test_shared_sampling_options_are_checked_by_name():
    """The keyword options both pipelines share are declared once (SamplingOptions); a misspelt one is a
    TypeError naming it, as for any Python keyword argument, before any work."""
    from bitdance.pipelines.base import SAMPLING_DEFAULTS, SamplingOptions

    assert set(SAMPLING_DEFAULTS) == set(SamplingOptions.__annotations__)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=3, cls_token_num=2, tokenizer="tiny-d4c16")
    pipe = BitDancePipeline(BitDance(cfg), BinaryTokenizer(cfg.tokenizer))
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_kvcache'"):
        pipe([1], num_inference_steps=2, use_kvcache=False)
    out = pipe([1], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.latents.shape == (1, 16, 8, 8)
    with pytest.warns(DeprecationWarning, match="model"):  # the 0.1 name of the network, until 0.3
        assert pipe.generator is pipe.model
