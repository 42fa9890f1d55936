"""The samout-edge command line: parse, call the library, render with Rich.

Every command is one library call; errors the user can fix are SamoutError and
print as one line with a non-zero exit. ``--debug`` shows tracebacks. Commands
live by group in model.py, inspect_doctor.py, tensorrt.py and run.py.
"""

from __future__ import annotations

import sys
import traceback

import typer
from rich.markup import escape

from samout_edge import __version__
from samout_edge.cli import inspect_doctor, model, run, tensorrt  # noqa: F401 - registers the commands
from samout_edge.cli.common import app
from samout_edge.cli.ui import err_console
from samout_edge.errors import SamoutError


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


def main(argv: list[str] | None = None) -> None:
    """Entry point: Typer reports usage errors itself (exit 2); SamoutError becomes one line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="samout-edge")
    except SamoutError as e:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[red]error:[/] unexpected {type(e).__name__}: {escape(first_line)} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
