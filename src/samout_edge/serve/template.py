"""Chat templates as Hugging Face renders them, in a process of their own with bounds.

A template is rendered as ``transformers.apply_chat_template`` does: Jinja's immutable
sandbox with ``trim_blocks``, ``lstrip_blocks`` and the loop-controls extension
(``{% break %}``), ``raise_exception`` and ``tojson`` as HF defines them, and the
tokenizer_config.json's special tokens (``bos_token``, ``eos_token``, ...) as variables.

An operator's template is code: nested ``range(100000)`` loops or ``lipsum(200000)`` never
return, and ``'a'*10**9`` takes gigabytes. So it renders in a child process (its own GIL:
``/health`` goes on answering), under a time bound (the child is killed and replaced past
it), an address-space bound and an output bound; every failure is one line, and the
server refuses at start a template that fails those bounds on a sample conversation.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

from samout_edge.errors import SamoutError

# The chat template of a base model (no chat_template of its own), stated in docs/serving.md:
# one "role: content" line per message, then "assistant: " for the model to continue. The
# generation prompt is an assistant message's line up to its content, space included, as
# Hugging Face's generation prompts are: ending at "assistant:" left the trained byte models
# (Python source) reading a block opener, and they answered a newline and indentation.
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")

# What a template is checked on at start: user and assistant alternating (a Gemma template
# refuses a system message, so none here), as every chat template must take.
SAMPLE_CONVERSATION = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi, how can I help?"},
                       {"role": "user", "content": "Tell me a short story."}]

# tokenizer_config.json's special tokens a template may name (HF passes its special_tokens_map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


STARTUP_S = 60.0  # a fresh Python importing Jinja, on a loaded machine


class TemplateFailure(SamoutError):
    """The template failed on these messages (an error it raised, or a bound): the request's 4xx."""


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens of a tokenizer_config.json as strings (HF stores a string or an
    AddedToken's ``{"content": ...}``): the variables ``apply_chat_template`` gives a template."""
    found = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[name] = value
    return found


def read_chat_template(path: Path) -> tuple[str, dict[str, str]]:
    """--chat-template's source and the variables Hugging Face renders it with: a
    tokenizer_config.json gives its chat_template and its special tokens (``bos_token``,
    ``eos_token``, ...), which templates print; an empty template is refused, never the default."""
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


MAX_PRODUCT = 1 << 20  # the longest string or list one `*` in a template may make, and the largest `**` exponent


def environment():
    """The Jinja environment of ``transformers``' ``_compile_jinja_template``, whose `*` and `**`
    are bounded: Jinja folds constant expressions while it compiles (``'a' * 10**9`` took 12 s and
    2 GB in the server, before any render), unless the sandbox intercepts the operator; then it
    is computed at render time, in the child, where a too large product is the template's error."""
    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and \
                            len(seq) * count > MAX_PRODUCT:
                        raise TemplateError(f"the chat template repeats a value past {MAX_PRODUCT:,} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise TemplateError("the chat template raises a number to a power past 1,024")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def compile_template(source: str | None):
    """The template parsed (a syntax error is one line at start); None: the default."""
    from jinja2 import TemplateError

    if source is not None and not source.strip():
        raise SamoutError("the chat template is empty: give a template, or leave --chat-template out for the default")
    try:
        return environment().from_string(source if source is not None else DEFAULT_CHAT_TEMPLATE)
    except TemplateError as e:
        raise SamoutError(f"the chat template does not parse: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise SamoutError(f"the chat template does not parse: {type(e).__name__}") from None


def render_bounded(template, variables: dict[str, Any], max_chars: int) -> str:
    """Render, refusing output past ``max_chars`` as it is produced (a loop of text stops there)."""
    out, size = [], 0
    for piece in template.generate(**variables):
        size += len(piece)
        if size > max_chars:
            raise TemplateFailure(f"the chat template's output passed {max_chars:,} characters")
        out.append(piece)
    return "".join(out)


def _limit_memory(extra_bytes: int) -> None:
    """The child's data (heap and private writable mappings, where a big string lands): what it
    holds now plus ``extra_bytes`` (Linux; elsewhere none). Not the address space: libraries
    reserve gigabytes of it they never touch, so a bound on it moves with what was imported."""
    try:
        import resource

        with open("/proc/self/status") as f:
            data_kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
        limit = data_kib * 1024 + extra_bytes
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (OSError, ValueError, ImportError, StopIteration):
        pass


def _child(conn, source: str | None, variables: dict[str, Any], max_chars: int, memory_bytes: int) -> None:
    """The render process: one request at a time off the pipe, (True, text) or (False, message) back."""
    template = compile_template(source)
    _limit_memory(memory_bytes)
    conn.send("ready")  # the time bound counts from here: starting Python is not the template's time
    while True:
        try:
            messages, add_generation_prompt = conn.recv()
        except EOFError:
            return
        try:
            text = render_bounded(template, {**variables, "messages": messages, "tools": None, "documents": None,
                                             "add_generation_prompt": add_generation_prompt}, max_chars)
            conn.send((True, text))
        except TemplateFailure as e:
            conn.send((False, str(e)))
        except MemoryError:
            conn.send((False, f"the chat template needed more than {memory_bytes >> 20} MiB"))
        except RecursionError:
            conn.send((False, "the chat template recursed too deeply (RecursionError)"))
        except Exception as e:  # noqa: BLE001 - a template raising anything is the request's 4xx
            conn.send((False, f"{type(e).__name__}: {str(e)[:300]}"))


class ChatTemplate:
    """A chat template rendered in a child process, one render at a time, within ``timeout_s``."""

    def __init__(self, source: str | None = None, variables: dict[str, str] | None = None,
                 timeout_s: float = 5.0, max_chars: int = 32 << 20, memory_bytes: int = 512 << 20):
        compiled = compile_template(source)  # parse errors here, in the server, at once
        self.local = compiled if source is None else None  # ours, trusted: rendered here, no process
        self.source, self.variables = source, dict(variables or {})
        self.timeout_s, self.max_chars, self.memory_bytes = timeout_s, max_chars, memory_bytes
        self.lock = threading.Lock()
        self.process = self.conn = None

    def check(self) -> None:
        """Render the sample conversation at start: a template that hangs, floods or exhausts
        memory there is refused before the server takes requests (one line)."""
        try:
            self.render(SAMPLE_CONVERSATION)
        except TemplateFailure as e:
            if "raised" not in str(e):
                raise SamoutError(f"the chat template fails on a sample conversation: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; TemplateFailure (one line) if the template raised or passed a bound.
        Blocks: call it from a thread, not the event loop."""
        if self.local is not None:
            return render_bounded(self.local, {**self.variables, "messages": messages,
                                               "add_generation_prompt": add_generation_prompt}, self.max_chars)
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self._start()
            try:
                self.conn.send((messages, add_generation_prompt))
                done = self.conn.poll(self.timeout_s)
                ok, value = self.conn.recv() if done else (False, None)
            except (EOFError, OSError):  # the child died (killed for memory): a fresh one next time
                self._stop()
                raise TemplateFailure("the chat template's renderer died on these messages (out of memory?)") from None
            if not done:
                self._stop()
                raise TemplateFailure(f"the chat template took longer than {self.timeout_s:g} s on these messages")
        if not ok:
            raise TemplateFailure(value if "chat template" in value else f"the chat template raised {value}")
        return value

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: the server has threads (the batcher, ORT's)
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_child, name="samout-chat-template", daemon=True,
                                       args=(child, self.source, self.variables, self.max_chars, self.memory_bytes))
        self.process.start()
        child.close()
        try:
            ready = self.conn.poll(STARTUP_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop()
            raise TemplateFailure(f"the chat template's renderer did not start within {STARTUP_S} s")

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def close(self) -> None:
        with self.lock:
            self._stop()
