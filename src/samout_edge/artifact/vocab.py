"""The token vocabulary: UTF-8 bytes, or a JSON list of strings (id i is the i-th).

- ``bytes`` (``ByteVocab``): id b is the byte b of the text's UTF-8 encoding, as a
  byte-level model was trained ("é" is the two ids 0xC3 0xA9); decoding is incremental,
  so a streamed character is never split, and an invalid sequence shows as U+FFFD.
- a list of strings (``Vocab``, seed-code vocabularies): text is matched greedily,
  longest token first, character by character; a character no token covers is an
  error, never a guess.

- a Hugging Face ``tokenizer.json`` (``HFTokenizer``, the ``tokenizers`` library: the
  general case, real models' tokenizers), its decoding incremental too: adapted in
  hf_tokenizer.py.

An export may carry one (``export --vocab FILE|bytes`` writes ``vocab.json``, hashed
in export.json like every file: the list, ``{"kind": "utf-8 bytes"}``, or a Hugging
Face tokenizer.json as it is), so ``generate``, ``eval`` and ``serve`` take text without
being told where its vocab is.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact.hf_tokenizer import _UNICODE_BYTES, HFTokenizer  # noqa: F401 - vocab's API
from samout_edge.artifact.text import byte_name, check_text, name_of  # noqa: F401 - vocab's API
from samout_edge.errors import SamoutError

VOCAB_FILE = "vocab.json"
MAX_TEXT_BYTES = 64 << 20


@dataclass
class Vocab:
    """A JSON list of token strings; id i is tokens[i].

    Text is matched greedily, longest token first, left to right (the first id of
    a token listed twice wins), in time linear in the text whatever the tokens'
    lengths: an Aho-Corasick automaton over the reversed tokens finds, for every
    position, the longest token starting there.
    """

    tokens: list[str]
    kind = "strings"

    @property
    def size(self) -> int:
        return len(self.tokens)

    def to_json(self) -> list[str]:
        return self.tokens

    def decode_ids(self, ids: list[int]) -> str:
        return "".join(self.decode(i) for i in ids)

    def stream(self) -> Callable[[int], str]:
        """A token at a time -> the text it completes (every token is whole text here)."""
        return self.decode

    def token_bytes(self, ids: list[int]) -> np.ndarray:
        return np.asarray([len(self.tokens[i].encode()) for i in ids], dtype=np.int64)

    def __post_init__(self) -> None:
        self.index: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            if token:
                self.index.setdefault(token, i)
        self.longest = max((len(t) for t in self.index), default=0)
        self._automaton: _Automaton | None = None

    @classmethod
    def load(cls, path: str | Path) -> Vocab | ByteVocab:
        """A vocab file (``bytes`` names the UTF-8 byte vocab without one)."""
        from samout_edge.artifact.files import read_json

        if str(path) == BYTES:
            return ByteVocab()
        data = read_json(path, "vocab file")
        if data == ByteVocab().to_json():
            return ByteVocab()
        if isinstance(data, dict) and "model" in data:  # a Hugging Face tokenizer.json
            return HFTokenizer.load(path)
        if not isinstance(data, list) or not any(data) or not all(isinstance(t, str) for t in data):
            raise SamoutError(f"vocab file {path} must be a JSON list of strings, at least one of them non-empty "
                              f"(or {json.dumps(ByteVocab().to_json())})")
        return cls(data)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), known without encoding."""
        return -(-len(text) // self.longest)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match; every character must be covered by some token."""
        check_text(text)
        return self.encode_prefix(text, final=True)[0]

    def token_name(self, token_id: int) -> tuple[str, list[int]]:
        """(name, UTF-8 bytes) of one token, for logprobs."""
        name = self.decode(token_id)
        return name, list(name.encode("utf-8", errors="replace"))

    def encode_prefix(self, text: str, final: bool) -> tuple[list[int], int]:
        """(ids, characters used) of ``text``'s greedy encoding, stopping (unless ``final``)
        before the first token that more text could still lengthen: encoding a stream
        piece by piece, with the unused rest carried, gives the whole text's tokens."""
        if self.longest == 1:  # one character per token: a lookup each
            try:
                return [self.index[c] for c in text], len(text)
            except KeyError:
                pos = next(i for i, c in enumerate(text) if c not in self.index)
                raise SamoutError(f"the vocab has no token for {text[pos]!r} (position {pos} of the text)") from None
        if self._automaton is None:
            self._automaton = _Automaton(self.index)
        lengths, ids = self._automaton.longest_from_each_position(text)
        out, pos = [], 0
        safe = len(text) if final else len(text) - self.longest + 1
        while pos < safe:
            if not lengths[pos]:
                raise SamoutError(f"the vocab has no token for {text[pos]!r} (position {pos} of the text)")
            out.append(ids[pos])
            pos += lengths[pos]
        return out, pos

    def decode(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else f"<{token_id}>"


BYTES = "bytes"  # --vocab bytes: the UTF-8 byte vocab


class ByteVocab:
    """UTF-8 bytes: id b is byte b. What a byte-level model (benchmarks/trained/) was trained on."""

    kind = "utf-8 bytes"
    size = 256
    longest = 1

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind}

    def fewest_tokens(self, text: str) -> int:
        return len(text)  # a character is one to four bytes

    def encode(self, text: str) -> list[int]:
        check_text(text)  # a lone surrogate is no character: never its 3 surrogatepass bytes
        return list(text.encode("utf-8"))

    def encode_prefix(self, text: str, final: bool) -> tuple[list[int], int]:
        return self.encode(text), len(text)

    def decode_ids(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream(self) -> Callable[[int], str]:
        """A token at a time -> the text it completes: a character's bytes yield it once all
        have come; an invalid sequence yields U+FFFD."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda token_id: decoder.decode(bytes([token_id]))

    def decode(self, token_id: int) -> str:
        """One byte alone: itself if ASCII, else U+FFFD (decode_ids or stream read whole characters)."""
        return chr(token_id) if token_id < 128 else "\ufffd"

    def token_name(self, token_id: int) -> tuple[str, list[int]]:
        """(name, bytes): ASCII itself, any other byte ``bytes:\\xNN`` as OpenAI names a partial
        character, so the 128 bytes >= 0x80 keep 128 names (not one U+FFFD)."""
        return name_of(bytes([token_id]))

    def token_bytes(self, ids: list[int]) -> np.ndarray:
        return np.ones(len(ids), dtype=np.int64)


class _Automaton:
    """Aho-Corasick over the reversed tokens. Reading the text backwards, the state
    after text[p] is the longest suffix read so far that begins a reversed token, and
    the longest token ending there (reversed: starting at p) is its longest terminal
    suffix, precomputed per state."""

    def __init__(self, index: dict[str, int]):
        goto: list[dict[str, int]] = [{}]
        depth, terminal = [0], [-1]
        for token, token_id in index.items():
            state = 0
            for c in reversed(token):
                nxt = goto[state].get(c)
                if nxt is None:
                    nxt = len(goto)
                    goto[state][c] = nxt
                    goto.append({})
                    depth.append(depth[state] + 1)
                    terminal.append(-1)
                state = nxt
            terminal[state] = token_id
        fail = [0] * len(goto)
        best_len = [depth[s] if terminal[s] >= 0 else 0 for s in range(len(goto))]
        best_id = list(terminal)
        queue = list(goto[0].values())
        for state in queue:  # breadth first: a state's failure link is shallower, so already final
            for c, nxt in goto[state].items():
                f = fail[state]
                while f and c not in goto[f]:
                    f = fail[f]
                fail[nxt] = goto[f][c] if c in goto[f] and goto[f][c] != nxt else 0
                if terminal[nxt] < 0:
                    best_len[nxt], best_id[nxt] = best_len[fail[nxt]], best_id[fail[nxt]]
                queue.append(nxt)
        self.goto, self.fail, self.best_len, self.best_id = goto, fail, best_len, best_id

    def longest_from_each_position(self, text: str) -> tuple[list[int], list[int]]:
        """(length, id) of the longest token starting at each position (length 0: none)."""
        goto, fail, best_len, best_id = self.goto, self.fail, self.best_len, self.best_id
        lengths, ids = [0] * len(text), [0] * len(text)
        state = 0
        for pos in range(len(text) - 1, -1, -1):
            c = text[pos]
            while state and c not in goto[state]:
                state = fail[state]
            state = goto[state].get(c, 0)
            lengths[pos], ids[pos] = best_len[state], best_id[state]
        return lengths, ids


def check_vocab_fits(vocab: Vocab | ByteVocab | HFTokenizer, model_ids: int, what: str) -> None:
    """Refuse a vocab whose highest id is past the model's: text would encode to ids the
    model's embedding cannot gather (a 500 at the first request, not an answer)."""
    if vocab.size > model_ids:
        raise SamoutError(f"{what} has token ids up to {vocab.size - 1:,}, the model only 0..{model_ids - 1:,} "
                          "(a vocab made for another model)")


def export_vocab(target: str | Path) -> Vocab | ByteVocab | HFTokenizer | None:
    """The vocab an export directory carries (an engine directory: its export's), checked
    against the hash export.json records; None when it carries none."""
    from samout_edge.artifact.engine import is_engine_dir
    from samout_edge.artifact.files import sha256_file
    from samout_edge.artifact.manifest import is_export_dir, read_manifest

    directory = Path(target)
    if is_engine_dir(directory):
        directory = directory.parent.parent
    if not is_export_dir(directory):
        return None
    entry = read_manifest(directory).files.get(VOCAB_FILE)
    if entry is None:
        return None
    path = directory / VOCAB_FILE
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise SamoutError(f"{path} does not match the sha256 export.json records for it (edited or damaged)")
    return Vocab.load(path)


def read_tokens(path: Path, vocab_size: int, vocab: Vocab | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, bytes per token) of a UTF-8 text file, whole (up to MAX_TEXT_BYTES):
    the vocab's greedy encoding, or without one the text's UTF-8 bytes (a model with at
    least 256 ids). eval scores it in windows, an fp16 export calibrates on it."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_TEXT_BYTES:
        raise SamoutError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MiB; use a part of it (or eval --stream)")
    pieces = list(iter_tokens(path, vocab_size, vocab))
    ids = np.concatenate([i for i, _ in pieces]) if pieces else np.zeros(0, np.int64)
    sizes = np.concatenate([b for _, b in pieces]) if pieces else np.zeros(0, np.int64)
    if len(ids) < 2:
        raise SamoutError(f"{path} encodes to {len(ids)} token{'s' * (len(ids) != 1)}; at least 2 tokens are needed")
    return ids, sizes


def head_tokens(path: Path, vocab_size: int, vocab: Vocab | None, limit: int,
                piece_bytes: int = 1 << 16) -> np.ndarray:
    """The first ``limit`` token ids of a UTF-8 text file: read and encoded a piece at a time,
    stopping once ``limit`` are in hand, so a calibration file far longer than what GPTQ or
    fp16 use costs only what they use (not the whole file's encoding)."""
    pieces, have = [], 0
    for ids, _ in iter_tokens(path, vocab_size, vocab, piece_bytes):
        pieces.append(ids[: limit - have])
        have += len(pieces[-1])
        if have >= limit:
            break
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if len(ids) < 2:
        raise SamoutError(f"{path} encodes to {len(ids)} token{'s' * (len(ids) != 1)}; at least 2 tokens are needed")
    return ids


def iter_tokens(path: Path, vocab_size: int, vocab: Vocab | None = None,
                piece_bytes: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, bytes per token) of a UTF-8 text file, a piece at a time, so memory
    stays flat whatever the file's size; the pieces join to exactly the whole file's
    tokens (a token is only emitted once no longer one could start where it starts)."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"text file not found: {path}")
    if vocab is None and vocab_size < 256:
        raise SamoutError(f"the model's vocabulary has {vocab_size} ids, fewer than the 256 byte values; "
                          "give --vocab FILE")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            data = f.read(piece_bytes)
            final = not data
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                raise SamoutError(f"{path} is not UTF-8 text (byte {offset + e.start}); a text file is expected") from None
            offset += len(data)
            if vocab is None:
                if data:
                    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
                    yield ids, np.ones(len(ids), dtype=np.int64)
            else:
                if isinstance(vocab, HFTokenizer):
                    tokens, sizes, used = vocab.encode_sized(carry + text, final)
                else:
                    tokens, used = vocab.encode_prefix(carry + text, final)
                    sizes = vocab.token_bytes(tokens)
                carry = (carry + text)[used:]
                if tokens:
                    ids = np.asarray(tokens, dtype=np.int64)
                    if ids.max() >= vocab_size:
                        raise SamoutError(f"token id {int(ids.max())} is outside the model's vocabulary "
                                          f"(0..{vocab_size - 1})")
                    yield ids, sizes
            if final:
                return
