"""Text a model reads, and a token's name: the one Unicode check every vocabulary kind
applies before encoding, and OpenAI's names for tokens that are not whole characters.
Below vocab.py and hf_tokenizer.py, which both use them."""

from __future__ import annotations

from samout_edge.errors import SamoutError


def check_text(text: str) -> None:
    """Refuse text that is not Unicode a model can read: a lone surrogate (JSON's "\\ud800", or
    a command-line byte that is not UTF-8, which Python keeps as one) has no UTF-8 bytes, so
    any ids for it would be a guess."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        what = f"U+{ord(text[e.start]):04X}"
        raise SamoutError(f"the text has a lone surrogate {what} at position {e.start} (not valid Unicode: "
                          "send UTF-8 text)") from None


def byte_name(data: bytes) -> str:
    """OpenAI's name for a token that is not whole characters: ``bytes:\\xe2\\x80``."""
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def name_of(data: bytes) -> tuple[str, list[int]]:
    """(name, bytes) of a token's bytes for logprobs: its text when it is whole UTF-8
    characters, else its ``bytes:`` name, so that no two byte tokens share a name."""
    try:
        return data.decode("utf-8"), list(data)
    except UnicodeDecodeError:
        return byte_name(data), list(data)
