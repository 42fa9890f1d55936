"""A Hugging Face tokenizer.json as one of the vocabulary kinds (vocab.py): the
``tokenizers`` library's encoding, adapted to what the rest of samout-edge asks of a
vocab (incremental decoding, byte runs read as UTF-8, encoding a stream piece by piece,
the bytes each token covers, logprobs' token names)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from samout_edge.artifact.text import check_text, name_of
from samout_edge.errors import SamoutError


class HFTokenizer:
    """A Hugging Face tokenizer.json, through the ``tokenizers`` library: encoding without
    special tokens (a prompt is text), decoding incremental, so a streamed character is
    never split.

    Byte-fallback tokenizers (``<0xNN>`` tokens, SentencePiece style) are decoded with their
    byte runs read as UTF-8 by Python, as ``--vocab bytes`` reads them: the library's
    ByteFallback decoder turns a whole run into U+FFFDs when any byte of it is invalid, so
    valid characters beside a stray byte would be lost."""

    kind = "huggingface"
    LOOKBACK = 64  # characters at a piece's end whose tokens a stream re-encodes with what follows
    RUN = "\U000FFFFD"  # stands for a byte run in the decoder's input: a private-use character no decoder alters

    def __init__(self, tokenizer, source: dict):
        self.tokenizer, self.source = tokenizer, source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # ids span 0..size-1: the highest id decides what a model must hold, not the count (ids may skip)
        self.size = max(vocab.values(), default=-1) + 1
        self.longest = max((len(t) for t in vocab), default=1)
        self.byte_ids: dict[int, int] = {}
        if isinstance(source.get("model"), dict) and source["model"].get("byte_fallback"):
            for token, token_id in vocab.items():
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    with contextlib.suppress(ValueError):
                        self.byte_ids[token_id] = int(token[3:5], 16)

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SamoutError("a tokenizer.json needs the tokenizers library: pip install tokenizers") from None
        text = Path(path).read_text()
        try:
            return cls(Tokenizer.from_str(text), json.loads(text))
        except Exception as e:  # the library raises its own types
            raise SamoutError(f"{path} is not a tokenizer.json the tokenizers library reads: {str(e)[:200]}") from None

    def to_json(self) -> dict:
        return self.source

    def fewest_tokens(self, text: str) -> int:
        return -(-len(text) // max(1, self.longest))

    def encode(self, text: str) -> list[int]:
        check_text(text)  # the library raises TypeError on a lone surrogate
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prefix(self, text: str, final: bool) -> tuple[list[int], int]:
        ids, _, used = self.encode_sized(text, final)
        return ids, used

    def encode_sized(self, text: str, final: bool) -> tuple[list[int], np.ndarray, int]:
        """(ids, UTF-8 bytes of the text each covers, characters used): unless ``final``, only
        the tokens before the last pre-token boundary at least LOOKBACK characters from the
        end (BPE never merges across pre-tokens, so what follows cannot change them; the rest
        is carried into the next piece). Tokens sharing a character (byte-level pieces of
        "中") count its bytes once, with the first of them."""
        check_text(text)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        limit = len(text)
        if not final:
            pre = self.tokenizer.pre_tokenizer
            starts = [span[0] for _, span in pre.pre_tokenize_str(text)] if pre is not None else [0]
            limit = max([b for b in starts if b <= len(text) - self.LOOKBACK], default=0)
        ids, sizes, cursor = [], [], 0
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if end > limit and not final:
                break
            ids.append(token_id)
            sizes.append(len(text[max(start, cursor):end].encode()))
            cursor = max(cursor, end)
        return ids, np.asarray(sizes, dtype=np.int64), (len(text) if final else cursor)

    def decode_ids(self, ids: list[int]) -> str:
        if not self.byte_ids or not any(i in self.byte_ids for i in ids) or self.tokenizer.decoder is None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        tokens, runs, run = [], [], bytearray()
        for token_id in [*ids, -1]:  # -1: ends the last run
            if token_id in self.byte_ids:
                run.append(self.byte_ids[token_id])
                continue
            if run:
                tokens.append(self.RUN)
                runs.append(run.decode("utf-8", errors="replace"))  # what --vocab bytes shows for these bytes
                run = bytearray()
            if token_id >= 0:
                tokens.append(self.tokenizer.id_to_token(token_id) or "")
        parts = self.tokenizer.decoder.decode(tokens).split(self.RUN)
        if len(parts) != len(runs) + 1:  # a token held the stand-in itself: the library's reading
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return parts[0] + "".join(r + p for r, p in zip(runs, parts[1:]))

    def decode(self, token_id: int) -> str:
        return self.decode_ids([token_id])

    def token_name(self, token_id: int) -> tuple[str, list[int]]:
        """(name, bytes) of one token for logprobs: a byte token or a byte-level piece that is
        not whole characters gets its ``bytes:`` name."""
        if token_id in self.byte_ids:
            return name_of(bytes([self.byte_ids[token_id]]))
        token = self.tokenizer.id_to_token(token_id)
        if token is not None and _is_byte_level(self.source) and all(c in _UNICODE_BYTES for c in token):
            return name_of(bytes(_UNICODE_BYTES[c] for c in token))
        name = self.decode(token_id)
        return name, list(name.encode("utf-8", errors="replace"))

    def stream(self) -> Callable[[int], str]:
        """A token at a time -> the text it completes: the whole sequence decoded again,
        less what was already given, held while it ends in an unfinished character."""
        ids: list[int] = []
        given = [0]

        def piece(token_id: int) -> str:
            ids.append(token_id)
            text = self.decode_ids(ids)
            if text.endswith("\ufffd"):
                return ""
            new, given[0] = text[given[0]:], len(text)
            return new

        return piece


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_UNICODE_BYTES = _gpt2_byte_table()


def _is_byte_level(source: dict) -> bool:
    """Whether a tokenizer.json's decoder reads tokens as GPT-2 byte-level characters."""
    decoder = source.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) if isinstance(d, dict)]
    return "ByteLevel" in kinds
