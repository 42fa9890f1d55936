"""The tokenizer files a Hugging Face client loads from an export.

Clients that count or encode tokens themselves (lm-evaluation-harness's ``local-completions``
with its ``huggingface`` tokenizer backend, guidellm) call
``transformers.AutoTokenizer.from_pretrained(EXPORT)``. So every export with a vocab also
carries ``tokenizer.json`` (read by the ``tokenizers`` library) and ``tokenizer_config.json``
(read by transformers), built so that they encode exactly as the export's own ``vocab.json``
does and decode back the same text:

- UTF-8 bytes: a BPE model with no merges whose vocab maps GPT-2's byte-level character of
  byte b to id b, behind a ByteLevel pre-tokenizer that neither splits the text (no regex)
  nor adds a space, and a ByteLevel decoder (invalid UTF-8 shows as U+FFFD, as ours).
- a Hugging Face tokenizer.json: itself. transformers adds the post-processor's special
  tokens unless told ``add_special_tokens=False``; a completion adds them only when asked.
- a list of strings (greedy longest match, left to right): a WordLevel model behind a Split
  pre-tokenizer whose regex is a trie of the tokens. Oniguruma tries a trie's branches before
  ending at a token, so the piece it cuts at each position is the longest token starting
  there, as ours; text no token covers is a piece the WordLevel vocab lacks, and with no unk
  token in it that is an error in the library as in ours. Ids encoding never gives (empty
  tokens, a token listed again) are kept under keys ending in a marker character no token
  holds: the normalizer turns that character in a text into another no token holds (still
  an error), and the decoder removes it, so every id decodes as ours does.

Neither bytes nor a string list has special tokens: the config declares none and sets
``split_special_tokens``, so a token a client adds later (lm-eval adds a pad token when the
tokenizer has none) is read as text, as the model reads it. ``model_max_length`` is
transformers' own "no limit": a cummax export takes any length (max_seq is per call), and
what a softmax export holds depends on the machine that serves it, which ``GET /v1/models``
states as ``max_model_len``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from samout_edge.artifact.vocab import _UNICODE_BYTES, ByteVocab, HFTokenizer, Vocab
from samout_edge.errors import SamoutError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
NO_LIMIT = int(1e30)  # transformers' VERY_LARGE_INTEGER: what a tokenizer without a model_max_length gets
MAX_DEPTH = 256  # trie levels written as nested groups; deeper ones as one flat alternation (Oniguruma's limit: 4096)
SAMPLE_CHARS = 1 << 20  # the joined tokens encoded by both sides at export, at most
# characters that are never text (Unicode noncharacters): two that no token holds mark the unreachable ids
MARKERS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [chr(p * 0x10000 + 0xFFFE + i) for p in range(17) for i in (0, 1)]

BYTE_TOKENS = {b: c for c, b in _UNICODE_BYTES.items()}  # byte -> its GPT-2 character: the id's token string


@dataclass
class TokenizerForm:
    """A vocab as transformers and the tokenizers library load it: the two files' contents
    (``tokenizer`` None when the vocab has no faithful form, ``reason`` says why) and each id's
    token string, as ``convert_ids_to_tokens`` names it."""

    kind: str
    tokenizer: dict[str, Any] | None
    config: dict[str, Any]
    reason: str | None = None
    keys: list[str] = field(default_factory=list)  # a string list's: id -> its key in tokenizer.json

    def files(self) -> dict[str, Any]:
        """File name -> JSON content: nothing when there is no tokenizer.json."""
        if self.tokenizer is None:
            return {}
        return {TOKENIZER_FILE: self.tokenizer, TOKENIZER_CONFIG_FILE: self.config}

    def note(self) -> str:
        """One line for export and inspect: what the files are, or why there are none."""
        if self.tokenizer is None:
            return f"no tokenizer files for transformers: {self.reason}"
        return files_note(self.kind, list(self.files()))


def files_note(kind: str, names: list[str]) -> str:
    special = (" (a completion's prompt is tok(text, add_special_tokens=False) unless it asks for them)"
               if kind == HFTokenizer.kind else "")
    return (f"tokenizer files: {', '.join(names)}: transformers.AutoTokenizer.from_pretrained(DIR) encodes as "
            f"vocab.json does{special}")


def tokenizer_form(vocab: Vocab | ByteVocab | HFTokenizer, check: bool = True) -> TokenizerForm:
    """The files for ``vocab``. A string list's form is checked with the tokenizers library
    (``check``): every token alone, every id's decoding and the tokens joined must come out as
    ours, or the export carries no tokenizer files and says why."""
    if isinstance(vocab, ByteVocab):
        return TokenizerForm(vocab.kind, byte_tokenizer(), tokenizer_config(split_special=True))
    if isinstance(vocab, HFTokenizer):
        return TokenizerForm(vocab.kind, vocab.to_json(), tokenizer_config(split_special=False))
    config = tokenizer_config(split_special=True)
    try:
        source, keys = strings_tokenizer(vocab.tokens)
        if check:
            check_strings(vocab, source)
    except SamoutError as e:
        return TokenizerForm(vocab.kind, None, config, str(e))
    return TokenizerForm(vocab.kind, source, config, keys=keys)


def tokenizer_config(split_special: bool) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer over tokenizer.json, no length limit of its own,
    decoding without transformers' clean-up of spaces (which would change the text)."""
    config: dict[str, Any] = {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": NO_LIMIT,
                              "clean_up_tokenization_spaces": False}
    if split_special:
        config["split_special_tokens"] = True
    return config


