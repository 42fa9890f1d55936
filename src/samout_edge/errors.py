"""The one exception type users see as a clean one-line message."""

from __future__ import annotations


class SamoutError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints the message and exits non-zero without a traceback; any other
    exception is a bug and keeps its traceback behind ``--debug``.
    """

    exit_code: int = 1


def install_hint(extra: str) -> str:
    """How to get an extra: samout-edge is not on PyPI, so from the checkout or a wheel built from it."""
    return f"pip install -e '.[{extra}]' in the samout-edge checkout (or its wheel: 'samout_edge-*.whl[{extra}]')"


EXPORT_INSTALL = install_hint("export")


def require_torch(what: str) -> None:
    """torch is the workstation side's (the [export] extra); the device install has none.
    Say so in one line instead of a ModuleNotFoundError deep in a command."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SamoutError(f"{what} needs PyTorch, which this install does not have (the device install "
                          f"runs without it); on a workstation: {EXPORT_INSTALL}")
