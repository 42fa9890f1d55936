"""Issue 27, tokenizers for clients: every export with a vocab carries tokenizer.json and
tokenizer_config.json that ``transformers.AutoTokenizer`` and ``tokenizers.Tokenizer`` load
offline and that encode exactly as samout-edge's vocab does; the server answers vLLM's
/tokenize, /detokenize and /tokenizer_info. transformers is imported inside the tests only
(it takes a second to import)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.tokenizer_files import (
    MAX_DEPTH,
    NO_LIMIT,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    tokenizer_form,
    tokenizer_note,
)
from samout_edge.artifact.vocab import VOCAB_FILE, ByteVocab, Vocab
from samout_edge.errors import SamoutError
from samout_edge.serve import open_server
from samout_edge.serve.app import create_app
from samout_edge.serve.options import ServeOptions
from samout_edge.serve.template import ChatTemplate

# what the issue lists: emoji, CJK, newlines, tabs, leading spaces, NUL, combining characters
TEXTS = ["", "héllo wörld", "😀👍🏽 family: 👨‍👩‍👧", "中文字符，日本語のテキスト", "a\nb\r\nc\n\n", "\tx\t\ty",
         "   three leading spaces", " one", "nul\x00inside\x00", "e\u0301 a\u0308 \u0915\u093f", "\ufeffBOM",
         "x" * 5000, "def main():\n    return 0\n"]
TOKEN_TEXTS = [t for t in TEXTS if all(c == "\n" or " " <= c <= "~" for c in t)]  # what STRINGS covers


def random_text(rng: random.Random, alphabet: str, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def random_unicode(rng: random.Random, n: int) -> str:
    """Code points from every UTF-8 length (1 to 4 bytes), no surrogates."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def auto_tokenizer(directory: Path, monkeypatch):
    """transformers.AutoTokenizer on an export directory, offline (no hub, no network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def library_ids(tokenizer, text: str) -> list[int] | None:
    """The tokenizers library's ids, None where it fails (a character no token covers)."""
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    except Exception:  # the library raises its own type
        return None


def our_ids(vocab, text: str) -> list[int] | None:
    try:
        return vocab.encode(text)
    except SamoutError:
        return None


def _export(directory: Path, vocab, vocab_size: int | None = None, **kwargs):
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    if vocab_size is None:
        return export(directory, ExportOptions(max_seq=32), preset_name="tiny", vocab=vocab, **kwargs)
    save_checkpoint(random_checkpoint(ModelConfig(vocab_size, 32, 4, 2), seed=3), directory.with_name("ckpt"))
    return export(directory, ExportOptions(max_seq=32), checkpoint=directory.with_name("ckpt"), vocab=vocab, **kwargs)


