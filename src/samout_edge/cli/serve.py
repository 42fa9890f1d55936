"""The serve command: an OpenAI-style HTTP server (library: samout_edge.serve)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.cli.common import (
    ARCH_HELP,
    BACKEND_HELP,
    OPENVINO_DEVICE_HELP,
    OPENVINO_PRECISION_HELP,
    WINDOW_HELP,
    Arch,
    Backend,
    OpenVINOPrecision,
    TorchDevice,
    app,
    arch_of,
    settings,
    value,
)
from samout_edge.cli.ui import err_console


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command()
def serve(
    target: Path = typer.Argument(..., help="Export directory, engine directory (engines/<profile>), or a checkpoint (torch)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback exposes the server to the network."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one; the URL is printed)."),
    store: Optional[Path] = typer.Option(None, help="SQLite file the sessions persist in [default: TARGET/sessions.sqlite]."),
    memory_only: bool = typer.Option(False, "--memory-only", help="Keep sessions in memory only (lost on restart)."),
    vocab: Optional[Path] = typer.Option(None, help="JSON list of token strings, for text prompts and text output [default: the export's]."),
    backend: Backend = typer.Option("auto", help=BACKEND_HELP),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider (the ort backend)."),
    device: TorchDevice = typer.Option("auto", help="torch device (the torch backend)."),
    engine: Optional[str] = typer.Option(None, help="Serve the TensorRT engine built for this profile."),
    openvino_device: str = typer.Option("CPU", "--openvino-device", help=OPENVINO_DEVICE_HELP),
    openvino_precision: OpenVINOPrecision = typer.Option("f32", "--openvino-precision", help=OPENVINO_PRECISION_HELP),
    arch: Arch = typer.Option("cummax", help="For a checkpoint: " + ARCH_HELP),
    softmax_window: int = typer.Option(0, "--softmax-window", min=0, help="For a checkpoint: " + WINDOW_HELP),
    heads: Optional[int] = typer.Option(None, help="Head count of a bare state_dict (default 8)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Requests per runner call (an engine's profiles may cap it)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(131072, "--max-prompt-tokens", min=1,
                                          help="Most prompt tokens one request may send (a cummax session's context "
                                          "has no limit: long prompts are fed in chunks)."),
    max_sessions: int = typer.Option(10_000, "--max-sessions", min=1, help="Past this, the least recently used idle session is evicted."),
    session_ttl: float = typer.Option(86_400.0, "--session-ttl", help="Seconds idle before a session is evicted."),
    kv_budget_mib: float = typer.Option(256.0, "--kv-budget-mib", min=0, help="Softmax: all sessions' KV caches together."),
    log_level: str = typer.Option("warning", help="uvicorn's log level (info shows each request)."),
) -> None:
    """Serve completions over HTTP with sessions that persist across restarts."""
    from samout_edge.serve import open_server, require_serve, run

    require_serve()  # before importing the server, which imports FastAPI
    from samout_edge.serve.server import ServeOptions
    from samout_edge.serve.sessions import SessionPolicy

    if memory_only and store is not None:
        raise typer.BadParameter("give --store or --memory-only, not both", param_hint="--store")
    store_path = None if memory_only else (store or (target if target.is_dir() else target.parent) / "sessions.sqlite")
    policy = SessionPolicy(max_sessions, session_ttl, int(kv_budget_mib * 2**20))
    options = ServeOptions(host, port, store_path, max_batch, max_tokens, policy, max_prompt_tokens=max_prompt_tokens)
    server = open_server(target, value(backend), options,
                         settings(provider, device, engine, openvino_device, openvino_precision), arch_of(arch, softmax_window), heads,
                         vocab)
    info = server.info
    resumed = len(server.sessions.sessions)
    corrupt = server.sessions.corrupt
    if not _loopback(host):
        err_console.print(f"[yellow]warning:[/] listening on {escape(host)}: reachable from the network, no authentication")
    if corrupt:
        err_console.print(f"[yellow]warning:[/] {len(corrupt)} stored session(s) failed their checksum and were not loaded")

    def ready(url: str) -> None:
        where = "memory only" if store_path is None else escape(str(store_path))
        err_console.print(f"serving {escape(str(target))} ({info.arch}, {info.backend}:{escape(info.device)}, {info.dtype}) "
                          f"on {url}; sessions: {resumed} resumed from {where}", highlight=False, soft_wrap=True)

    run(server, ready, log_level)
