"""The token vocabulary: a JSON list of strings, id i is the i-th.

An export may carry one (``export --vocab FILE`` copies it in as ``vocab.json``,
hashed in export.json like every file), so ``generate``, ``eval`` and ``serve``
take text without being told where its vocab is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samout_edge.errors import SamoutError

VOCAB_FILE = "vocab.json"


@dataclass
class Vocab:
    """A JSON list of token strings; id i is tokens[i]."""

    tokens: list[str]

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        from samout_edge.artifact.files import read_json

        data = read_json(path, "vocab file")
        if not isinstance(data, list) or not any(data) or not all(isinstance(t, str) for t in data):
            raise SamoutError(f"vocab file {path} must be a JSON list of strings, at least one of them non-empty")
        return cls(data)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match; every character must be covered by some token."""
        index: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            if token:
                index.setdefault(token, i)
        longest = max(len(t) for t in index)
        ids, pos = [], 0
        while pos < len(text):
            for size in range(min(longest, len(text) - pos), 0, -1):
                token_id = index.get(text[pos : pos + size])
                if token_id is not None:
                    ids.append(token_id)
                    pos += size
                    break
            else:
                raise SamoutError(f"the vocab has no token for {text[pos]!r} (position {pos} of the prompt)")
        return ids

    def decode(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else f"<{token_id}>"


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
