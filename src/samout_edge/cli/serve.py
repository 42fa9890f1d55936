"""The serve command: an OpenAI-style HTTP server (library: samout_edge.serve)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.cli.backend_options import backend_options
from samout_edge.cli.common import ARCH_HELP, WINDOW_HELP, app, arch_of
from samout_edge.cli.ui import err_console
from samout_edge.errors import SamoutError
from samout_edge.runtime.registry import Settings

API_KEY_ENV = "SAMOUT_EDGE_API_KEY"


def api_keys(given: list[str] | None, key_file: Path | None) -> list[str]:
    """--api-key, the lines of --api-key-file and $SAMOUT_EDGE_API_KEY, in that order, each once."""
    keys = list(given or [])
    if key_file is not None:
        keys += key_file_keys(key_file)
    if os.environ.get(API_KEY_ENV, "").strip():
        keys.append(os.environ[API_KEY_ENV].strip())
    return list(dict.fromkeys(keys))


def key_file_keys(key_file: Path) -> list[str]:
    """The keys of --api-key-file, one a line. Refused, as ssh refuses a private key: a file
    others may read (anyone on the machine could use the keys), and a file with no key (the
    operator asked for keys; serving open instead would be silence)."""
    try:
        mode = key_file.stat().st_mode
        text = key_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SamoutError(f"--api-key-file {key_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if os.name == "posix" and mode & 0o077:
        raise SamoutError(f"--api-key-file {key_file} is accessible by other users (mode {mode & 0o777:04o}): "
                          f"chmod 600 {key_file}")
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise SamoutError(f"--api-key-file {key_file} holds no key (empty, or only blank lines): write one key a line")
    return keys


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    keys = api_keys(api_key, api_key_file)
    if not keys and not _loopback(host) and not allow_no_api_key:
        raise SamoutError(f"--host {host} is reachable from the network: give an API key (--api-key-file, "
                          "SAMOUT_EDGE_API_KEY or --api-key), or pass --allow-no-api-key to serve it open")
    policy = SessionPolicy(max_sessions, session_ttl, int(kv_budget_mib * 2**20))
    template, template_vars = read_chat_template(chat_template) if chat_template is not None else (None, {})
    options = ServeOptions(host, port, store_path, max_batch, max_tokens, policy, max_prompt_tokens=max_prompt_tokens,
                           max_prompt_chars=max_prompt_chars,
                           api_keys=keys, chat_template=template, chat_template_vars=template_vars)
    server = open_server(target, backend, options, settings, arch_of(arch, softmax_window), heads, vocab)
    info = server.info
    resumed = len(server.sessions.sessions)
    corrupt = server.sessions.corrupt
    if not _loopback(host) and not keys:
        err_console.print(f"[yellow]warning:[/] listening on {escape(host)}: reachable from the network, no API key "
                          "(--allow-no-api-key)")
    if corrupt:
        err_console.print(f"[yellow]warning:[/] {len(corrupt)} stored session(s) failed their checksum and were not loaded")

    def ready(url: str) -> None:
        where = "memory only" if store_path is None else escape(str(store_path))
        err_console.print(f"serving {escape(str(target))} ({info.arch}, {info.backend}:{escape(info.device)}, {info.dtype}) "
                          f"on {url}; sessions: {resumed} resumed from {where}; "
                          f"{f'{len(keys)} API key(s)' if keys else 'no API key'}", highlight=False, soft_wrap=True)

    run(server, ready, log_level)


def read_chat_template(path: Path) -> tuple[str, dict[str, str]]:
    """--chat-template's source and the variables Hugging Face renders it with: a
    tokenizer_config.json gives its chat_template and its special tokens (``bos_token``,
    ``eos_token``, ...), which templates print; an empty template is refused, never the default."""
    import json

    from samout_edge.serve.template import special_tokens

    try:
        template = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SamoutError(f"--chat-template {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    variables: dict[str, str] = {}
    if path.suffix == ".json":  # a Hugging Face tokenizer_config.json: its chat_template
        try:
            config = json.loads(template)
            template = config["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise SamoutError(f"--chat-template {path}: a JSON file must be a tokenizer_config.json "
                              "with a chat_template string") from None
        if not isinstance(template, str):
            raise SamoutError(f"--chat-template {path}: its chat_template is not one template string")
        variables = special_tokens(config)
    if not template.strip():
        raise SamoutError(f"--chat-template {path}: the template is empty (leave --chat-template out for the default)")
    return template, variables
