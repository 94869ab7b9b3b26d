"""What every training entry point's command line shares: ``--config``, ``--set``, ``--resume``, ``--max-steps``."""

from __future__ import annotations

import argparse


def add_common_arguments(parser: argparse.ArgumentParser, config_required: bool = False, training: bool = True) -> None:
    """``--config`` (a YAML file or the name of a shipped config) and ``--set section.key=value`` (repeatable);
    for training, ``--resume`` and ``--max-steps``."""
    parser.add_argument("--config", required=config_required,
                        help="YAML config (a path, or the name of a config shipped in semcorr/training/configs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one config value (read as YAML), e.g. --set optim.lr=1e-4; repeatable")
    if training:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
        parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")


def overrides_of(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """``{"section.key": value}`` from the flags given (``flags`` maps an argparse dest to its config key),
    then the ``--set`` items (which win)."""
    from .config import parse_overrides

    overrides = {key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest, None) is not None}
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    return overrides
