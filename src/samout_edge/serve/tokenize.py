"""Prompt text to ids without stalling the event loop.

The ``tokenizers`` library holds the GIL while it normalises a text and builds its
output (a Python list of every id): seconds for a long or NFKC-expanding prompt, and
a thread does not help, every thread of the server waits for it, the event loop and
``/health`` included. So a Hugging Face tokenizer encodes long texts in a child
process, and every text is bounded in characters twice before any of that work:
as sent, and after NFKC normalisation (measured in small pieces that each hold the
GIL briefly, only for text that is not already normalised).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import threading
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor

from samout_edge.serve.errors import ApiError

WORKER_CHARS = 16_384  # texts at least this long are encoded in the child (shorter ones take well under 10 ms)
NFKC_PIECE = 8_192  # characters normalised at a time while measuring the expansion

_worker_tokenizer = None  # the child's own tokenizer


def check_chars(text: str, limit: int) -> None:
    """Refuse a text longer than ``limit`` characters, as sent or once NFKC-normalised (one
    character may become 18: U+FDFA), before a tokenizer spends time and memory on it."""
    if len(text) > limit:
        raise ApiError(f"the prompt is {len(text):,} characters, above this server's limit of {limit:,} "
                       "(serve --max-prompt-chars)", 400, "prompt_too_long")
    if unicodedata.is_normalized("NFKC", text):
        return
    grown = 0
    for start in range(0, len(text), NFKC_PIECE):
        grown += len(unicodedata.normalize("NFKC", text[start : start + NFKC_PIECE]))
        if grown > limit:
            raise ApiError(f"the prompt grows past {limit:,} characters when normalised (NFKC), above this "
                           "server's limit (serve --max-prompt-chars)", 400, "prompt_too_long")


def _init(source: str, parent: int) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(source)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # on a small device's few cores, a long prompt's tokenizing must not starve the event loop
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A server killed with -9 cannot stop its worker: the worker stops itself once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _encode(text: str, limit: int) -> list[int] | int:
    """The ids, or only their count when there are more than ``limit`` (nothing long to send back)."""
    ids = _worker_tokenizer.encode(text, add_special_tokens=False).ids
    return len(ids) if len(ids) > limit else ids


class TokenizerWorker:
    """A child process that encodes with a tokenizer.json, started on the first long prompt.
    One at a time: a second long prompt waits for the first, and the server's threads do not."""

    def __init__(self, source: dict):
        self.source = json.dumps(source)
        self.pool: ProcessPoolExecutor | None = None
        self.lock = threading.Lock()

    def encode(self, text: str, limit: int) -> list[int] | int:
        with self.lock:
            if self.pool is None:
                context = multiprocessing.get_context("spawn")  # no fork of a threaded server
                self.pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init,
                                                initargs=(self.source, os.getpid()))
        return self.pool.submit(_encode, text, limit).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
