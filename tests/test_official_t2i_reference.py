"""Text-to-image reference cases produced by the authors' code (see ../shared/reference/official_t2i/README.md).

Every case folder under $BITDANCE_T2I_REFERENCE_DIR (default ../shared/reference/official_t2i) is loaded
through the public loader (``BitDancePipeline.from_pretrained`` on its ``model/`` folder) and must reproduce
every output of its ``case.json``: the token ids, the 2D position table, the head conditions of a
teacher-forced generation, the decoded image, the head network, the projector and the sampler replayed
with the recorded noise. A case that cannot be run fails; nothing is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bitdance.rng
from bitdance import BitDancePipeline, FlowSampler
from bitdance.models.transformer import generation_order

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("BITDANCE_T2I_REFERENCE_DIR",
                              ROOT.parent / "shared" / "reference" / "official_t2i"))


def _case_dirs() -> list[Path]:
    if not REF_DIR.is_dir():
        return []
    return sorted(p for p in REF_DIR.iterdir() if (p / "case.json").is_file())


def test_t2i_reference_directory_has_cases():
    assert REF_DIR.is_dir(), f"reference directory {REF_DIR} does not exist (set BITDANCE_T2I_REFERENCE_DIR)"
    assert _case_dirs(), f"no case folders (with case.json) in {REF_DIR}"


class _Checker:
    def __init__(self, case: dict, tensors: dict[str, torch.Tensor]):
        self.case, self.tensors, self.checked = case, tensors, set()

    def __call__(self, name: str, actual) -> None:
        expected = self.tensors[name]
        actual = torch.as_tensor(actual)
        assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if name in self.case.get("exact", []):
            assert torch.equal(actual.to(expected.dtype), expected), f"{name}: not bit-identical"
        else:
            tol = self.case.get("tolerances", {}).get(name, {})
            torch.testing.assert_close(actual.double(), expected.double(), atol=tol.get("atol", self.case["atol"]),
                                       rtol=tol.get("rtol", self.case["rtol"]), msg=lambda m: f"{name}: {m}")
        self.checked.add(name)


@pytest.mark.parametrize("folder", _case_dirs(), ids=lambda p: p.name)
def test_t2i_reference_case(folder: Path, monkeypatch):
    case = json.loads((folder / "case.json").read_text())
    assert case["component"] == "t2i_model", f"{folder.name}: unknown component {case['component']!r}"
    cfg = case["config"]
    tensors = load_file(str(folder / "tensors.safetensors"))
    check = _Checker(case, tensors)
    H, W, P = cfg["height"], cfg["width"], cfg["parallel_num"]
    pipe = BitDancePipeline.from_pretrained(folder / "model", resolutions=[(H, W)])
    model = pipe.model
    assert pipe.kind == "text_to_image" and model.config.parallel_num == P
    h, w = model.config.check_resolution(H, W)
    assert (h, w) == (cfg["h"], cfg["w"])

    # Token ids: the chat-formatted prompt, the unconditional prompt, the image prefix.
    cond, uncond = model.prefix_ids(cfg["prompt"], h), model.prefix_ids(None, h)
    assert model.prompt_text(cfg["prompt"]) == cfg["cond_prompt"]
    assert model.prompt_text(None) == cfg["uncond_prompt"]
    check("cond_ids", torch.tensor(cond[:-2]))
    check("uncond_ids", torch.tensor(uncond[:-2]))
    check("image_prefix_ids", torch.tensor(cond[-2:] + model.first_block_ids(w)))
    check("pos_embed_2d", model.image_pos_embed(h, w))

    # Teacher-forced generation through the public pipeline: the head's sampler records the condition it
    # gets and returns the blocks of the case's latent grid (as the harness did with the authors' code).
    latent = tensors["latent_grid"]
    B = latent.shape[0]
    order = generation_order(h, w, model.config.patch_size)
    blocks = latent.flatten(2).transpose(1, 2)[:, order].reshape(B, -1, P, latent.shape[1])  # (B, S, P, d)
    guided = cfg["guidance_scale"] > 1
    check("step_tokens", torch.stack([torch.cat([blocks[:, s]] * (2 if guided else 1)) for s in range(blocks.shape[1])]))
    conds = []

    def teacher(c, *, sampler, guidance_scale, generator=None):
        assert guidance_scale == cfg["guidance_scale"]
        conds.append(c.detach().clone())
        return blocks[:, len(conds) - 1].clone()

    monkeypatch.setattr(model.vision_head, "sample", teacher)
    out = pipe([cfg["prompt"]] * B, height=H, width=W, guidance_scale=cfg["guidance_scale"],
               num_inference_steps=cfg["num_sampling_steps_passed"], output_type="np")
    monkeypatch.undo()
    check("conds", torch.stack(conds))
    assert torch.equal(out.latents, latent), "generated latents differ from the teacher-forced tokens"
    check("image_uint8", torch.from_numpy(out.images))
    with torch.no_grad():
        check("image", model.ae.decode(latent))
        check("head_x_pred", model.vision_head.net(tensors["head_x_t"], tensors["head_t"], tensors["head_cond"]))
        check("proj_out", model.projector(tensors["proj_in"]))

    # The real sampler on conds[0], its Gaussian draws replayed from the case.
    noise = list(tensors["sampler_noise"].unbind(0))

    def replay(shape, *, generator=None, device=None, dtype=None):
        x = noise.pop(0)
        assert tuple(x.shape) == tuple(shape), f"sampler drew {tuple(shape)}, the case recorded {tuple(x.shape)}"
        return x.to(device=device, dtype=dtype or x.dtype)

    monkeypatch.setattr(bitdance.rng, "randn", replay)
    sampler = FlowSampler(num_steps=cfg["sampler_trace_steps"], method="euler_maruyama",
                          time_shift=model.config.time_shift)
    check("sampler_cond", conds[0])
    with torch.no_grad():
        x = model.vision_head.sample(tensors["sampler_cond"], sampler=sampler, guidance_scale=cfg["guidance_scale"])
    assert not noise, f"{len(noise)} recorded draws left unused"
    check("sampler_out", torch.cat([x] * (2 if guided else 1)))

    assert check.checked == set(case["outputs"]), f"outputs not checked: {set(case['outputs']) - check.checked}"
