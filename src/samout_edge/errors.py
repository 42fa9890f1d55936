"""The one exception type users see as a clean one-line message."""

from __future__ import annotations


class SamoutError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints the message and exits non-zero without a traceback; any other
    exception is a bug and keeps its traceback behind ``--debug``.
    """

    exit_code: int = 1
