"""The serve command: an OpenAI-style HTTP server (library: samout_edge.serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.artifact.arch import ARCH_HELP
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.cli.backend_options import backend_options
from samout_edge.cli.common import UBATCH_HELP, WINDOW_HELP, app, arch_of
from samout_edge.cli.ui import err_console
from samout_edge.runtime.registry import Settings


@app.command()
@backend_options()
def serve(
    target: Path = typer.Argument(..., help="Export directory, engine directory (engines/<profile>), or a checkpoint (torch)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback exposes the server to the network."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one; the URL is printed)."),
    store: Optional[Path] = typer.Option(None, help="SQLite file the sessions persist in [default: TARGET/sessions.sqlite]."),
    memory_only: bool = typer.Option(False, "--memory-only", help="Keep sessions in memory only (lost on restart)."),
    vocab: Optional[Path] = typer.Option(None, help="JSON list of token strings, or 'bytes' (UTF-8 bytes), for text prompts and output [default: the export's]."),
    backend: str = "auto",
    settings: Optional[Settings] = None,
    arch: str = typer.Option("cummax", help="For a checkpoint: " + ARCH_HELP),
    softmax_window: int = typer.Option(0, "--softmax-window", min=0, help="For a checkpoint: " + WINDOW_HELP),
    heads: Optional[int] = typer.Option(None, help="Head count of a bare state_dict (default 8)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Requests per runner call (an engine's profiles may cap it)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(131072, "--max-prompt-tokens", min=1,
                                          help="Most prompt tokens one request may send (a cummax session's context "
                                          "has no limit: long prompts are fed in chunks)."),
    max_prompt_chars: int = typer.Option(1 << 20, "--max-prompt-chars", min=1,
                                         help="Most characters a text prompt may have, as sent and once "
                                         "NFKC-normalised (checked before tokenizing)."),
    max_sessions: int = typer.Option(10_000, "--max-sessions", min=1, help="Past this, the least recently used idle session is evicted."),
    session_ttl: float = typer.Option(86_400.0, "--session-ttl", help="Seconds idle before a session is evicted."),
    kv_budget_mib: float = typer.Option(256.0, "--kv-budget-mib", min=0, help="Softmax: all sessions' KV caches together."),
    api_key: Optional[list[str]] = typer.Option(
        None, "--api-key", help="A key clients send as 'Authorization: Bearer KEY' (repeatable; every route but "
        "/health needs one; a key's sessions are its own). Better: the SAMOUT_EDGE_API_KEY environment variable or "
        "--api-key-file, which other users of the machine cannot read in the process list."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="A file of API keys, one per line."),
    allow_no_api_key: bool = typer.Option(False, "--allow-no-api-key",
                                          help="Listen on a non-loopback address without an API key (anyone who "
                                          "reaches the port can generate and use any session)."),
    chat_template: Optional[Path] = typer.Option(
        None, "--chat-template", help="A Jinja chat template (Hugging Face's chat_template: messages, "
        "add_generation_prompt), or a tokenizer_config.json holding one, for /v1/chat/completions "
        "[default: 'role: content' lines, then 'assistant: ']."),
    ubatch: int = typer.Option(PREFILL_UBATCH, "--ubatch", min=0, help=UBATCH_HELP),
    log_level: str = typer.Option("warning", help="uvicorn's log level (info shows each request)."),
) -> None:
    """Serve completions over HTTP with sessions that persist across restarts."""
    from samout_edge.serve import require_serve, serve_target

    require_serve()  # before importing the server, which imports FastAPI
    from samout_edge.serve.options import is_loopback, target_options
    from samout_edge.serve.sessions import SessionPolicy

    if memory_only and store is not None:
        raise typer.BadParameter("give --store or --memory-only, not both", param_hint="--store")
    options = target_options(target, store=store, memory_only=memory_only, keys=api_key or [], key_file=api_key_file,
                             allow_no_api_key=allow_no_api_key, chat_template=chat_template, host=host, port=port,
                             max_batch=max_batch, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                             max_prompt_chars=max_prompt_chars, ubatch=ubatch,
                             policy=SessionPolicy(max_sessions, session_ttl, int(kv_budget_mib * 2**20)))

    def ready(server, url: str) -> None:
        info, keys, corrupt = server.info, options.api_keys, server.sessions.corrupt
        if not is_loopback(host) and not keys:
            err_console.print(f"[yellow]warning:[/] listening on {escape(host)}: reachable from the network, no API "
                              "key (--allow-no-api-key)")
        if corrupt:
            err_console.print(f"[yellow]warning:[/] {len(corrupt)} stored session(s) failed their checksum and were "
                              "not loaded")
        where = "memory only" if options.store is None else escape(str(options.store))
        err_console.print(f"serving {escape(str(target))} ({info.arch}, {info.backend}:{escape(info.device)}, "
                          f"{info.dtype}) on {url}; sessions: {len(server.sessions.sessions)} resumed from {where}; "
                          f"{f'{len(keys)} API key(s)' if keys else 'no API key'}", highlight=False, soft_wrap=True)

    serve_target(target, backend, options, settings, arch_of(arch, softmax_window), heads, vocab, ready, log_level)
