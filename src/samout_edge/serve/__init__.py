"""`samout-edge serve`: an OpenAI-style HTTP server with persistent, batched sessions.

``serve_target`` is the one call the CLI makes (``target_options`` builds its options);
``open_server`` and ``run`` are its two halves. The modules, in the order a request
meets them: http.py (keys, the body bound, error bodies), app.py (the routes),
protocol.py (the request bodies), server.py (the Server: prompts, limits, admission),
completion.py (a request in flight, its answer or stream), batcher.py (every request's
steps in one worker thread), sessions.py (the states, in memory and SQLite). Needs the
``[serve]`` extra (FastAPI, uvicorn, Jinja); no torch.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from samout_edge.errors import SamoutError, install_hint

if TYPE_CHECKING:
    from samout_edge.runtime.registry import Settings
    from samout_edge.serve.options import ServeOptions
    from samout_edge.serve.server import Server

SERVE_INSTALL = install_hint("serve")


def require_serve() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise SamoutError(f"serve needs {' and '.join(missing)}, which this install does not have: {SERVE_INSTALL}")


def open_server(target: Path, backend: str, options: ServeOptions, settings: Settings | None = None,
                arch: str = "cummax", heads: int | None = None, vocab: Path | None = None) -> Server:
    """Load the runner (in the batcher's thread), the vocab and the stored sessions. The
    target is resolved once (runtime/target.py): its identity keys the store, and the
    batcher's thread opens its runner."""
    require_serve()
    from samout_edge.generate import vocab_for
    from samout_edge.runtime.registry import Settings
    from samout_edge.runtime.target import engine_of, open_runner, resolve_target
    from samout_edge.serve.server import Server, model_identity

    settings = settings or Settings()
    resolved = resolve_target(target, engine_of(settings))

    def load():
        return open_runner(resolved, backend, settings, arch, heads, ubatch=options.ubatch)

    server = Server(load, options, model_identity(resolved), model_name=target.resolve().name or "samout")
    try:
        server.vocab = vocab_for(vocab, server.info.config.vocab_size, resolved.export_dir)
    except BaseException:
        server.close()
        raise
    return server


def serve_target(target: Path, backend: str, options: ServeOptions, settings: Settings | None = None,
                 arch: str = "cummax", heads: int | None = None, vocab: Path | None = None,
                 on_ready: Callable[[Server, str], None] | None = None, log_level: str = "warning") -> None:
    """`samout-edge serve`: open the server (``open_server``) and serve until stopped (``run``);
    ``on_ready`` gets the server and its URL once the port is bound."""
    server = open_server(target, backend, options, settings, arch, heads, vocab)
    run(server, None if on_ready is None else lambda url: on_ready(server, url), log_level)


def listen(host: str, port: int) -> socket.socket:
    """Bind before starting, so a taken port is one clear error and port 0 gets a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise SamoutError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(server: Server, on_ready: Callable[[str], None] | None = None, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM, then stop the batcher. uvicorn shuts down
    gracefully (in-flight requests finish and commit their sessions) and then
    re-raises the signal it caught: the handlers here make that a clean exit 0."""
    import signal

    import uvicorn

    from samout_edge.serve.app import create_app

    try:
        sock = listen(server.options.host, server.options.port)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(create_app(server), log_level=log_level, access_log=False)
        if on_ready:
            on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        server.close()