def byte_tokenizer() -> dict[str, Any]:
    """tokenizer.json of UTF-8 bytes: id b is byte b."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {BYTE_TOKENS[b]: b for b in range(256)}, "merges": []},
    }


def strings_tokenizer(tokens: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(tokenizer.json, each id's key) of a string list, or a SamoutError saying why it has none."""
    for i, token in enumerate(tokens):
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise SamoutError(f"token {i} is not valid Unicode (a lone surrogate): a tokenizer.json cannot hold "
                              "it") from None
    held = set("".join(tokens))
    free = [c for c in MARKERS if c not in held]
    if len(free) < 2:
        raise SamoutError("the tokens hold every Unicode noncharacter, which the list's form needs two of")
    mark, stand_in = free[0], free[1]
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    keys = []
    for i, token in enumerate(tokens):
        again = seen.get(token, 0)
        seen[token] = again + 1
        if token and not again:
            first[token] = i
            keys.append(token)
        else:  # never what encoding gives (empty, or listed before): a key no text reaches
            keys.append(token + mark * (again + (0 if token else 1)))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": mark}, "content": stand_in},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": longest_first_pattern(first)},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": mark}, "content": ""},
                                                     {"type": "Fuse"}]},
        "model": {"type": "WordLevel", "vocab": {key: i for i, key in enumerate(keys)}, "unk_token": mark + stand_in},
    }, keys


def _escape(c: str) -> str:
    return c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}"


def _group(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def longest_first_pattern(tokens: list[str] | dict[str, int]) -> str:
    """An Oniguruma regex matching, at a position, the longest of ``tokens`` starting there: a
    trie whose every node tries its children before ending (a text's next character picks at
    most one child, so the first match found is the deepest). Below MAX_DEPTH levels a
    subtree is one alternation of its suffixes, longest first, so no token's length can pass
    the regex engine's nesting limit."""
    end = ""  # a node's key for "a token ends here" (no character is "")
    root: dict[str, Any] = {}
    for token in tokens:
        node = root
        for c in token:
            node = node.setdefault(c, {})
        node[end] = True
    patterns: dict[int, str] = {}
    stack: list[tuple[dict, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, ready = stack.pop()
        children = sorted(((c, child) for c, child in node.items() if c != end), key=lambda item: item[0])
        if depth >= MAX_DEPTH:
            patterns[id(node)] = _group(["".join(map(_escape, s)) for s in sorted(_suffixes(node), key=len,
                                                                                 reverse=True)])
        elif not ready:
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for _, child in children)
        else:
            parts = [_escape(c) + patterns.pop(id(child)) for c, child in children]
            patterns[id(node)] = _group(parts + [""] if end in node else parts)
    return patterns[id(root)]


def _suffixes(node: dict[str, Any]) -> list[str]:
    """Every token ending under ``node``, as the text after it."""
    out, stack = [], [(node, "")]
    while stack:
        here, prefix = stack.pop()
        for c, child in here.items():
            if c == "":
                out.append(prefix)
            else:
                stack.append((child, prefix + c))
    return out


def check_strings(vocab: Vocab, source: dict[str, Any]) -> None:
    """The tokenizers library on a string list's form, against ours: each token alone encodes
    to its first id, each id decodes to its token, and the tokens joined (a text where greedy
    matches interact) encode to the same ids, or fail alike. A SamoutError names the first
    difference."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(json.dumps(source))
    except Exception as e:  # the library raises its own types
        raise SamoutError(f"the tokenizers library cannot read the list's form: {str(e)[:200]}") from None
    for token, token_id in vocab.index.items():  # one at a time: a batch would start the library's thread pool
        ids = _library_ids(tok, token)
        if ids != [token_id]:
            raise SamoutError(f"the tokenizers library encodes token {token_id} ({token!r:.40}) as {ids!s:.60}")
    for token_id, token in enumerate(vocab.tokens):
        if tok.decode([token_id], skip_special_tokens=False) != token:
            raise SamoutError(f"the tokenizers library decodes id {token_id} otherwise than {token!r:.40}")
    sample = "".join(vocab.index)[:SAMPLE_CHARS]
    try:
        ours: list[int] | None = vocab.encode(sample)
    except SamoutError:
        ours = None
    if _library_ids(tok, sample) != ours:
        raise SamoutError("the tokenizers library encodes the joined tokens otherwise than the greedy match")


def _library_ids(tok, text: str) -> list[int] | None:
    """The library's ids for ``text``, None where it fails (a character no token covers)."""
    try:
        return tok.encode(text, add_special_tokens=False).ids
    except Exception:  # the library's error for a piece its vocab lacks
        return None


def token_strings(form: TokenizerForm, vocab: Vocab | ByteVocab | HFTokenizer, ids: list[int]) -> list[str]:
    """Each id's token string, as ``convert_ids_to_tokens`` of the export's tokenizer names it
    (vLLM's ``token_strs``): a byte's GPT-2 character, a tokenizer.json's token, a list's key."""
    if isinstance(vocab, ByteVocab):
        return [BYTE_TOKENS[i] for i in ids]
    if isinstance(vocab, HFTokenizer):
        return [vocab.tokenizer.id_to_token(i) or "" for i in ids]
    return [form.keys[i] if form.keys else vocab.tokens[i] for i in ids]


def tokenizer_note(manifest) -> str | None:
    """inspect's line on an export's tokenizer files: which, or why none; None without a vocab."""
    from samout_edge.artifact.vocab import VOCAB_FILE

    if VOCAB_FILE not in manifest.files:
        return None
    record = manifest.extra.get("tokenizer")
    if not isinstance(record, dict):
        return ("no tokenizer files for transformers (exported before samout-edge wrote them): export again to get "
                "them; serve's /tokenize takes its vocab.json as it is")
    if record.get("files"):
        return files_note(str(record.get("vocab")), list(record["files"]))
    return f"no tokenizer files for transformers: {record.get('reason', 'no reason recorded')}"
