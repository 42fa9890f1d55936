"""What a server is started with: ``ServeOptions``, and ``target_options``, which turns
`samout-edge serve`'s files and flags into them (the CLI parses; this decides).

The decisions: sessions persist in ``TARGET/sessions.sqlite`` (a checkpoint file's folder)
unless a store is named or memory only is asked; the API keys are the ones given, then a key
file's lines (refused, as ssh refuses a private key, when others may read it or it holds no
key), then ``$SAMOUT_EDGE_API_KEY``; a chat template file is read here (a
tokenizer_config.json gives its template and special tokens); an address reachable from the
network is refused without a key unless serving open is asked for.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.errors import SamoutError
from samout_edge.serve.sessions import SessionPolicy
from samout_edge.serve.template import read_chat_template

MIN_KEY_LENGTH = 16
API_KEY_ENV = "SAMOUT_EDGE_API_KEY"
STORE_FILE = "sessions.sqlite"


@dataclass
class ServeOptions:
    """Everything a Server is started with; each bound is checked here, once, as its flag names it."""

    host: str = "127.0.0.1"
    port: int = 8000
    store: Path | None = None  # None: sessions live in memory only
    max_batch: int = 32
    max_tokens: int = 4096  # per request
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    max_prompt_tokens: int = 131072  # tokens a request may send; a session's context grows without limit (cummax)
    max_prompt_chars: int = 1 << 20  # characters a text prompt may have, as sent and NFKC-normalised
    store_busy_timeout_s: float = 5.0  # how long a write waits for another process's lock on the store
    api_keys: list[str] = field(default_factory=list)  # any of them opens every route but /health; none: open
    chat_template: str | None = None  # Jinja source for /v1/chat/completions; None: DEFAULT_CHAT_TEMPLATE
    chat_template_vars: dict[str, str] = field(default_factory=dict)  # tokenizer_config.json's bos_token, eos_token...
    template_timeout_s: float = 5.0  # one render of an operator's template, at most (its process is then replaced)
    ubatch: int = PREFILL_UBATCH  # most tokens per prefill call; 0: what the graph takes

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SamoutError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_tokens < 1:
            raise SamoutError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.max_prompt_tokens < 1:
            raise SamoutError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.ubatch < 0:
            raise SamoutError(f"--ubatch must be 0 (calls as long as the graph takes) or a number of tokens, got {self.ubatch}")
        if self.max_prompt_chars < 1:
            raise SamoutError(f"--max-prompt-chars must be at least 1, got {self.max_prompt_chars}")
        if self.policy.max_sessions < 1:
            raise SamoutError(f"--max-sessions must be at least 1, got {self.policy.max_sessions}")
        if not (self.policy.ttl_s > 0 and math.isfinite(self.policy.ttl_s)):
            raise SamoutError(f"--session-ttl must be a positive number of seconds, got {self.policy.ttl_s}")
        if self.policy.kv_budget_bytes is not None and self.policy.kv_budget_bytes < 0:
            raise SamoutError("--kv-budget-mib must be >= 0")
        if not (self.template_timeout_s > 0 and math.isfinite(self.template_timeout_s)):
            raise SamoutError(f"the template timeout must be a positive number of seconds, got {self.template_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise SamoutError(f"--port must be 0..65535, got {self.port}")
        for key in self.api_keys:
            if len(key) < MIN_KEY_LENGTH or not key.isprintable() or any(c.isspace() for c in key):
                raise SamoutError(f"an API key must be at least {MIN_KEY_LENGTH} printable characters without spaces")
            if not key.isascii():  # an HTTP header carries Latin-1 at best: such a key could never match
                raise SamoutError("an API key must be ASCII (a header cannot carry it as UTF-8): this one is not")


def default_store(target: Path) -> Path:
    """Where a target's sessions persist unless told: beside the model, in the target's directory."""
    return (target if target.is_dir() else target.parent) / STORE_FILE


def api_keys(given: Sequence[str] = (), key_file: Path | None = None) -> list[str]:
    """The keys given, the lines of ``key_file`` and $SAMOUT_EDGE_API_KEY, in that order, each once."""
    keys = list(given)
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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def target_options(target: Path, *, store: Path | None = None, memory_only: bool = False,
                   keys: Sequence[str] = (), key_file: Path | None = None, allow_no_api_key: bool = False,
                   chat_template: Path | None = None, **fields: Any) -> ServeOptions:
    """The options `samout-edge serve TARGET` runs with: the store (``default_store`` unless
    ``store`` or ``memory_only``), the keys (``api_keys``), the chat template file read
    (``read_chat_template``), and ``fields`` (host, port, limits, policy) as ServeOptions takes
    them. A non-loopback host without a key is refused unless ``allow_no_api_key``."""
    if memory_only and store is not None:
        raise SamoutError("give --store or --memory-only, not both")
    keys = api_keys(keys, key_file)
    host = fields.get("host", ServeOptions.host)
    if not keys and not is_loopback(host) and not allow_no_api_key:
        raise SamoutError(f"--host {host} is reachable from the network: give an API key (--api-key-file, "
                          "SAMOUT_EDGE_API_KEY or --api-key), or pass --allow-no-api-key to serve it open")
    template, variables = read_chat_template(chat_template) if chat_template is not None else (None, {})
    return ServeOptions(store=None if memory_only else store or default_store(target), api_keys=keys,
                        chat_template=template, chat_template_vars=variables, **fields)
