"""benchmarks/clients.py's own parts, without the clients: the recording proxy, the request-shape
inventory, finding every refused field, the tasks it writes, the compact JSON."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_serve import client_for  # noqa: F401 - a fixture: a server on a TestClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clients():
    spec = importlib.util.spec_from_file_location("clients_bench", ROOT / "benchmarks" / "clients.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refusal_names_each_field_and_takes_it_out(clients):
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "ignore_eos": True, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    found, body = clients.refusal("invalid_request: unsupported parameter: stream_options.continuous_usage_stats "
                                  "(not a field of this OpenAI request that this server knows)", body)
    assert found == "stream_options.continuous_usage_stats: true" and body["stream_options"] == {"include_usage": True}
    found, body = clients.refusal("invalid_request: messages.0.content: Input should be a valid string", body)
    assert found == "messages[].content as a list of parts (text)" and body["messages"][0]["content"] == "hi"
    found, body = clients.refusal("invalid_request: unsupported parameter: ignore_eos (...)", body)
    assert found == "ignore_eos: true" and "ignore_eos" not in body
    found, body = clients.refusal("unsupported_parameter: echo with logprobs is not supported by this server",
                                  {"echo": True, "logprobs": 1, "prompt": [[1, 2]]})
    assert found == "echo with logprobs" and body == {"logprobs": 1, "prompt": [[1, 2]]}
    # a list past a limit: cut to what the message allows, else halved, so the next refusal shows
    assert clients.refusal("invalid_request: stop: at most 4 strings, got 5", {"stop": list("abcde")}) == \
        ("stop: a list of 5", {"stop": list("abcd")})
    assert clients.refusal("invalid_request: prompt.str: Input should be a valid string", {"prompt": list("ab" * 10)}) \
        == ("prompt: a list of 20", {"prompt": list("ab" * 5)})
    assert clients.refusal("http_error: Not Found", {"prompt": "x"}) is None
    assert clients.refusal("invalid_request: prompt: Input should be a valid string", {"prompt": 3}) is None


def test_inventory_groups_requests_by_shape_and_counts_errors(clients):
    ok = {"choices": []}
    refused = {"error": {"message": "stop: at most 4 strings", "type": "invalid_request_error",
                         "code": "invalid_request"}}
    records = [
        {"phase": "lm-eval:mc", "method": "POST", "path": "/v1/completions", "status": 200, "response": ok,
         "body": {"prompt": [list(range(100))], "echo": True, "logprobs": 1, "max_tokens": 1}},
        {"phase": "lm-eval:rolling", "method": "POST", "path": "/v1/completions", "status": 200, "response": ok,
         "body": {"prompt": [[5, 6]], "echo": True, "logprobs": 1, "max_tokens": 1}},
        {"phase": "lm-eval:gen", "method": "POST", "path": "/v1/completions", "status": 400, "response": refused,
         "body": {"prompt": "x" * 500, "stop": list("abcde"), "max_tokens": 48}},
        {"phase": "guidellm:completions", "method": "POST", "path": "/v1/completions", "status": 200, "stream": True,
         "response": {"events": 3, "first": [], "last": [], "errors": [{"error": {"message": "runner failed"}}]},
         "body": {"prompt": "y", "stream": True}},
    ]
    unauthorized = {"error": {"message": "missing or wrong API key", "code": "invalid_api_key"}}
    for op in (f"probe ({clients.NO_KEY})", "probe (auth_token)"):  # only the one sent without a key may get 401
        records.append({"phase": f"lm-eval:{op}", "method": "GET", "path": "/tokenizer_info", "status": 401,
                        "body": None, "response": unauthorized})
    inv = clients.inventory(records)
    lm = inv["lm-eval"]
    assert (lm["requests"], lm["errors"]) == (5, 2)
    assert lm["by_operation"]["gen"] == {"requests": 1, "errors": 1, "statuses": {"400": 1}}
    scoring, gen, tokenizer_info = lm["shapes"]
    assert scoring["operations"] == ["mc", "rolling"] and scoring["count"] == 2 and scoring["statuses"] == {"200": 2}
    assert len(scoring["body"]["prompt"][0]) == clients.TRIM_IDS and scoring["trimmed"] == ["prompt[0]"]
    assert scoring["values"]["echo"] == ["true"] and scoring["values"]["prompt (items)"] == ["1"]
    assert len(gen["body"]["prompt"]) == clients.TRIM_TEXT and gen["_failed_body"]["prompt"] == "x" * 500
    assert gen["answers"][0]["error"] == "invalid_request: stop: at most 4 strings"
    assert [a.get("expected", False) for a in tokenizer_info["answers"]] == [True, False]
    assert inv["guidellm"]["errors"] == 1  # an error inside a 200 stream counts


def test_dumps_compact_is_the_same_json_with_plain_lists_on_one_line(clients):
    data = {"ids": [1, 2, 3], "stop": ["\n#", "a, b", "[x]"], "nested": [{"a": [None, True]}, []], "s": "q\n,\n]"}
    text = clients.dumps_compact(data)
    assert json.loads(text) == data
    assert '"ids": [1, 2, 3]' in text and '"a": [null, true]' in text


def test_tasks_are_lm_eval_configs_over_jsonl_of_the_text(clients, tmp_path):
    lines = []
    for i in range(400):
        lines += [f"def function_number_{i}(argument, other):", f"    return argument * {i} + other - {i}", ""]
    sizes = clients.make_tasks("\n".join(lines), tmp_path, 3, 8, 4)
    assert sizes == {"rolling": 3, "mc": 8, "gen": 4}
    rolling = [json.loads(line) for line in (tmp_path / "rolling.jsonl").read_text().splitlines()]
    assert all(300 <= len(d["text"].encode()) <= clients.DOC_BYTES and d["text"] == d["text"].strip()
               for d in rolling)
    for doc in map(json.loads, (tmp_path / "mc.jsonl").read_text().splitlines()):
        assert len(doc["choices"]) == 4 and (doc["context"] + doc["choices"][doc["label"]]) in "\n".join(lines)
    config = json.loads((tmp_path / "samout_gen.yaml").read_text())  # JSON is YAML
    assert config["generation_kwargs"]["until"] == clients.HUMANEVAL_UNTIL
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "gen.jsonl")


class Upstream(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for i in range(5):
                self.wfile.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        status = 400 if body.get("bad") else 200
        data = json.dumps({"error": {"message": "bad: refused", "code": "invalid_request"}} if status == 400
                          else {"echo": body, "auth": self.headers.get("authorization")}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_proxy_relays_answers_and_records_each_request(clients, tmp_path):
    pytest.importorskip("uvicorn")
    import httpx

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    log = tmp_path / "requests.jsonl"
    proxy = clients.Proxy(f"http://127.0.0.1:{upstream.server_address[1]}", log)
    try:
        clients.set_phase(proxy.url, "test:plain")
        auth = {"Authorization": "Bearer secret-key-of-the-test"}
        with httpx.Client(trust_env=False, timeout=30) as http:
            r = http.post(f"{proxy.url}/v1/completions", json={"prompt": "hi"}, headers=auth)
            assert r.json() == {"echo": {"prompt": "hi"}, "auth": auth["Authorization"]}  # the key goes through
            assert http.post(f"{proxy.url}/v1/completions", json={"bad": 1}).status_code == 400
            clients.set_phase(proxy.url, "test:stream")
            with http.stream("POST", f"{proxy.url}/v1/completions", json={"stream": True}) as s:
                assert s.read().count(b"data: ") == 6
    finally:
        proxy.close()
        upstream.shutdown()
    records = clients.read_records(log)
    assert [(r["phase"], r["status"]) for r in records] == [("test:plain", 200), ("test:plain", 400),
                                                           ("test:stream", 200)]
    assert records[0]["body"] == {"prompt": "hi"} and "authorization" not in records[0]["headers"]  # never the key
    assert records[1]["response"]["error"]["message"] == "bad: refused"
    assert records[2]["stream"] and records[2]["response"]["events"] == 6
    assert records[2]["response"]["last"] == [{"i": 4}, "[DONE]"]


def replayable(value, vocab_size: int):
    """A recorded body for the tiny model: ids within its vocab, text within its characters, few tokens out."""
    if isinstance(value, dict):
        out = {k: replayable(v, vocab_size) for k, v in value.items()}
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(out.get(k), int) and out[k] > 4:
                out[k] = 4
        return out
    if isinstance(value, list):
        return [replayable(v, vocab_size) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value % vocab_size
    if isinstance(value, str):
        return "".join(c if ord(c) < vocab_size else "?" for c in value)
    return value


def test_every_recorded_client_request_is_answered(clients, exported, client_for, tmp_path):  # noqa: F811
    """benchmarks/results/client-requests.json: each body a client sent (lm-eval, guidellm, LangChain,
    litellm, as benchmarks/clients.py recorded them, prompts trimmed), replayed: answered, never refused."""
    pytest.importorskip("fastapi")
    recorded = json.loads((ROOT / "benchmarks" / "results" / "client-requests.json").read_text())
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    c = client_for(exported(logits="all").directory, vocab=vocab)
    replayed = 0
    for client, shapes in recorded["clients"].items():
        for shape in shapes:
            body = replayable(shape["body"], 128)
            r = c.http.request(shape["method"], shape["route"], json=body if body is not None else None)
            assert r.status_code == 200, f"{client} {shape['method']} {shape['route']} {body}: {r.text}"
            assert '"error"' not in r.text, f"{client} {shape['route']}: {r.text[:500]}"
            replayed += 1
    assert replayed >= 15 and set(recorded["clients"]) == {"lm-eval", "guidellm", "langchain", "litellm"}
