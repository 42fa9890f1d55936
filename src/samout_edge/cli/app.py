"""The samout-edge command line: parse, call the library, render with Rich.

Every command is one library call; errors the user can fix are SamoutError and
print as one line with a non-zero exit. ``--debug`` shows tracebacks. Commands
live by group: artifacts.py (init, export, verify, inline), device.py (profiles,
plan), tensorrt.py (build), run.py (generate, bench, eval), serve.py, package.py,
inspect_doctor.py.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback

import typer
from rich.markup import escape

from samout_edge import __version__
from samout_edge.cli.backend_options import refresh
from samout_edge.cli.common import app
from samout_edge.cli.ui import err_console
from samout_edge.errors import SamoutError

# Importing a command module registers its commands; --help lists them in this order (the workflow first).
for _module in ("artifacts", "device", "tensorrt", "run", "serve", "package", "inspect_doctor"):
    importlib.import_module(f"samout_edge.cli.{_module}")


def _show_version(show: bool) -> None:
    if show:
        sys.stdout.write(f"samout-edge {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Export, verify, build and benchmark SamOut (cummax-attention) language models for edge GPUs."""


def printable(text: str) -> str:
    """Control characters in user-given names (a path with an escape sequence) are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like an exception: staging directories are removed


def main(argv: list[str] | None = None) -> None:
    """Entry point: Typer reports usage errors itself (exit 2); SamoutError becomes one line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        refresh()  # the backend flags of the registry as it is now (a backend registered after import included)
        app(args=args, prog_name="samout-edge")
    except SamoutError as e:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(printable(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (`samout-edge inspect DIR | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:
        if debug:
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[red]error:[/] unexpected {type(e).__name__}: {escape(printable(first_line))} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
