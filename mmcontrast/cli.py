"""The ``mmcontrast`` command: argument parsing and user-facing errors only.

Each subcommand registers its parser here and calls into the library; heavy packages (torch,
open_clip) are imported inside the handlers so ``mmcontrast --help`` answers at once. A
``UsageError`` (or a missing file) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mmcontrast import __version__
from mmcontrast.errors import UsageError

# name -> (help, function adding arguments, handler(args) -> exit code). Subcommands register here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``handler(args) -> int`` as ``mmcontrast NAME``."""

    def register(handler: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (help, add_arguments, handler)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcontrast",
        description="CLIP-style contrastive learning: zero-shot, evaluation, embeddings and diagnostics. "
        "Training runs as `accelerate launch -m mmcontrast.train` (or `python -m mmcontrast.train`).",
    )
    parser.add_argument("--version", action="version", version=f"mmcontrast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def run_user_command(fn: Callable[[], int]) -> int:
    """Run ``fn``; a user mistake becomes one stderr line and exit code 2."""
    try:
        return fn()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err.filename or err}: no such file or directory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- subcommands (each registers itself with @subcommand; heavy imports inside handlers) ---


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    return run_user_command(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
