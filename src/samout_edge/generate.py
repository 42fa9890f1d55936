"""Token generation: one prefill call (any length: the runner chunks it), then one-token
decode calls carrying the state.

The same loop runs on every runner, so the greedy tokens of an export in ONNX
Runtime can be checked against PyTorch on the same checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samout_edge.artifact.vocab import Vocab, check_vocab_fits, export_vocab
from samout_edge.errors import SamoutError
from samout_edge.runtime.base import Runner, check_context

GREEDY_BELOW = 1e-6


@dataclass
class Sampler:
    """Picks each next token. OpenAI's penalties count the tokens this sampler has picked
    (as vLLM does): ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
    then temperature, top-k and top-p (the smallest set of tokens whose probability
    reaches top_p) cut the distribution; temperature 0 takes the argmax."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no cut
    seed: int = 0
    top_p: float = 1.0  # 1: no cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's (CTRL's): the context's tokens' logits divided (> 0) or multiplied by it
    rng: np.random.Generator = field(init=False)
    counts: dict[int, int] = field(init=False, default_factory=dict)
    context: set[int] = field(init=False, default_factory=set)  # the prompt's tokens, for repetition_penalty

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamoutError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamoutError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamoutError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamoutError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise SamoutError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        token = self._pick(logits.astype(np.float64))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _pick(self, logits: np.ndarray) -> int:
        if self.repetition_penalty != 1 and (self.context or self.counts):
            seen = np.fromiter(self.context.union(self.counts), np.int64)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        if self.counts and (self.presence_penalty or self.frequency_penalty):
            seen = np.fromiter(self.counts, np.int64)
            times = np.fromiter(self.counts.values(), np.float64)
            logits[seen] -= self.frequency_penalty * times + self.presence_penalty
        if self.temperature < GREEDY_BELOW:  # below this, exp overflows and the softmax is argmax anyway
            return int(np.argmax(logits))
        if self.top_k:
            cut = np.partition(logits, -self.top_k)[-self.top_k] if self.top_k < logits.size else -np.inf
            logits = np.where(logits < cut, -np.inf, logits)
        z = (logits - logits.max()) / self.temperature
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]  # reaches top_p
            nucleus = np.zeros_like(p)
            nucleus[keep] = p[keep]
            p = nucleus / nucleus.sum()
        return int(self.rng.choice(logits.size, p=p))


@dataclass
class GenerateResult:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, len(self.new_ids) - 1)  # the first new token comes from the prefill call
        return steps / self.decode_s if self.decode_s else float("nan")


def check_ids(ids: list[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise SamoutError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def generate(
    runner: Runner,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerateResult:
    if not prompt_ids:
        raise SamoutError("the prompt is empty")
    if max_new_tokens < 1:
        raise SamoutError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_ids(prompt_ids, runner.info.config.vocab_size)
    # any length for cummax (run() chunks a long prompt); softmax: what its cache and memory hold
    check_context(runner.info, len(prompt_ids) + max_new_tokens - 1, 1,
                  f"a prompt of {len(prompt_ids)} tokens and {max_new_tokens} new ones")
    sampler = sampler or Sampler()
    ids = np.asarray([prompt_ids], dtype=np.int64)
    t0 = time.perf_counter()
    logits, state = runner.run(ids, runner.initial_state(1))
    token = sampler(finite_last(runner, logits, 0))
    prefill_s = time.perf_counter() - t0
    new = [token]
    if on_token:
        on_token(token)
    t0 = time.perf_counter()
    while len(new) < max_new_tokens:
        logits, state = runner.run(np.asarray([[token]], dtype=np.int64), state)
        token = sampler(finite_last(runner, logits, len(new)))
        new.append(token)
        if on_token:
            on_token(token)
    return GenerateResult(list(prompt_ids), new, prefill_s, time.perf_counter() - t0)


def finite_last(runner: Runner, logits, step: int) -> np.ndarray:
    """The last position's logits; a NaN or an infinity there is an error, never a sampled token."""
    last = runner.to_numpy(logits)[0, -1]
    if not np.isfinite(last).all():
        raise SamoutError(f"the model gave non-finite logits at new token {step + 1} (an fp16 overflow, or a call "
                          "past the export's max_seq): refusing to sample from them")
    return last


def parse_prompt(ids: str | None, prompt: str | None, vocab: Vocab | None) -> list[int]:
    if (ids is None) == (prompt is None):
        raise SamoutError("give either --ids 1,2,3 or --prompt TEXT (with --vocab FILE)")
    if prompt is not None:
        if vocab is None:
            raise SamoutError("--prompt needs --vocab FILE (a JSON list of token strings)")
        return vocab.encode(prompt)
    try:
        return [int(part) for part in ids.replace(" ", "").split(",") if part]
    except ValueError:
        raise SamoutError(f"--ids takes comma-separated integers, got {ids!r}") from None


def vocab_for(path: Path | None, vocab_size: int, target: Path | None = None) -> Vocab | None:
    """``--vocab FILE``, else the vocab an export (or the export of an engine directory) carries."""
    vocab = Vocab.load(path) if path is not None else export_vocab(target) if target is not None else None
    if vocab is not None:  # the export's own too: one made before this check may hold ids past the model
        check_vocab_fits(vocab, vocab_size, "--vocab" if path is not None else "the export's vocab.json")
    return vocab
