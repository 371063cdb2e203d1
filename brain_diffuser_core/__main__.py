"""Command line: ``python -m brain_diffuser_core <command> --help``.

Each command lives in its own module under :mod:`brain_diffuser_core.cli` exposing
``add_parser(subparsers)`` (which registers the sub-parser and sets ``func``) and is listed in
:data:`brain_diffuser_core.cli.COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .batch.store import BatchError
from .cli import COMMANDS

DESCRIPTION = """\
Brain-Diffuser Explorer: reconstruct seen images from fMRI (Ozcelik & VanRullen 2023).

Typical flow for one NSD subject:
  1. prepare   read NSD betas, average repeats, z-score with train statistics, cache float32 arrays
  2. extract   compute VDVAE and CLIP features of the subject's images (needs the model weights)
  3. fit       fit ridge decoders fMRI -> features and write a decoder bundle (manifest + safetensors)
  4. reconstruct / evaluate   run both stages and score them
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m brain_diffuser_core",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        try:
            module = importlib.import_module(f".cli.{module_name}", __package__)
        except ModuleNotFoundError as err:  # a command whose module is not written yet
            if err.name and err.name.endswith(f"cli.{module_name}"):
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept and a rerun resumes", file=sys.stderr)
        return 130
    except BatchError as err:  # a batch job (sweep, reconstruct, ...): finished shards are kept
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 3
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
