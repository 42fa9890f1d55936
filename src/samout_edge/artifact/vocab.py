"""The token vocabulary: a JSON list of strings, id i is the i-th.

An export may carry one (``export --vocab FILE`` copies it in as ``vocab.json``,
hashed in export.json like every file), so ``generate``, ``eval`` and ``serve``
take text without being told where its vocab is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

    def __post_init__(self) -> None:
        self.index: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            if token:
                self.index.setdefault(token, i)
        self.longest = max((len(t) for t in self.index), default=0)
        self._automaton: _Automaton | None = None

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        from samout_edge.artifact.files import read_json

        data = read_json(path, "vocab file")
        if not isinstance(data, list) or not any(data) or not all(isinstance(t, str) for t in data):
            raise SamoutError(f"vocab file {path} must be a JSON list of strings, at least one of them non-empty")
        return cls(data)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), known without encoding."""
        return -(-len(text) // self.longest)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match; every character must be covered by some token."""
        if self.longest == 1:  # one character per token: a lookup each
            try:
                return [self.index[c] for c in text]
            except KeyError:
                pos = next(i for i, c in enumerate(text) if c not in self.index)
                raise SamoutError(f"the vocab has no token for {text[pos]!r} (position {pos} of the prompt)") from None
        if self._automaton is None:
            self._automaton = _Automaton(self.index)
        lengths, ids = self._automaton.longest_from_each_position(text)
        out, pos = [], 0
        while pos < len(text):
            if not lengths[pos]:
                raise SamoutError(f"the vocab has no token for {text[pos]!r} (position {pos} of the prompt)")
            out.append(ids[pos])
            pos += lengths[pos]
        return out

    def decode(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else f"<{token_id}>"


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


def export_vocab(target: str | Path) -> Vocab | None:
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
    """(token ids, bytes per token) of a UTF-8 text file: the vocab's greedy encoding, or
    without one the text's UTF-8 bytes (a model with at least 256 ids). eval scores it,
    an fp16 export calibrates on it."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"text file not found: {path}")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise SamoutError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MiB; use a part of it")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SamoutError(f"{path} is not UTF-8 text (byte {e.start}); a text file is expected") from None
    if len(data) < 2:
        raise SamoutError(f"{path} has {len(data)} bytes; at least 2 tokens are needed")
    if vocab is not None:
        ids = np.asarray(vocab.encode(text), dtype=np.int64)
        sizes = np.asarray([len(vocab.tokens[i].encode()) for i in ids], dtype=np.int64)
    else:
        if vocab_size < 256:
            raise SamoutError(f"the model's vocabulary has {vocab_size} ids, fewer than the 256 byte values; "
                              "give --vocab FILE")
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        sizes = np.ones(len(ids), dtype=np.int64)
    if len(ids) < 2:
        raise SamoutError(f"{path} encodes to {len(ids)} token; at least 2 are needed")
    if ids.max() >= vocab_size:
        raise SamoutError(f"token id {int(ids.max())} is outside the model's vocabulary (0..{vocab_size - 1})")
    return ids, sizes
