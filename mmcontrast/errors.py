"""The one exception type for mistakes a user can make (bad paths, unknown keys, empty labels).

The CLI turns a ``UsageError`` into one line on stderr and exit code 2; anything else is a
programming error and keeps its traceback.
"""


class UsageError(Exception):
    """A user mistake; the message says what is wrong and how to fix it."""


class TrainingError(Exception):
    """Training cannot go on (diverged loss, non-finite weights); the message says what to try."""
