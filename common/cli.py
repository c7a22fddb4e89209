"""The frame every command line shares: --config/--set, one-line errors, process-group cleanup.

    def main(argv=None):
        parser = config_parser(__doc__, where="configs/vq/")
        parser.add_argument("--run-dir", required=True)
        args = parser.parse_args(argv)
        with command(errors=(CheckpointError,)):
            cfg = load_typed(VQConfig, args.config, args.set)
            ...

A ConfigError ends the command with `config error: <message>`, each of `errors` with `error: <message>`
(exit status 1, one line, no traceback); the process group, when the command made one, is destroyed
on the way out whatever happened.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from common.config import ConfigError, add_config_args


def config_parser(doc: str | None, where: str = "configs/") -> argparse.ArgumentParser:
    """An ArgumentParser described by the first line of `doc`, with --config and --set."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    add_config_args(parser, where)
    return parser


@contextlib.contextmanager
def command(errors: tuple[type[BaseException], ...] = (), label: str = "error"):
    try:
        yield
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except errors as e:
        sys.exit(f"{label}: {e}")
    finally:
        # torch is not imported here for a command that failed before needing it (a config error).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
