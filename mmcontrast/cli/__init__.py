"""The ``mmcontrast`` command: argument parsing and user-facing errors only, one module per command family.

Each module (``zeroshot``, ``evaluate``, ``embed``, ``search``, ``labelled``, ``wiseft``, ``health``) owns its
commands' arguments, their usage errors and the one library call each makes; ``common`` holds the registry they join
and what they share. Heavy packages (torch, open_clip) are imported inside the handlers so ``mmcontrast --help``
answers at once. A ``UsageError`` (or a missing file) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmcontrast import __version__
from mmcontrast.cli import embed, evaluate, health, labelled, search, wiseft, zeroshot  # noqa: F401 (they register)
from mmcontrast.cli.common import SUBCOMMANDS, write_predictions  # noqa: F401 (write_predictions: the library's callers)
from mmcontrast.errors import run_user_command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only that subcommand's arguments are filled in (the others keep their
    name and help): some commands' arguments import their modules for defaults, and a run needs only its own."""
    parser = argparse.ArgumentParser(
        prog="mmcontrast",
        description="CLIP-style contrastive learning: zero-shot, evaluation, embeddings and diagnostics. "
        "Training runs as `accelerate launch -m mmcontrast.train` (or `python -m mmcontrast.train`).",
    )
    parser.add_argument("--version", action="version", version=f"mmcontrast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = ["zero-shot", "eval", "embed", "index", "search", "dedup", "serve", "finetune", "predict", "views", "wise-ft",
             "plot", "diagnose"]
    for name in sorted(SUBCOMMANDS, key=lambda n: order.index(n) if n in order else len(order)):
        help_text, add_arguments, handler = SUBCOMMANDS[name]
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    torch = sys.modules.get("torch")  # commands may rebalance CPU threads; in-process callers get theirs back
    threads = torch.get_num_threads() if torch else None
    try:
        return run_user_command(lambda: args.handler(args))
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
