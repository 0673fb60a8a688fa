"""The exception types for mistakes a user can make, and the one mapping from them to exit codes.

A ``UsageError`` (bad path, unknown key, empty labels) becomes one line on stderr and exit code 2; a
``TrainingError`` (diverged loss) one line and exit code 1; anything else is a programming error and
keeps its traceback. ``run_user_command`` does this for every entry point (``mmcontrast``,
``mmcontrast.train``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A user mistake; the message says what is wrong and how to fix it."""


class TrainingError(Exception):
    """Training cannot go on (diverged loss, non-finite weights); the message says what to try."""


def run_user_command(fn: Callable[[], int], report: bool = True) -> int:
    """Run ``fn`` and return its exit code; user mistakes become one stderr line (when ``report``) and a code.

    ``report=False`` keeps a process quiet that shares the mistake with another one which reports it
    (every rank of a training job meets the same bad argument; rank 0 says so).
    """

    def say(message: str) -> None:
        if report:
            print(message, file=sys.stderr)

    try:
        return fn()
    except UsageError as err:
        say(f"error: {err}")
        return 2
    except FileNotFoundError as err:
        say(f"error: {err.filename or err}: no such file or directory")
        return 2
    except TrainingError as err:
        say(f"error: {err}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except BrokenPipeError:  # `mmcontrast … | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