def hf_tokenizer_file(path: Path) -> Path:
    """A byte-level BPE tokenizer.json with special tokens <s> (0) and </s> (1), its post-processor
    putting <s> before a text, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["café naïve 中文 😀", "def main():\n    return 0\n", "the cat sat on the mat " * 4] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("bytes") / "e", "bytes", vocab_size=256)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return _export(root / "e", hf_tokenizer_file(root / "tokenizer.json"), vocab_size=320)


# printable ASCII and newline, a token listed twice ("ab" at 2 and 4), empty tokens (the tiny model's 128 ids)
_LISTED = ["", "ab", "ab", "abc", "ab", "bca", *(chr(i) for i in range(32, 127)), "\n", "the", "then", "he"]
STRINGS = _LISTED + [""] * (128 - len(_LISTED))


@pytest.fixture(scope="module")
def strings_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("strings")
    (root / "vocab.json").write_text(json.dumps(STRINGS))
    return _export(root / "e", root / "vocab.json")


def test_a_byte_export_loads_offline_and_its_ids_are_the_utf8_bytes(byte_export, monkeypatch):
    from tokenizers import Tokenizer

    d = byte_export.directory
    assert byte_export.verification.passed
    files = read_manifest(d).files
    for name in (VOCAB_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        assert len(files[name]["sha256"]) == 64
    auto, library = auto_tokenizer(d, monkeypatch), Tokenizer.from_file(str(d / TOKENIZER_FILE))
    rng = random.Random(0)
    for text in TEXTS + [random_unicode(rng, rng.randint(1, 200)) for _ in range(200)]:
        want = list(text.encode("utf-8"))
        assert ByteVocab().encode(text) == want
        assert library.encode(text, add_special_tokens=False).ids == want, text
        assert auto(text, add_special_tokens=False)["input_ids"] == want, text
        assert auto(text)["input_ids"] == want  # no special tokens to add
        assert library.decode(want) == auto.decode(want) == text
    for _ in range(500):  # any bytes, valid UTF-8 or not: U+FFFD where ours puts it
        data = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        assert auto.decode(data) == library.decode(data) == ByteVocab().decode_ids(data), data
    assert auto.convert_ids_to_tokens([104, 32, 0, 255]) == ["h", "Ġ", "Ā", "ÿ"]
    # no length limit of its own (a cummax export takes any), no special tokens
    assert auto.model_max_length == NO_LIMIT and auto.eos_token is None and auto.bos_token is None
    assert len(auto) == 256
    # a token a client adds (lm-eval adds a pad token to a tokenizer without one) is read as text, as the model reads it
    auto.add_special_tokens({"pad_token": "<|pad|>"})
    assert auto("a<|pad|>b", add_special_tokens=False)["input_ids"] == list(b"a<|pad|>b")


def test_a_hugging_face_export_carries_its_tokenizer_json_and_encodes_without_special_tokens_as_ours(
        hf_export, monkeypatch):
    from tokenizers import Tokenizer

    d = hf_export.directory
    assert json.loads((d / TOKENIZER_FILE).read_text()) == json.loads((d / VOCAB_FILE).read_text())
    config = json.loads((d / TOKENIZER_CONFIG_FILE).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "split_special_tokens" not in config
    ours = Vocab.load(d / VOCAB_FILE)
    auto, library = auto_tokenizer(d, monkeypatch), Tokenizer.from_file(str(d / TOKENIZER_FILE))
    rng = random.Random(1)
    for text in TEXTS + ["a</s>b <s>"] + [random_unicode(rng, rng.randint(1, 80)) for _ in range(100)]:
        want = ours.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == want, text
        assert library.encode(text, add_special_tokens=False).ids == want
        assert auto(text)["input_ids"] == [0] + want  # AutoTokenizer's default adds <s>; a completion's does not
        assert auto.decode(want) == ours.decode_ids(want) == text
    assert "tok(text, add_special_tokens=False)" in tokenizer_note(read_manifest(d))  # what inspect says
    assert hf_export.manifest.extra["tokenizer"] == {"vocab": "huggingface",
                                                     "files": [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]}


def test_a_string_list_export_loads_offline_and_matches_greedily_as_ours(strings_export, monkeypatch):
    from tokenizers import Tokenizer

    d = strings_export.directory
    ours = Vocab.load(d / VOCAB_FILE)
    auto, library = auto_tokenizer(d, monkeypatch), Tokenizer.from_file(str(d / TOKENIZER_FILE))
    rng = random.Random(2)
    alphabet = "abcthen \n"
    texts = TOKEN_TEXTS + ["abcab" * 40, "thenthe" * 30] + [random_text(rng, alphabet, 300) for _ in range(200)]
    for text in texts:
        want = ours.encode(text)
        assert library.encode(text, add_special_tokens=False).ids == want, text
        assert auto(text, add_special_tokens=False)["input_ids"] == want == auto(text)["input_ids"]
        assert auto.decode(want) == text
    assert ours.encode("ab") == [1]  # the first of a token listed twice
    every = list(range(len(ours.tokens)))  # ids encoding never gives (a repeat, an empty token) decode as ours too
    assert auto.decode(every) == library.decode(every) == ours.decode_ids(every)
    assert all(library.decode([i]) == ours.decode(i) for i in every)
    assert len(auto) == len(ours.tokens) == 128
    for uncovered in ("é", "abc\tx"):  # a character no token covers: an error on both sides, never a guess
        with pytest.raises(SamoutError):
            ours.encode(uncovered)
        with pytest.raises(Exception, match="Missing"):
            auto(uncovered)


@pytest.mark.parametrize("seed", range(6))
def test_the_string_list_form_is_the_greedy_match_on_random_vocabs(seed):
    """Random vocabs with regex metacharacters, repeats and empty tokens; random texts, many of
    them longer than 100 characters with no space (WordPiece's max_input_chars_per_word) and
    some with characters no token covers: the library's ids, or its failure, are ours."""
    from tokenizers import Tokenizer

    rng = random.Random(seed)
    alphabet = "ab中😀.*+?()[]{}|\\^$ \n\t\x00\u0301"
    uncovered = rng.sample(alphabet, 2)  # in no token
    covered = "".join(c for c in alphabet if c not in uncovered)
    tokens = [""] + list(covered) + [random_text(rng, covered, 7) for _ in range(rng.randint(5, 400))]
    tokens += [rng.choice(tokens) for _ in range(10)] + [""] * 3  # repeats
    rng.shuffle(tokens)
    vocab = Vocab(tokens)
    form = tokenizer_form(vocab)
    assert form.tokenizer is not None, form.reason
    library = Tokenizer.from_str(json.dumps(form.tokenizer))
    failures = 0
    for i in range(150):  # no spaces: one "word" of up to 400 characters
        text = random_text(rng, (covered if i % 2 else alphabet).replace(" ", ""), 400)
        want = our_ids(vocab, text)
        failures += want is None
        assert library_ids(library, text) == want, text
        if want is not None:
            assert library.decode(want) == text
    assert 0 < failures < 150  # both kinds of text were seen
    every = list(range(len(tokens)))
    assert library.decode(every) == vocab.decode_ids(every)


def test_tokens_longer_than_the_nesting_depth_still_match_longest_first():
    from tokenizers import Tokenizer

    tokens = ["a" * k for k in range(1, MAX_DEPTH + 60)] + ["b", "ab" * 150]
    vocab = Vocab(tokens)
    library = Tokenizer.from_str(json.dumps(tokenizer_form(vocab).tokenizer))
    for text in ("a" * 1000 + "b", "ab" * 400, "a" * (MAX_DEPTH + 3) + "ba"):
        assert library_ids(library, text) == vocab.encode(text)


def test_a_vocab_without_a_faithful_form_exports_without_tokenizer_files_and_says_why(tmp_path, run_cli):
    """The stated refusal: a token that is not valid Unicode (a lone surrogate, which JSON can
    hold) cannot be in a tokenizer.json. The export succeeds, carries vocab.json only, and
    export.json, inspect and the server say why in one line."""
    (tmp_path / "vocab.json").write_text(json.dumps([chr(i) for i in range(32, 127)] + ["\ud800"]))
    result = _export(tmp_path / "e", tmp_path / "vocab.json")
    d = result.directory
    assert result.verification.passed
    assert not (d / TOKENIZER_FILE).exists() and not (d / TOKENIZER_CONFIG_FILE).exists()
    record = read_manifest(d).extra["tokenizer"]
    assert record["files"] == [] and "lone surrogate" in record["reason"]
    code, out, _ = run_cli("inspect", d)
    line = next(x for x in out.splitlines() if "tokenizer files" in x)
    assert code == 0 and "no tokenizer files for transformers: token 95 is not valid Unicode" in line
    server = open_server(d, "ort", ServeOptions(store=None))
    try:
        with TestClient(create_app(server)) as http:
            info = http.get("/tokenizer_info").json()
            assert info["tokenizer_class"] is None and "lone surrogate" in info["tokenizer_files"]
            assert http.post("/tokenize", json={"prompt": "hi"}).json()["tokens"] == [104 - 32, 105 - 32]
    finally:
        server.close()


def test_inspect_and_verify_see_the_tokenizer_files(byte_export, run_cli, tmp_path):
    d = byte_export.directory
    code, out, _ = run_cli("inspect", d)
    assert code == 0 and "tokenizer files: tokenizer.json, tokenizer_config.json" in out
    code, _, _ = run_cli("verify", d)
    assert code == 0
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    (copy / TOKENIZER_CONFIG_FILE).write_text("{}")  # hashed like every file: an edit fails verify
    code, out, err = run_cli("verify", copy)
    assert code == 1 and TOKENIZER_CONFIG_FILE in out + err


def older_export(source: Path, target: Path) -> Path:
    """``source`` as an export made before the tokenizer files: neither the files nor their record."""
    shutil.copytree(source, target)
    data = json.loads((target / "export.json").read_text())
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        (target / name).unlink()
        del data["files"][name]
    del data["extra"]["tokenizer"]
    (target / "export.json").write_text(json.dumps(data))
    return target


def test_an_export_from_before_the_tokenizer_files_still_verifies_inspects_and_serves(byte_export, run_cli,
                                                                                       tmp_path):
    d = older_export(byte_export.directory, tmp_path / "old")
    assert run_cli("verify", d)[0] == 0
    code, out, _ = run_cli("inspect", d)
    assert code == 0 and "exported before samout-edge wrote them" in out
    server = open_server(d, "ort", ServeOptions(store=None))
    try:
        with TestClient(create_app(server)) as http:
            assert http.post("/tokenize", json={"prompt": "é"}).json()["tokens"] == [0xC3, 0xA9]
            assert http.post("/detokenize", json={"tokens": [0xC3, 0xA9]}).json() == {"prompt": "é"}
            assert http.get("/tokenizer_info").json()["tokenizer_class"] == "PreTrainedTokenizerFast"
            r = http.post("/v1/completions", json={"prompt": "é", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
    finally:
        server.close()


@pytest.fixture
def serve(tmp_path):
    opened = []

    def make(directory: Path, **options) -> TestClient:
        server = open_server(directory, "ort", ServeOptions(store=None, **options))
        http = TestClient(create_app(server))
        http.__enter__()
        opened.append((server, http))
        return http

    yield make
    for server, http in opened:
        http.__exit__(None, None, None)
        server.close()


def test_tokenize_and_detokenize_in_vllms_form(byte_export, serve, monkeypatch):
    d = byte_export.directory
    http = serve(d, max_prompt_tokens=1000, max_prompt_chars=600)
    auto = auto_tokenizer(d, monkeypatch)
    text = " 中文 😀\tx\x00"
    body = http.post("/tokenize", json={"model": d.name, "prompt": text, "add_special_tokens": False,
                                        "return_token_strs": True}).json()
    ids = list(text.encode())
    assert body == {"count": len(ids), "max_model_len": 1000, "tokens": ids,
                    "token_strs": auto.convert_ids_to_tokens(ids)}
    assert http.post("/tokenize", json={"prompt": text}).json()["token_strs"] is None
    assert http.post("/detokenize", json={"model": d.name, "tokens": ids}).json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": [0xE4, 0xB8]}).json() == {"prompt": "\ufffd"}  # half a character
    models = http.get("/v1/models").json()["data"][0]
    assert models["max_model_len"] == 1000 and models["vocab_size"] == 256
    # the chat form: the server's template, the prompt a chat completion of these messages feeds the model
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "héllo"},
                {"role": "assistant", "content": "hi "}]
    rendered = ChatTemplate().render([{**m, "role": m["role"].replace("developer", "system")} for m in messages])
    assert rendered.startswith("system: be brief\nuser: héllo\nassistant: hi \nassistant:")
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert tokens == list(rendered.encode()) and chat["usage"]["prompt_tokens"] == len(tokens)
    body = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                        "continue_final_message": True}).json()
    assert body["tokens"] == list("system: be brief\nuser: héllo\nassistant: hi ".encode())  # to be continued


