"""Reference cases produced by the authors' code (see ../shared/reference/README.md).

Every case folder under $BITDANCE_REFERENCE_DIR (default ../shared/reference/official) is loaded
through the public loaders and must reproduce its outputs within the case's tolerances. Cases that
cannot be run fail; nothing is skipped. Layout files (``*state_dicts.json`` in that directory or its
parent) must match the presets key for key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitdance import BinaryQuantizer, BinaryTokenizer, BitDance, bitdance_preset
from bitdance.formats.official import load_head, load_official_generator, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("BITDANCE_REFERENCE_DIR", ROOT.parent / "shared" / "reference" / "official"))


def _case_dirs() -> list[Path]:
    if not REF_DIR.is_dir():
        return []
    return sorted(p for p in REF_DIR.iterdir() if (p / "case.json").is_file())


def _layout_files() -> list[Path]:
    files: set[Path] = set()
    for d in (REF_DIR, REF_DIR.parent):
        if d.is_dir():
            files.update(d.glob("*state_dicts.json"))
    return sorted(files)


def test_reference_directory_has_cases():
    assert REF_DIR.is_dir(), f"reference directory {REF_DIR} does not exist (set BITDANCE_REFERENCE_DIR)"
    assert _case_dirs(), f"no case folders (with case.json) in {REF_DIR}"


def _close(name, actual, expected, case):
    torch.testing.assert_close(actual.float(), expected.float(), atol=case["atol"], rtol=case["rtol"],
                               msg=lambda m: f"{name}: {m}")


def run_quantizer(case, tensors, folder):
    cfg = case["config"]
    q = BinaryQuantizer(
        bits=cfg["bits"], groups=cfg["groups"], entropy_temperature=cfg.get("entropy_temperature", 0.01),
        sample_minimization_weight=cfg.get("sample_minimization_weight", 1.0),
        batch_maximization_weight=cfg.get("batch_maximization_weight", 1.0),
    ).train()
    out = q(tensors["x"])
    got = out._asdict()
    for name in case["outputs"]:
        _close(name, got[name].detach().reshape(tensors[name].shape), tensors[name], case)


def run_tokenizer(case, tensors, folder):
    cfg = case["config"]
    tok = load_tokenizer(folder / case["checkpoint"], groups=cfg.get("groups"))
    dd = cfg.get("ddconfig", {})
    for k in ("ch", "num_res_blocks", "z_channels"):
        if k in dd:
            assert getattr(tok.config, k) == dd[k], f"inferred {k}={getattr(tok.config, k)} != case {dd[k]}"
    if "ch_mult" in dd:
        assert list(tok.config.ch_mult) == list(dd["ch_mult"])
    with torch.no_grad():
        pre = tok.encoder(tensors["image"])
        lat = tok.encode(tensors["image"])
        gen = torch.Generator().manual_seed(0)
        rec = tok.decode(tensors["latents"], generator=gen)
    got = {"pre_quant": pre, "latents": lat, "reconstruction": rec}
    for name in case["outputs"]:
        _close(name, got[name], tensors[name], case)


def run_diffusion_head(case, tensors, folder):
    cfg = case["config"]
    width = cfg.get("model_channels")
    head = load_head(folder / case["checkpoint"], head_dim=cfg.get("head_dim", 64))
    if width is not None:
        assert head.config.width == width
    assert head.config.variant == cfg.get("variant", head.config.variant)
    with torch.no_grad():
        x_pred = head.net(tensors["x_t"], tensors["t"], tensors["cond"])
    _close("x_pred", x_pred, tensors["x_pred"], case)


def run_ar_model(case, tensors, folder):
    cfg = case["config"]
    model, tok, info = load_official_generator(folder / case["checkpoint"], n_head=cfg.get("n_head"))
    c = model.config
    assert (c.dim, c.n_layer, c.parallel_num, c.cls_token_num, c.num_classes) == (
        cfg["dim"], cfg["n_layer"], cfg.get("parallel_num", 1), cfg["cls_token_num"], cfg["num_classes"])
    assert info["weights"] == "ema"
    if "vae_ddconfig" in cfg:
        assert tok is not None and tok.config.z_channels == cfg["vae_ddconfig"]["z_channels"]
    P = c.parallel_num
    with torch.no_grad():
        cond, target = model.condition(tensors["latents"], tensors["class_ids"])
        head_cond = cond.reshape(-1, P, c.dim)
        head_target = target.reshape(-1, P, c.latent_dim)
        x_pred = model.head.net(tensors["head_x_t"], tensors["head_t"], tensors["head_cond"])
    got = {"head_cond": head_cond, "head_target": head_target, "x_pred": x_pred}
    for name in case["outputs"]:
        _close(name, got[name].reshape(tensors[name].shape), tensors[name], case)


RUNNERS = {"quantizer": run_quantizer, "tokenizer": run_tokenizer, "diffusion_head": run_diffusion_head,
           "ar_model": run_ar_model}


@pytest.mark.parametrize("folder", _case_dirs(), ids=lambda p: p.name)
def test_reference_case(folder: Path):
    case = json.loads((folder / "case.json").read_text())
    component = case.get("component")
    assert component in RUNNERS, f"{folder.name}: unknown component {component!r}"
    tensors = load_file(str(folder / "tensors.safetensors"))
    missing = [n for n in case["inputs"] + case["outputs"] if n not in tensors]
    assert not missing, f"{folder.name}: tensors.safetensors lacks {missing}"
    torch.manual_seed(0)
    RUNNERS[component](case, tensors, folder)


def _preset_name(official_name: str, cfg: dict) -> str:
    size = {768: "B", 1024: "L", 1280: "H"}[cfg["dim"]]
    return f"BitDance-{size}-{cfg.get('parallel_num', 1)}x"


def test_layout_files_found():
    assert _layout_files(), f"no *state_dicts.json next to {REF_DIR}"


@pytest.mark.parametrize("layout_file", _layout_files(), ids=lambda p: p.name)
def test_preset_layouts_match_official(layout_file: Path):
    entries = json.loads(layout_file.read_text())
    assert entries, f"{layout_file} is empty"
    for name, entry in entries.items():
        cfg = entry["config"]
        preset = bitdance_preset(_preset_name(name, cfg), image_size=cfg.get("resolution", 256))
        assert preset.latent_dim == cfg["latent_dim"] and preset.down_size == cfg["down_size"], name
        with torch.device("meta"):
            model = BitDance(preset)
            tok = BinaryTokenizer(preset.tokenizer)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        ours.update({f"vae.{k}": list(v.shape) for k, v in tok.state_dict().items()})
        theirs = {k: list(v) for k, v in entry["keys"].items()}
        assert sorted(set(theirs) - set(ours))[:5] == [], f"{name}: keys we lack"
        assert sorted(set(ours) - set(theirs))[:5] == [], f"{name}: keys they lack"
        bad = [k for k in theirs if theirs[k] != ours[k]]
        assert not bad, f"{name}: shape mismatch at {bad[:5]}"
        if "params_excluding_vae" in entry:
            assert sum(p.numel() for p in model.parameters()) == entry["params_excluding_vae"], name
