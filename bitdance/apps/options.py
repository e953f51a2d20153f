"""Option helpers shared by the ``bitdance`` commands' parsers: the integer type, the help formatter and
the sampling options every command that samples from a model has."""

from __future__ import annotations

import argparse

__all__ = ["integer", "HelpFormatter", "sampling_options", "hub_options", "hub_kwargs"]


def integer(text: str) -> int:
    """argparse type of integer options: Python's int() refuses past 4300 digits with a message that repeats
    them all; a seed or a count that long is a mistake, said in a few words."""
    digits = text.strip().lstrip("+-")
    if len(digits) > 40 and digits.isdigit():
        raise argparse.ArgumentTypeError(f"a number of {len(digits)} digits is out of range")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, also those without help text (argparse drops it for empty help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and action.default is not None
                and action.default is not argparse.SUPPRESS):
            text = f"{text} (default: %(default)s)".strip()
        return text


def sampling_options(p: argparse.ArgumentParser, *, seed_help: str, cfg_default: float | None, cfg_help: str,
                      schedule_default: str | None, schedule_help: str = "guidance schedule") -> None:
    """The options of every command that samples from a model: seed, head steps, guidance and sampler."""
    p.add_argument("--seed", type=integer, default=0, help=seed_help)
    p.add_argument("--steps", type=int, default=50, help="diffusion-head sampling steps")
    p.add_argument("--cfg", type=float, default=cfg_default, help=cfg_help)
    p.add_argument("--schedule", choices=["linear", "constant"], default=schedule_default, help=schedule_help)
    p.add_argument("--sampler", choices=["euler_maruyama", "euler"], default="euler_maruyama",
                   help="head sampler: Euler-Maruyama (official) or deterministic Euler")


def hub_options(p: argparse.ArgumentParser) -> None:
    """Where a command takes a model: released names and Hugging Face repository ids are accepted in place of a
    path (:mod:`bitdance.formats.hub`); these pick the file and the revision."""
    p.add_argument("--model-file", help="with a repository id that holds several models: which file "
                   "(e.g. BitDance_B_16x.pt of shallowdream204/BitDance-ImageNet)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of a named model; None = main")


def weights_option(p: argparse.ArgumentParser, what: str = "load") -> None:
    """``--weights``: the storage of the linear layers (:mod:`bitdance.models.quantized`)."""
    from bitdance.models.quantized import WEIGHT_FORMATS

    p.add_argument("--weights", choices=WEIGHT_FORMATS, help=f"{what} the linear layers' weights as int8 or fp8 "
                   "(1 byte, per-channel scales) or bf16 (2 bytes); computing stays in --dtype. Default: as stored")


def hub_kwargs(args: argparse.Namespace) -> dict:
    return {"model": getattr(args, "model_file", None), "revision": getattr(args, "revision", None)}