def test_tokenize_adds_special_tokens_as_autotokenizer_does_and_detokenize_refuses_ids_without_a_token(
        hf_export, serve, monkeypatch):
    d = hf_export.directory
    http, auto = serve(d), auto_tokenizer(d, monkeypatch)
    text = "the cat 中文"
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert plain == auto(text, add_special_tokens=False)["input_ids"]
    assert http.post("/tokenize", json={"prompt": text}).json()["tokens"] == auto(text)["input_ids"] == [0] + plain
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["tokens"]
    assert chat[0] != 0  # the chat form adds none unless asked, as vLLM's
    assert http.post("/detokenize", json={"tokens": plain}).json()["prompt"] == text
    size = Vocab.load(d / VOCAB_FILE).size
    r = http.post("/detokenize", json={"tokens": [5, size]})  # inside the model's 320 ids, past the tokenizer's
    assert r.status_code == 400 and r.json()["error"]["code"] == "token_out_of_range"
    assert f"token id {size} has no token in this server's vocab (0..{size - 1})" in r.json()["error"]["message"]


def test_bad_tokenizer_requests_get_a_one_line_400_naming_the_field(byte_export, serve):
    http = serve(byte_export.directory, max_prompt_tokens=60, max_prompt_chars=50)
    cases = {
        "/tokenize": [
            ({"prompt": "x" * 51}, "prompt_too_long", "--max-prompt-chars"),
            ({"prompt": "é" * 40}, "prompt_too_long", "is 80 tokens"),  # 40 characters fit, their 80 bytes do not
            ({"prompt": "é" * 51}, "prompt_too_long", "--max-prompt-chars"),
            ({"prompt": "\ud800"}, "invalid_text", "lone surrogate"),
            ({"prompt": 5}, "invalid_request", "prompt"),
            ({"prompt": "x", "bogus": 1}, "invalid_request", "unsupported parameter: bogus"),
            ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, "invalid_request",
             "add_generation_prompt"),
            ({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, "unsupported_parameter",
             "chat_template"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_request", "messages.0.role"),
            ({"messages": [{"role": "user", "content": "\ud800"}]}, "invalid_text", "messages.0.content"),
            ([1, 2], "invalid_request", "JSON object"),
        ],
        "/detokenize": [
            ({"tokens": [1] * 61}, "prompt_too_long", "--max-prompt-tokens"),
            ({"tokens": [256]}, "token_out_of_range", "tokens: token id 256 is outside the vocabulary (0..255)"),
            ({"tokens": [-1]}, "token_out_of_range", "token id -1"),
            ({"tokens": ["a"]}, "invalid_request", "tokens.0"),
            ({}, "invalid_request", "tokens"),
        ],
    }
    for path, bodies in cases.items():
        for body, code, words in bodies:
            r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == code and words in error["message"], (path, body, error)
            assert "\n" not in error["message"] and "Traceback" not in error["message"]
    r = http.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body is not valid JSON"
    too_many = {"messages": [{"role": "user", "content": "x"}] * 5000}
    r = http.post("/tokenize", json=too_many)
    assert r.status_code == 400 and "messages: more than" in r.json()["error"]["message"]


def test_a_server_without_a_vocab_answers_no_vocab(exported, serve):
    http = serve(exported().directory)
    for method, path, body in (("post", "/tokenize", {"prompt": "hi"}), ("post", "/detokenize", {"tokens": [1]}),
                               ("get", "/tokenizer_info", None)):
        r = http.request(method.upper(), path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_vocab", path
    assert http.get("/v1/models").json()["data"][0]["vocab_size"] == 128


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(strings_export, serve):
    """lm-eval's RemoteTokenizer: /tokenizer_info must have the key eos_token (null here: the
    model has none), then /tokenize {"prompt", "add_special_tokens": false} -> tokens and
    /detokenize {"tokens"} -> prompt; its chat_template renders locally to the server's text."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    d = strings_export.directory
    http = serve(d, chat_template_vars={"eos_token": "\n"})  # what an operator's tokenizer_config.json names
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast" and info["vocab_kind"] == "strings"
    assert info["eos_token"] == "\n" and info["bos_token"] is None and "pad_token" in info
    assert info["model_max_length"] == NO_LIMIT and info["split_special_tokens"] is True
    tokens = http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"]
    assert tokens == Vocab.load(d / VOCAB_FILE).encode("test")
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "test"}
    messages = [{"role": "user", "content": "then"}]
    local = ImmutableSandboxedEnvironment().from_string(info["chat_template"]).render(messages=messages,
                                                                                    add_generation_prompt=True)
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == \
        http.post("/tokenize", json={"prompt": local}).json()["tokens"]


def test_the_tokenizer_routes_need_the_api_key(byte_export, serve):
    key = "k" * 20
    http = serve(byte_export.directory, api_keys=[key])
    for method, path, body in (("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None)):
        assert http.request(method, path, json=body).status_code == 401
        assert http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
