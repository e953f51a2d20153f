"""The command line: presets, info, sample, convert, and one-line errors."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
from bitdance.apps.cli import main
from bitdance.formats.official import save_official_generator, save_official_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=10, cls_token_num=4, tokenizer="tiny-d4c16")
    gen, tok = BitDance(cfg), BinaryTokenizer(cfg.tokenizer)
    save_official_generator(root / "gen.pt", gen)  # generator only: the tokenizer comes separately
    save_official_tokenizer(root / "ae.pt", tok)
    BitDancePipeline(gen, tok).save_pretrained(root / "folder")
    return root


def test_presets_lists_the_size_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "BitDance-B-16x" in out and "260.1M" in out and "d32c256" in out


def test_info_official_and_folder(files, capsys):
    assert main(["info", str(files / "gen.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "BitDance-T-4x" and info["parallel_num"] == 4 and info["ar_steps"] == 16
    assert main(["info", str(files / "folder")]) == 0
    assert "format: bitdance folder" in capsys.readouterr().out


def test_sample_grid_and_separate_files(files, tmp_path, capsys):
    grad = torch.is_grad_enabled()
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(files / "gen.pt"), "--tokenizer", str(files / "ae.pt"),
                 "--classes", "1", "2", "3", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 32, 32)
    assert torch.is_grad_enabled() == grad  # commands leave autograd as they found it
    a = np.asarray(Image.open(out))
    assert main(["sample", "--model", str(files / "folder"), "--classes", "1", "2", "3", "--steps", "2",
                 "--separate", "--out", str(tmp_path / "sep")]) == 0
    names = sorted(p.name for p in (tmp_path / "sep").iterdir())
    assert names == ["0000_class1.png", "0001_class2.png", "0002_class3.png"]
    # Same weights and seed from the folder: the first image equals the grid's first tile.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sep" / names[0])), a[:, :32])


def test_convert_round_trip(files, tmp_path):
    assert main(["convert", str(files / "gen.pt"), str(tmp_path / "ours"), "--tokenizer", str(files / "ae.pt")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pt")]) == 0
    a = BitDancePipeline.from_pretrained(files / "folder")
    b = BitDancePipeline.from_pretrained(tmp_path / "back.pt")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_errors_are_one_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitdance info: error:") and str(bad) in err and "\n" not in err
    assert main(["sample", "--model", str(files / "gen.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["sample", "--model", str(files / "folder"), "--classes", "10", "--out", str(tmp_path / "y.png")]) == 2
    assert "class labels must be in [0, 9]" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()


def _commands(parser, prefix=()):
    """(name, parser) of every leaf command, through nested sub-commands (eval fid, ...)."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, prefix + (name,))


def test_every_command_is_listed_and_every_option_shows_its_default():
    import argparse

    from bitdance.apps.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    commands = dict(_commands(parser))
    assert {"sample", "convert", "info", "serve", "bench", "train", "eval fid", "sample-npz"} <= set(commands)
    for name, sub in commands.items():
        assert name.split()[0] in top, f"'bitdance --help' does not list {name}"
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS):
                continue
            flag = action.option_strings[0]  # listed first (BooleanOptionalAction: --x, --no-x)
            start = re.search(r"\n  (?:-\w, )?" + re.escape(flag) + r"[ ,\n]", text[text.index("options:"):])
            assert start, f"bitdance {name} --help does not list {flag}"
            block = text[text.index("options:") + start.end():]
            block = block[: block.find("\n  -") if "\n  -" in block else len(block)]  # up to the next option
            assert "(default:" in block, f"bitdance {name} --help: {flag} does not show its default"
