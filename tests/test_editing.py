"""Editing with any BitDance model (``pipe.edit`` / ``outpaint``, ``bitdance edit``): kept tokens come back
bit-identical to the encoded image, the same seed gives the same edit, P = 1, 4 and 16 and the text-to-image
pipeline work, and bad inputs get one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
from bitdance.sampling.editing import token_mask, variation_mask, with_margin

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipe(P: int, seed: int = 0) -> BitDancePipeline:
    torch.manual_seed(seed)
    cfg = bitdance_preset(f"BitDance-T-{P}x", image_size=32, num_classes=10, cls_token_num=2,
                          tokenizer="tiny-d4c16")
    return BitDancePipeline(BitDance(cfg), BinaryTokenizer(cfg.tokenizer))


def photo(seed: int = 0, size: int = 32) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (size, size, 3), dtype=np.uint8)


def bottom_half(size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[size // 2:] = True
    return m


def encoded(pipe, image) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    return pipe.tokenizer.encode(x)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("P", [1, 4, 16])
def test_inpainting_keeps_tokens_bit_identical(P):
    pipe = tiny_pipe(P)
    img = photo(1)
    out = pipe.edit(img, bottom_half(), class_labels=3, num_inference_steps=2, generator=seeded(0),
                    output_type="latent")
    ref = encoded(pipe, img)
    kept = ~out.regenerated
    assert kept[0, :4].all() and not kept[0, 4:].any()  # 8x8 tokens: top 4 rows kept
    lat = out.latents.permute(0, 2, 3, 1)
    assert torch.equal(lat[kept], ref.permute(0, 2, 3, 1)[kept])  # bit-identical
    assert set(out.latents.unique().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(lat[~kept], ref.permute(0, 2, 3, 1)[~kept])  # the region was sampled anew
    again = pipe.edit(img, bottom_half(), class_labels=3, num_inference_steps=2, generator=seeded(0),
                      output_type="latent")
    assert torch.equal(again.latents, out.latents)  # same seed, same edit
    other = pipe.edit(img, bottom_half(), class_labels=3, num_inference_steps=2, generator=seeded(1),
                      output_type="latent")
    assert not torch.equal(other.latents, out.latents)


def test_callback_shows_kept_tokens_from_the_start_and_images_decode():
    pipe = tiny_pipe(4)
    img = photo(2)
    grids = []
    out = pipe.edit(Image.fromarray(img), Image.fromarray(bottom_half().astype(np.uint8) * 255), class_labels=[1, 2],
                    num_inference_steps=2, generator=seeded(0), output_type="np",
                    callback=lambda s, n, lat: grids.append(lat.clone()))
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    ref = encoded(pipe, img)
    assert len(grids) == pipe.config.num_steps
    assert torch.equal(grids[0][:, :, :4], ref.expand(2, -1, -1, -1)[:, :, :4])  # kept rows before their turn
    assert torch.equal(grids[-1], out.latents)


def test_kept_blocks_are_not_sampled():
    """A block that is kept whole is fed back as encoded without calling the head."""
    pipe = tiny_pipe(4)
    calls = []
    real = pipe.model.head.sample
    pipe.model.head.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    pipe.edit(photo(3), bottom_half(), class_labels=0, num_inference_steps=2, output_type="latent",
              generator=seeded(0))
    assert len(calls) == pipe.config.num_steps // 2  # only the 8 blocks of the bottom half


def test_margin_and_variations():
    order = torch.arange(16)
    regen = torch.zeros(1, 4, 4, dtype=torch.bool)
    regen[0, 1, 1] = True
    grown = with_margin(regen, order, 2)
    assert grown.reshape(-1).nonzero().flatten().tolist() == [5, 6, 7]
    v = variation_mask(0.5, "tail", batch=2, grid=(4, 4), order=order, parallel_num=4)
    assert v[:, :2].logical_not().all() and v[:, 2:].all()
    b = variation_mask(0.5, "blocks", batch=3, grid=(4, 4), order=order, parallel_num=4, generator=seeded(0))
    assert all(bool(row.all()) or not bool(row.any()) for row in b.reshape(12, 4))  # whole blocks (rows here)
    assert variation_mask(0.0, "random", batch=1, grid=(4, 4), order=order, parallel_num=4).sum() == 0
    m = torch.zeros(1, 8, 8)
    m[0, 0, 0] = 1
    assert token_mask(m, 4).tolist() == [[[True, False], [False, False]]]
    assert token_mask(m, 4, threshold=0.5).sum() == 0

    pipe = tiny_pipe(4)
    img = photo(4)
    ref = encoded(pipe, img)
    for method in ("random", "blocks", "tail"):
        out = pipe.edit(img, strength=0.5, variation=method, class_labels=5, num_inference_steps=2,
                        generator=seeded(0), output_type="latent")
        kept = ~out.regenerated
        assert kept.any() and (~kept).any()
        assert torch.equal(out.latents.permute(0, 2, 3, 1)[kept], ref.permute(0, 2, 3, 1)[kept])
    flip = pipe.edit(img, strength=0.1, variation="flip", class_labels=5, num_inference_steps=2,
                     generator=seeded(0), output_type="latent")
    assert flip.regenerated.all()
    band = np.zeros((32, 32), bool)
    band[8:16] = True  # token rows 2-3, in the middle of the generation order
    plain = pipe.edit(img, band, class_labels=5, num_inference_steps=2, generator=seeded(0), output_type="latent")
    margin = pipe.edit(img, band, margin=3, class_labels=5, num_inference_steps=2, generator=seeded(0),
                       output_type="latent")
    assert plain.regenerated.sum() == 16 and margin.regenerated.sum() == 19
    assert (margin.regenerated >= plain.regenerated).all()


def test_outpainting_and_resizing():
    pipe = tiny_pipe(4)
    small = photo(5, 16)
    out = pipe.outpaint(small, class_labels=7, num_inference_steps=2, generator=seeded(0), output_type="latent")
    kept = ~out.regenerated[0]
    assert kept[:4, :4].all() and not kept[4:].any() and not kept[:, 4:].any()
    big = np.asarray(Image.fromarray(photo(6)).resize((64, 64)))
    resized = pipe.edit(big, np.kron(bottom_half(), np.ones((2, 2), dtype=bool)), class_labels=1,
                        num_inference_steps=2, output_type="latent", generator=seeded(0))
    assert resized.latents.shape == (1, 16, 8, 8) and (~resized.regenerated[0, :4]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=np.zeros((16, 16), bool)), "image-sized mask"),
    (dict(mask=np.zeros((32, 32), bool)), "covers no token"),
    (dict(mask=np.ones((32, 32), bool)), "covers the whole image"),
    (dict(), "a mask .* or a strength"),
    (dict(mask=bottom_half(), strength=0.5), "not both"),
    (dict(strength=1.5), "strength"),
    (dict(strength=0.5, variation="swirl"), "variation must be one of"),
    (dict(image=np.zeros((32, 48, 3), np.uint8), mask=np.ones((32, 48), bool)), "aspect ratio"),
    (dict(image=np.zeros((32, 32), np.float32), mask=bottom_half()), "uint8"),
    (dict(image="in.png", mask=bottom_half()), "PIL image"),
    (dict(mask=bottom_half(), margin=-1), "margin"),
    (dict(mask=np.full((32, 32), 2.0)), r"\[0, 1\]"),
])
def test_bad_inputs_are_refused_by_name(kwargs, message):
    pipe = tiny_pipe(4)
    image = kwargs.pop("image", photo(0))
    with pytest.raises((ValueError, TypeError), match=message):
        pipe.edit(image, class_labels=1, num_inference_steps=2, **kwargs)
    with pytest.raises(ValueError, match="smaller than the canvas"):
        pipe.outpaint(photo(0, 48), class_labels=1)


def test_text_to_image_edit(tmp_path):
    pytest.importorskip("transformers")
    from test_t2i import RES, SAMPLER, tiny_model  # tests/ is on sys.path under pytest

    from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

    BitDanceT2IPipeline(tiny_model()).save_pretrained(tmp_path / "t2i")  # a tiny folder in the released layout
    pipe = BitDancePipeline.from_pretrained(tmp_path / "t2i")
    assert isinstance(pipe, BitDanceT2IPipeline)
    img = photo(7, 64)
    mask = bottom_half(64)
    out = pipe.edit(img, mask, prompt="a red heart", sampler=SAMPLER, guidance_scale=2.0, generator=seeded(0),
                    output_type="latent")
    ae = pipe.model.ae
    ref = ae.encode(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)
    kept = ~out.regenerated
    assert kept[0, :2].all() and not kept[0, 2:].any()
    assert torch.equal(out.latents.permute(0, 2, 3, 1)[kept], ref.permute(0, 2, 3, 1)[kept])
    again = pipe.edit(img, mask, prompt="a red heart", sampler=SAMPLER, guidance_scale=2.0, generator=seeded(0),
                      output_type="latent")
    assert torch.equal(again.latents, out.latents)
    wide = pipe.outpaint(photo(8, 32)[:, :32], prompt="x", right=96, sampler=SAMPLER, output_type="latent",
                         generator=seeded(0))
    assert wide.latents.shape[-2:] == (2, 8) and (~wide.regenerated[0, :, :2]).all()
    assert (32, 128) in RES
    with pytest.raises(ValueError, match="not allowed"):
        pipe.outpaint(img, prompt="x", right=16)


# --------------------------------------------------------------------------------------------
# bitdance edit
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    tiny_pipe(4).save_pretrained(root / "model")
    Image.fromarray(photo(9)).save(root / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[16:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:16]).save(root / "small_mask.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def cli(capsys, *argv):
    from bitdance.apps.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_edit_modes(files, tmp_path, capsys):
    base = ["edit", files / "model", "--image", files / "in.png", "--classes", 3, "--steps", 2, "--seed", 1]
    rc, out, err = cli(capsys, *base, "--mask", files / "mask.png", "--out", tmp_path / "a.png")
    assert rc == 0, err
    assert "50% of the tokens regenerated" in out
    rc, out, err = cli(capsys, *base, "--box", 0, 16, 32, 32, "--out", tmp_path / "b.png")
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    rc, out, err = cli(capsys, *base, "--strength", 0.25, "--variation", "tail", "--num-images", 2,
                       "--separate", "--out", tmp_path / "vars")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "vars").iterdir()) == ["0000_class3.png", "0001_class3.png"]
    small = tmp_path / "small.png"
    Image.fromarray(photo(9, 16)).save(small)
    rc, out, err = cli(capsys, "edit", files / "model", "--image", small, "--classes", 1, "--steps", 2,
                       "--extend-right", 16, "--extend-down", 16, "--out", tmp_path / "c.png")
    assert rc == 0, err
    assert Image.open(tmp_path / "c.png").size == (32, 32)


@pytest.mark.parametrize("extra, message", [
    ([], "one of --mask"),
    (["--mask", "MASK", "--strength", "0.5"], "--mask and --strength"),
    (["--mask", "SMALL"], "image-sized mask"),
    (["--box", "0", "0", "40", "8"], "not inside"),
    (["--strength", "2"], "strength"),
    (["--mask", "BROKEN"], "not a readable image"),
    (["--mask", "NOPE"], "no such file"),
    (["--extend-right", "8"], "32x32"),
    (["--mask", "MASK", "--prompt", "a cat"], "class-conditional model"),
])
def test_cli_edit_errors_write_nothing(files, tmp_path, capsys, extra, message):
    names = {"MASK": files / "mask.png", "SMALL": files / "small_mask.png", "BROKEN": files / "broken.png",
             "NOPE": files / "nope.png"}
    extra = [str(names.get(a, a)) for a in extra]
    classes = [] if "--prompt" in extra else ["--classes", "3"]
    rc, out, err = cli(capsys, "edit", files / "model", "--image", files / "in.png", *classes, "--steps", 2,
                       *extra, "--out", tmp_path / "x.png")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_edit_text_to_image(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_t2i import tiny_model  # tests/ is on sys.path under pytest

    from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

    BitDanceT2IPipeline(tiny_model()).save_pretrained(tmp_path / "t2i")  # allows 64x64 and 32x128
    Image.fromarray(photo(10, 64)).save(tmp_path / "in.png")
    Image.fromarray(photo(11, 32)).save(tmp_path / "small.png")
    common = ["--steps", 2, "--cfg", 2, "--seed", 3]
    rc, out, err = cli(capsys, "edit", tmp_path / "t2i", "--image", tmp_path / "in.png", "--box", 0, 32, 64, 64,
                       "--prompt", "a red heart", *common, "--out", tmp_path / "a.png")
    assert rc == 0, err
    assert Image.open(tmp_path / "a.png").size == (64, 64) and "50% of the tokens" in out
    rc, out, err = cli(capsys, "edit", tmp_path / "t2i", "--image", tmp_path / "small.png", "--extend-right", 96,
                       "--prompt", "a wide banner", *common, "--out", tmp_path / "wide.png")
    assert rc == 0, err
    assert Image.open(tmp_path / "wide.png").size == (128, 32)
    rc, out, err = cli(capsys, "edit", tmp_path / "t2i", "--image", tmp_path / "in.png", "--box", 0, 32, 64, 64,
                       "--classes", 3, *common, "--out", tmp_path / "b.png")
    assert rc == 2 and "text-to-image model" in err and not (tmp_path / "b.png").exists()
    rc, out, err = cli(capsys, "edit", tmp_path / "t2i", "--image", tmp_path / "small.png", "--extend-right", 16,
                       "--prompt", "x", *common, "--out", tmp_path / "c.png")
    assert rc == 2 and "not allowed" in err and not (tmp_path / "c.png").exists()
