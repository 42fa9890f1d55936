"""samout-edge serve: completions equal generate, sessions persist and survive kill -9,
bad requests change nothing, batching, the session policy, and the metrics."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from samout_edge.errors import SamoutError
from samout_edge.generate import Sampler, generate
from samout_edge.runtime.registry import load_runner
from samout_edge.serve import open_server
from samout_edge.serve.app import create_app
from samout_edge.serve.batcher import Batcher, Job
from samout_edge.serve.options import ServeOptions
from samout_edge.serve.process import ServerProcess
from samout_edge.serve.sessions import SessionPolicy, encode_state

PROMPT = [5, 9, 17, 3]


def greedy(directory: Path, prompt: list[int], n: int) -> list[int]:
    with load_runner(directory, "ort") as runner:
        return generate(runner, prompt, n).new_ids


class Client:
    """A server on a TestClient, closed with the test."""

    def __init__(self, directory: Path, store: Path | None, vocab: Path | None = None, **options):
        policy = options.pop("policy", SessionPolicy())
        self.server = open_server(directory, "ort", ServeOptions(store=store, policy=policy, **options), vocab=vocab)
        self.http = TestClient(create_app(self.server))
        self.http.__enter__()

    def complete(self, prompt, max_tokens=8, **extra) -> httpx.Response:
        return self.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                       **extra})

    def tokens(self, prompt, max_tokens=8, **extra) -> list[int]:
        r = self.complete(prompt, max_tokens, **extra)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    def close(self) -> None:
        self.http.__exit__(None, None, None)
        self.server.close()


@pytest.fixture
def client_for(tmp_path):
    opened = []

    def make(directory, store: Path | None | str = "default", **options) -> Client:
        c = Client(directory, tmp_path / "sessions.sqlite" if store == "default" else store, **options)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.mark.parametrize("arch", ["cummax", "softmax", "hybrid", "hybrid-w8"])
def test_a_completion_is_generates_greedy_tokens(exported, client_for, arch):
    d = exported(arch=arch).directory
    assert client_for(d).tokens(PROMPT, 12) == greedy(d, PROMPT, 12)


@pytest.mark.parametrize("arch", ["cummax", "softmax", "hybrid", "hybrid-w8"])
def test_a_session_continues_as_one_long_generation(exported, client_for, arch):
    d = exported(arch=arch).directory
    c = client_for(d)
    sid = c.http.post("/v1/sessions").json()["id"]
    first = c.tokens([5, 9], 4, session=sid)
    second = c.tokens([17, 3], 6, session=sid)
    # the session consumed 5 9, then first[:-1]; first[-1] is pending and goes before 17 3
    assert second == greedy(d, [5, 9, *first, 17, 3], 6)
    info = c.http.get(f"/v1/sessions/{sid}").json()
    assert info["position"] == 2 + 3 + 3 + 5 and info["pending_tokens"] == 1


def test_sessions_resume_exactly_after_a_restart(exported, client_for, tmp_path):
    d = exported().directory
    c = client_for(d)
    sid = c.http.post("/v1/sessions").json()["id"]
    first = c.tokens([5, 9, 17], 5, session=sid)
    before = c.http.get(f"/v1/sessions/{sid}").json()
    c.close()
    again = client_for(d)
    assert again.http.get(f"/v1/sessions/{sid}").json() == before
    assert again.tokens([3], 6, session=sid) == greedy(d, [5, 9, 17, *first, 3], 6)


def test_bad_requests_get_a_json_4xx_and_change_no_session(exported, client_for):
    d = exported(max_seq=300).directory
    c = client_for(d, max_prompt_tokens=300)
    sid = c.http.post("/v1/sessions").json()["id"]
    c.tokens([5, 9], 3, session=sid)
    before = c.http.get(f"/v1/sessions/{sid}").json()
    bodies = {
        "unknown session": {"prompt": [1], "session": "nope"},
        "id outside the vocab": {"prompt": [1, 128], "session": sid},
        "negative id": {"prompt": [-1], "session": sid},
        "prompt over --max-prompt-tokens": {"prompt": [1] * 301, "session": sid},
        "negative max_tokens": {"prompt": [1], "max_tokens": -1, "session": sid},
        "max_tokens above the limit": {"prompt": [1], "max_tokens": 10**9, "session": sid},
        "text without a vocab": {"prompt": "hello", "session": sid},
        "float ids": {"prompt": [1.5], "session": sid},
        "string max_tokens": {"prompt": [1], "max_tokens": "4", "session": sid},
        "negative temperature": {"prompt": [1], "temperature": -1, "session": sid},
        "n above 1": {"prompt": [1], "n": 2, "session": sid},
    }
    for why, body in bodies.items():
        r = c.http.post("/v1/completions", json=body)
        assert 400 <= r.status_code < 500, why
        assert r.json()["error"]["message"], why
    for raw in (b"{not json", b"", b"[1, 2]", b'{"prompt": [1], "session": 5}'):
        r = c.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json(), raw
    assert c.http.get(f"/v1/sessions/{sid}").json() == before
    assert c.http.get("/v1/sessions/nope").status_code == 404
    assert c.http.delete("/v1/sessions/nope").status_code == 404
    assert c.http.get("/no/such/route").json()["error"]["code"] == "http_error"
    assert c.http.get("/v1/models").json()["data"][0]["id"] == d.name


def test_streaming_sends_each_token_then_done(exported, client_for):
    d = exported().directory
    c = client_for(d)
    with c.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                        "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
    assert tokens == greedy(d, PROMPT, 5) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_text_prompts_with_a_vocab(exported, tmp_path):
    d = exported().directory
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    server = open_server(d, "ort", ServeOptions(), vocab=vocab)
    try:
        with TestClient(create_app(server)) as http:
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0}).json()
            assert r["choices"][0]["token_ids"] == greedy(d, [ord("h"), ord("i")], 4)
            assert r["choices"][0]["text"] == "".join(chr(t) for t in r["choices"][0]["token_ids"])
            assert http.post("/v1/completions", json={"prompt": "é", "max_tokens": 1}).status_code == 400
    finally:
        server.close()


def test_sampling_follows_the_seed(exported, client_for):
    c = client_for(exported().directory)
    a = c.tokens(PROMPT, 10, temperature=1.0, top_k=20, seed=7)
    assert a == c.tokens(PROMPT, 10, temperature=1.0, top_k=20, seed=7)
    assert a != c.tokens(PROMPT, 10, temperature=1.0, top_k=20, seed=8)


def test_concurrent_requests_decode_in_one_batched_call(exported):
    """Jobs submitted together run as batch-4 calls and give each one's own greedy tokens."""
    d = exported().directory
    sizes = []
    batcher = Batcher(lambda: load_runner(d, "ort"), 8, on_step=lambda kind, n, s: sizes.append((kind, n)))
    runner = batcher.start()
    events: dict[int, list] = {i: [] for i in range(4)}
    initial = runner.host_state(runner.initial_state(1))
    prompts = [[5, 9], [17, 3], [1, 2], [9, 9]]
    jobs = [Job(p, initial, 6, Sampler(), emit=events[i].append) for i, p in enumerate(prompts)]
    for job in jobs:
        batcher.submit(job)
    deadline = time.time() + 30
    while not all(e and e[-1][0] == "done" for e in events.values()) and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop()
    for i, p in enumerate(prompts):
        assert [v for k, v in events[i] if k == "token"] == greedy(d, p, 6)
    assert max(n for kind, n in sizes if kind == "decode") == 4


def test_softmax_sessions_are_refused_past_the_kv_budget(exported, client_for):
    d = exported(arch="softmax").directory
    # tiny: 2 layers x K,V x 4 heads x 8 dims x 4 bytes = 512 bytes per token; 16 KiB holds 32 tokens
    c = client_for(d, policy=SessionPolicy(kv_budget_bytes=16 * 1024))
    sid = c.http.post("/v1/sessions").json()["id"]
    c.tokens([5, 9], 10, session=sid)
    r = c.complete([1] * 10, 20, session=sid)
    assert r.status_code == 429 and r.json()["error"]["code"] == "kv_budget_exhausted"
    assert c.http.get(f"/v1/sessions/{sid}").json()["position"] == 11
    state = c.http.get("/health").json()["session_state_bytes"]
    assert state == 11 * 512


def test_cummax_sessions_cost_the_same_whatever_their_length(exported, client_for):
    c = client_for(exported().directory, policy=SessionPolicy(kv_budget_bytes=1))
    sid = c.http.post("/v1/sessions").json()["id"]
    sizes = {c.http.get(f"/v1/sessions/{sid}").json()["state_bytes"]}
    for _ in range(3):
        c.tokens([5, 9, 1], 20, session=sid)
        sizes.add(c.http.get(f"/v1/sessions/{sid}").json()["state_bytes"])
    assert sizes == {2 * 4 * 8 * 4}  # layers x heads x head_dim x fp32, at 0 and at 66 tokens


def test_expiry_and_the_session_limit(exported, client_for):
    c = client_for(exported().directory, policy=SessionPolicy(max_sessions=2, ttl_s=100))
    a, b = (c.http.post("/v1/sessions").json()["id"] for _ in range(2))
    c.tokens([1], 2, session=a)  # b is now the least recently used
    third = c.http.post("/v1/sessions").json()["id"]
    assert c.http.get(f"/v1/sessions/{b}").status_code == 404
    table = c.server.sessions
    assert table.sweep(now=time.time() + 50) == 0
    assert table.sweep(now=time.time() + 101) == 2 and not table.sessions
    assert c.http.get(f"/v1/sessions/{third}").status_code == 404
    # evicted from the store too: a restart does not bring them back
    assert sqlite3.connect(table.store.path).execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)


def test_a_store_of_another_model_is_refused_and_corrupt_rows_are_reported(exported, client_for, tmp_path):
    store = tmp_path / "s.sqlite"
    c = client_for(exported().directory, store)
    sid = c.http.post("/v1/sessions").json()["id"]
    c.tokens([1, 2], 3, session=sid)
    c.close()
    with pytest.raises(SamoutError, match="another model"):
        client_for(exported(arch="softmax").directory, store)
    with sqlite3.connect(store) as db:
        db.execute("UPDATE sessions SET state = ? WHERE id = ?", (b"[]\n", sid))
    again = client_for(exported().directory, store)
    health = again.http.get("/health").json()
    assert health["corrupt_sessions"] == 1 and health["sessions"] == 0
    again.close()
    # a row with a valid checksum but a state of the wrong shape is refused too, never fed to the graph
    names = [f"past_max.{i}" for i in range(2)]
    blob = encode_state({n: np.zeros((1, 4, 1, 7), np.float32) for n in names})
    with sqlite3.connect(store) as db:
        db.execute("UPDATE sessions SET state = ?, state_sha256 = ? WHERE id = ?",
                   (blob, hashlib.sha256(blob).hexdigest(), sid))
    health = client_for(exported().directory, store).http.get("/health").json()
    assert health["corrupt_sessions"] == 1 and health["sessions"] == 0


def test_metrics_are_prometheus_text(exported, client_for):
    c = client_for(exported().directory)
    c.tokens(PROMPT, 5)
    c.complete([1], -1)
    families = {f.name: f for f in text_string_to_metric_families(c.http.get("/metrics").text)}
    generated = families["samout_generated_tokens"].samples[0].value
    assert generated == 5
    statuses = {(s.labels["route"], s.labels["status"]) for s in families["samout_requests"].samples}
    assert ("/v1/completions", "200") in statuses and ("/v1/completions", "400") in statuses
    assert families["samout_request_seconds"].type == "histogram"
    assert {"samout_live_sessions", "samout_session_state_bytes", "samout_batch_size"} <= set(families)


# --------------------------------------------------------------------------- the real process


def test_sessions_survive_kill_9_mid_request(exported, tmp_path):
    d = exported().directory
    store = tmp_path / "s.sqlite"
    with ServerProcess(d, "--store", str(store)) as server:
        url = server.url
        sid = httpx.post(f"{url}/v1/sessions").json()["id"]
        first = httpx.post(f"{url}/v1/completions", json={"prompt": [5, 9], "max_tokens": 4, "temperature": 0,
                                                          "session": sid}).json()["choices"][0]["token_ids"]
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": [17], "max_tokens": 4000, "stream": True,
                                                                 "temperature": 0, "session": sid}, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 20:  # mid-request: tokens are flowing
                    os.kill(server.pid, signal.SIGKILL)
                    break
    with ServerProcess(d, "--store", str(store)) as server:
        url = server.url
        info = httpx.get(f"{url}/v1/sessions/{sid}").json()
        assert info["position"] == 2 + 3 and info["pending_tokens"] == 1  # as after the first request
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [17], "max_tokens": 5, "temperature": 0,
                                                      "session": sid}).json()
        assert r["choices"][0]["token_ids"] == greedy(d, [5, 9, *first, 17], 5)
        assert httpx.get(f"{url}/health").json()["corrupt_sessions"] == 0
        assert server.stop() == 0  # SIGTERM: a graceful stop


def test_cli_errors_are_one_line(run_cli, exported, tmp_path):
    code, _, err = run_cli("serve", tmp_path / "missing")
    assert code == 1 and "not found" in err and "Traceback" not in err
    code, _, err = run_cli("serve", exported().directory, "--store", tmp_path / "no" / "dir.sqlite")
    assert code == 1 and "does not exist" in err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all, not even close" * 100)
    code, _, err = run_cli("serve", exported().directory, "--store", bad)
    assert code == 1 and "not a usable SQLite file" in err
    assert bad.read_bytes().startswith(b"not a database")  # never touched what we did not write


def test_concurrent_softmax_requests_cannot_both_squeeze_into_the_budget(exported, client_for):
    c = client_for(exported(arch="softmax").directory, policy=SessionPolicy(kv_budget_bytes=16 * 1024))
    a, b = (c.http.post("/v1/sessions").json()["id"] for _ in range(2))
    table = c.server.sessions
    held = table.reserve(20 * 512)  # as if a's request were running: 20 tokens reserved
    r = c.complete([1] * 4, 20, session=b)  # needs 23 tokens more: 43 > 32 fit
    assert r.status_code == 429
    table.unreserve(held)
    assert c.complete([1] * 4, 20, session=b).status_code == 200 and table.reserved == 0


def test_oversized_bodies_are_refused_before_parsing(exported, client_for):
    c = client_for(exported().directory)
    r = c.http.post("/v1/completions", content=b"[" + b"1," * (5 * 2**20) + b"1]",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# --------------------------------------------------------------------------- issue 15: "saved" only when saved


def _row(store: Path, sid: str) -> tuple:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT position, pending, state_sha256 FROM sessions WHERE id = ?", (sid,)).fetchone()


def test_a_locked_store_answers_json_503_and_moves_no_session(exported, client_for, tmp_path):
    """Item 5: another process holds an exclusive lock: the continuation fails as JSON, the session stays
    put in memory and on disk, reads are served, and once the lock goes it continues as if nothing happened."""
    d, store = exported().directory, tmp_path / "s.sqlite"
    c = client_for(d, store, store_busy_timeout_s=0.2)
    sid = c.http.post("/v1/sessions").json()["id"]
    first = c.tokens([5, 9], 3, session=sid)
    before, row = c.http.get(f"/v1/sessions/{sid}").json(), _row(store, sid)
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    r = c.complete([17], 4, session=sid)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert c.http.post("/v1/sessions").status_code == 503
    assert c.http.get(f"/v1/sessions/{sid}").json() == before  # reads still served, nothing moved
    other.execute("ROLLBACK")
    other.close()
    assert _row(store, sid) == row and len(c.server.sessions.sessions) == 1
    assert c.tokens([17], 4, session=sid) == greedy(d, [5, 9, *first, 17], 4)


def test_a_full_store_creates_no_session_it_cannot_keep(exported, client_for, tmp_path):
    """Item 5, the disk-full half: SQLite's SQLITE_FULL (max_page_count reached) is a 503 and no phantom session."""
    store = tmp_path / "s.sqlite"
    c = client_for(exported().directory, store)
    db = c.server.sessions.store.db
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    statuses = [c.http.post("/v1/sessions").status_code for _ in range(40)]
    assert 503 in statuses
    created = statuses.index(503)
    assert len(c.server.sessions.sessions) == created
    with sqlite3.connect(store) as other:
        assert other.execute("SELECT COUNT(*) FROM sessions").fetchone() == (created,)


def test_a_store_deleted_while_serving_is_noticed(exported, client_for, tmp_path):
    """Item 6: the store's directory is removed under the server: requests that would persist fail, /health says so."""
    (tmp_path / "st").mkdir()
    c = client_for(exported().directory, tmp_path / "st" / "s.sqlite")
    sid = c.http.post("/v1/sessions").json()["id"]
    c.tokens([5, 9], 3, session=sid)
    before = c.http.get(f"/v1/sessions/{sid}").json()
    shutil.rmtree(tmp_path / "st")
    r = c.complete([17], 4, session=sid)
    assert r.status_code == 503 and "removed while serving" in r.json()["error"]["message"]
    assert c.http.get(f"/v1/sessions/{sid}").json() == before
    health = c.http.get("/health")
    assert health.status_code == 503 and "removed" in health.json()["status"]


def test_one_store_one_server(exported, client_for, tmp_path, run_cli):
    """Item 7: a second server on the same store is refused at start, in one line."""
    store = tmp_path / "s.sqlite"
    client_for(exported().directory, store)
    with pytest.raises(SamoutError, match="in use by another samout-edge serve .pid"):
        client_for(exported().directory, store)
    code, _, err = run_cli("serve", exported().directory, "--store", store, "--port", "0")
    assert code == 1 and "one store, one server" in err and len(err.strip().splitlines()) == 1


def test_a_foreign_sqlite_file_is_not_taken_over(exported, client_for, tmp_path):
    store = tmp_path / "app.sqlite"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(SamoutError, match="SQLite file of something else"):
        client_for(exported().directory, store)
    with sqlite3.connect(store) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]


def test_the_store_is_private(exported, client_for, tmp_path):
    """Item 9: session states are user data: 0600, whatever the umask."""
    old = os.umask(0o022)
    try:
        c = client_for(exported().directory, tmp_path / "s.sqlite")
        c.tokens([5, 9], 3, session=c.http.post("/v1/sessions").json()["id"])
    finally:
        os.umask(old)
    for path in tmp_path.glob("s.sqlite*"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_client_gone_before_a_whole_completion_leaves_the_session(exported, tmp_path):
    """Item 8: a non-streamed request whose client disconnects advances nothing it never received."""
    d = exported(max_seq=4096).directory
    with ServerProcess(d, "--store", str(tmp_path / "s.sqlite")) as server:
        sid = httpx.post(f"{server.url}/v1/sessions").json()["id"]
        body = {"prompt": [5, 9], "max_tokens": 4000, "temperature": 0, "session": sid}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
        deadline = time.time() + 30
        while time.time() < deadline:  # the server notices, cancels and releases the session
            r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 2})
            if r.status_code != 409:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        assert r.json()["session"]["position"] == 2 + 1  # only this request's tokens: 5 9, then one generated
        assert r.json()["choices"][0]["token_ids"] == greedy(d, [5, 9], 2)


def _rss_peak_kib(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM")))


def test_a_chunked_body_is_cut_at_the_limit(exported):
    """Item 10: 30 MB with Transfer-Encoding: chunked gets 413 without being read or parsed whole."""
    with ServerProcess(exported().directory, "--memory-only") as server:
        before = _rss_peak_kib(server.pid)

        def body():
            for _ in range(300):
                yield b"[" + b"1, " * 33_000 + b"1]"

        started = time.time()
        r = httpx.post(f"{server.url}/v1/completions", content=body(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert time.time() - started < 10
        assert _rss_peak_kib(server.pid) - before < 40 * 1024  # read at most the 8 MiB limit


def test_a_huge_text_prompt_does_not_block_the_server(exported, tmp_path):
    """Item 11: a 7 MB text prompt is refused on its length before encoding, off the event loop."""
    from tests.test_serve_robustness import _slowest_health_while

    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(127)] + ["a" * 50]))  # one long token: 50 tries a character
    with ServerProcess(exported().directory, "--memory-only", "--vocab", str(vocab)) as server:
        answer, slowest = _slowest_health_while(server.url, "/v1/completions",
                                                {"prompt": "b" * 7_000_000, "max_tokens": 1})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "prompt_too_long"
        assert slowest < 2.0


def test_text_encoding_is_linear_in_the_text(exported):
    """Item 11: greedy longest match stays linear with a 2000-character token (was quadratic: 40 s)."""
    from samout_edge.artifact.vocab import Vocab

    vocab = Vocab(["a" * 1999 + "b", "a", "b"])
    started = time.time()
    assert vocab.encode("a" * 20_000) == [1] * 20_000
    assert vocab.encode("a" * 1999 + "b" + "ab") == [0, 1, 2]
    assert time.time() - started < 5


# --------------------------------------------------------------------------- OpenAI completions, complete (issue 20)


@pytest.fixture
def text_client(exported, client_for, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    d = exported().directory
    return client_for(d, vocab=vocab), d


def test_stop_sequences_end_the_text_where_one_begins(text_client):
    c, d = text_client
    full = c.complete("hi", 40).json()["choices"][0]["text"]
    stop = full[11:14]  # three characters: three tokens, so the match crosses token boundaries
    cut = full.index(stop)
    r = c.complete("hi", 40, stop=[stop, "\x7f\x7f\x7f"]).json()
    choice = r["choices"][0]
    assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
    assert len(choice["token_ids"]) == full.index(stop) + len(stop)  # it stopped at the token completing it
    assert c.complete("hi", 40).json()["choices"][0]["finish_reason"] == "length"
    with c.http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "temperature": 0,
                                                         "stop": stop, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full[:cut]  # no held-back text leaked
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("fields,name", [({"best_of": 3}, "best_of"), ({"logit_bias": {"5": 10}}, "logit_bias"),
                                         ({"suffix": "x"}, "suffix"), ({"functions": []}, "functions"),
                                         ({"store": True}, "store"),
                                         ({"n": 17, "prompt": ["a", "b"]}, "at most 32 sequences (prompts x n)")])
def test_an_unsupported_parameter_is_refused_by_name(text_client, fields, name):
    c, _ = text_client
    r = c.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **fields})
    assert r.status_code == 400 and name in r.json()["error"]["message"], r.text
    assert c.complete("hi", 4, n=1, echo=False, logprobs=None, best_of=1, logit_bias={}, user="u1").status_code == 200


def test_n_and_a_list_of_prompts_are_batched_choices(text_client):
    c, d = text_client
    body = c.complete(["hi", "yo"], 6, n=2, seed=11, temperature=1.0).json()
    choices = body["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2, 3]
    for ch in choices:  # choice i*n+j: prompt i, sampled with seed + index
        prompt = ["hi", "yo"][ch["index"] // 2]
        with load_runner(d, "ort") as runner:
            want = generate(runner, [ord(x) for x in prompt], 6, Sampler(1.0, seed=11 + ch["index"])).new_ids
        assert ch["token_ids"] == want
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 24, "total_tokens": 28}
    greedy_pair = c.complete([[5, 9], [17, 3]], 5).json()["choices"]
    assert [ch["token_ids"] for ch in greedy_pair] == [greedy(d, [5, 9], 5), greedy(d, [17, 3], 5)]
    sid = c.http.post("/v1/sessions").json()["id"]
    assert c.complete("hi", 4, n=2, session=sid).status_code == 400


def test_echo_and_logprobs(text_client):
    c, d = text_client
    r = c.complete("hi", 5, echo=True).json()["choices"][0]
    assert r["text"].startswith("hi") and r["text"][2:] == "".join(chr(t) for t in r["token_ids"])
    r = c.complete("hi", 5, logprobs=3).json()["choices"][0]
    lp = r["logprobs"]
    assert lp["tokens"] == [chr(t) for t in r["token_ids"]] and len(lp["token_logprobs"]) == 5
    assert all(len(top) == 3 and max(top.values()) >= chosen - 1e-9 for top, chosen in
               zip(lp["top_logprobs"], lp["token_logprobs"]))  # greedy: the chosen token is the most likely
    assert all(math.isclose(max(top.values()), chosen, abs_tol=1e-9) for top, chosen in
               zip(lp["top_logprobs"], lp["token_logprobs"]))
    with load_runner(d, "ort") as runner:  # the first token's log-probability, from the prefill's logits
        logits, _ = runner.run(np.asarray([[ord("h"), ord("i")]]), runner.initial_state(1))
        z = logits[0, -1].astype(np.float64)
        want = z[r["token_ids"][0]] - z.max() - np.log(np.exp(z - z.max()).sum())
    assert math.isclose(lp["token_logprobs"][0], want, abs_tol=1e-6)


def test_top_p_and_penalties_change_the_pick_as_the_sampler_does(text_client):
    from samout_edge.generate import Sampler

    c, d = text_client
    assert c.tokens("hi", 12, temperature=1.0, top_p=1e-9, seed=3) == greedy(d, [ord("h"), ord("i")], 12)
    with load_runner(d, "ort") as runner:
        want = generate(runner, [ord("h"), ord("i")], 100, Sampler(0.0, frequency_penalty=2.0, presence_penalty=1.0)).new_ids
    got = c.tokens("hi", 100, frequency_penalty=2.0, presence_penalty=1.0)
    plain = greedy(d, [ord("h"), ord("i")], 100)
    assert got == want and got != plain and len(set(got)) > len(set(plain))  # the penalties spread the picks
    assert c.complete("hi", 4, top_p=0).status_code == 400 and c.complete("hi", 4, presence_penalty=3).status_code == 400


def test_stream_options_include_usage_sends_a_last_usage_chunk(text_client):
    c, _ = text_client
    with c.http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5,
                                                                   "total_tokens": 7}


def test_the_official_openai_sdk_completes_streams_and_stops(exported, tmp_path):
    """The openai package against a real serve process: completions, streaming, stop, sessions
    through extra_body, and our errors as openai.APIStatusError with our message."""
    openai = pytest.importorskip("openai")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    proc = ServerProcess(exported().directory, "--vocab", str(vocab))
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        full = client.completions.create(model=model, prompt="hi", max_tokens=30, temperature=0)
        text = full.choices[0].text
        stopped = client.completions.create(model=model, prompt="hi", max_tokens=30, temperature=0, stop=[text[8:10]])
        assert stopped.choices[0].text == text[: text.index(text[8:10])]
        assert stopped.choices[0].finish_reason == "stop" and stopped.usage.prompt_tokens == 2
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model=model, prompt="hi", max_tokens=30, temperature=0, stream=True) if ch.choices)
        assert streamed == text
        session = client.post("/sessions", cast_to=object, body={})
        first = client.completions.create(model=model, prompt="hi", max_tokens=3, temperature=0,
                                          extra_body={"session": session["id"]})
        assert first.model_extra["session"]["position"] == 2 + 2
        two = client.completions.create(model=model, prompt="hi", max_tokens=3, n=2, logprobs=2, seed=5)
        assert [ch.index for ch in two.choices] == [0, 1] and len(two.choices[1].logprobs.token_logprobs) == 3
        with pytest.raises(openai.APIStatusError) as error:
            client.completions.create(model=model, prompt="hi", max_tokens=3, logit_bias={"5": 1.0})
        assert error.value.status_code == 400 and "logit_bias is not supported" in str(error.value)
    finally:
        proc.kill()


# --------------------------------------------------------------------------- API keys (issue 20)

KEY_A, KEY_B = "a" * 8 + "-key-0123456789", "b" * 8 + "-key-9876543210"


def test_every_route_but_health_needs_a_key_and_sessions_belong_to_theirs(exported, client_for, tmp_path):
    d = exported().directory
    c = client_for(d, api_keys=[KEY_A, KEY_B])
    auth = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
    assert c.http.get("/health").status_code == 200
    for headers in ({}, auth("wrong-key-wrong-key"), {"Authorization": f"Basic {KEY_A}"}):
        r = c.http.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert c.http.post("/v1/completions", json={"prompt": [5, 9], "max_tokens": 2}).status_code == 401
    sid = c.http.post("/v1/sessions", headers=auth(KEY_A)).json()["id"]
    body = {"prompt": [5, 9], "max_tokens": 3, "temperature": 0, "session": sid}
    assert c.http.post("/v1/completions", json=body, headers=auth(KEY_A)).status_code == 200
    for call in (lambda h: c.http.get(f"/v1/sessions/{sid}", headers=h),
                 lambda h: c.http.post("/v1/completions", json=body, headers=h),
                 lambda h: c.http.delete(f"/v1/sessions/{sid}", headers=h)):
        r = call(auth(KEY_B))  # another key: as if it did not exist
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert c.http.get(f"/v1/sessions/{sid}", headers=auth(KEY_A)).json()["position"] == 2 + 2
    c.close()
    again = client_for(d, api_keys=[KEY_A, KEY_B])  # the owner persists with the session
    assert again.http.get(f"/v1/sessions/{sid}", headers=auth(KEY_B)).status_code == 404
    assert again.http.get(f"/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 200


def test_a_store_from_before_api_keys_opens_and_its_sessions_belong_to_no_key(exported, client_for, tmp_path):
    d = exported().directory
    store = tmp_path / "old.sqlite"
    c = client_for(d, store)
    sid = c.http.post("/v1/sessions").json()["id"]
    c.close()
    with sqlite3.connect(store) as db:  # the schema as it was: no owner column
        db.execute("ALTER TABLE sessions DROP COLUMN owner")
    c = client_for(d, store, api_keys=[KEY_A])
    assert c.http.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200


def test_serve_refuses_an_open_network_server_and_short_keys(run_cli, exported, tmp_path, monkeypatch):
    monkeypatch.delenv("SAMOUT_EDGE_API_KEY", raising=False)
    d = exported().directory
    code, _, err = run_cli("serve", d, "--host", "0.0.0.0", "--memory-only")
    assert code == 1 and "reachable from the network" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", d, "--api-key", "short", "--memory-only")
    assert code == 1 and "at least 16" in err and "short" not in err  # a key is never echoed


def test_the_openai_sdk_with_an_api_key(exported, tmp_path):
    openai = pytest.importorskip("openai")
    proc = ServerProcess(exported().directory, "--memory-only", "--api-key-file", str(_key_file(tmp_path)))
    try:
        good = openai.OpenAI(base_url=f"{proc.url}/v1", api_key=KEY_A)
        assert good.completions.create(model="m", prompt=[5, 9], max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{proc.url}/v1", api_key="not-the-key-at-all").models.list()
    finally:
        proc.kill()


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"{KEY_A}\n\n{KEY_B}\n")
    path.chmod(0o600)  # serve refuses a key file others can read
    return path


def test_a_byte_vocab_server_takes_and_streams_non_ascii_text(client_for, tmp_path):
    """Issue 20: "café", "€", "中" and a BOM go in as their UTF-8 bytes; streamed text is whole
    characters, and joined it is the completion's text."""
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    save_checkpoint(random_checkpoint(ModelConfig(256, 32, 4, 2), seed=3), tmp_path / "ckpt")
    d = export(tmp_path / "e", ExportOptions(max_seq=64), checkpoint=tmp_path / "ckpt", vocab="bytes").directory
    c = client_for(d)
    prompt = "\ufeffcafé 5€ 中"
    r = c.complete(prompt, 40, temperature=1.0, seed=7).json()
    assert r["usage"]["prompt_tokens"] == len(prompt.encode())
    with load_runner(d, "ort") as runner:
        want = generate(runner, list(prompt.encode()), 40, Sampler(1.0, seed=7)).new_ids
    assert r["choices"][0]["token_ids"] == want
    assert r["choices"][0]["text"] == bytes(want).decode("utf-8", errors="replace")
    with c.http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 40, "temperature": 1.0,
                                                         "seed": 7, "stream": True}) as response:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in response.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == r["choices"][0]["text"]


def test_a_runner_failure_mid_stream_is_a_json_error_chunk(exported, client_for, monkeypatch):
    c = client_for(exported().directory)
    runner = c.server.batcher.runner

    def broken(ids, state):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "run", broken)
    with c.http.stream("POST", "/v1/completions", json={"prompt": [5, 9], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    error = json.loads(lines[-2][6:])["error"]
    assert "device lost" in error["message"] and error["code"] == "runner_error" and lines[-1] == "data: [DONE]"


# --------------------------------------------------------------------------- chat completions (issue 20)


def test_chat_completions_apply_the_template_and_answer_as_openai_does(text_client):
    c, d = text_client
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = "system: be brief\nuser: hi\nassistant: "  # the default template, stated in docs/serving.md
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(prompt)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["token_ids"] == greedy(d, [ord(ch) for ch in prompt], 12)
    with c.http.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0,
                                                              "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == \
        body["choices"][0]["message"]["content"]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "auto"},
                  {"response_format": {"type": "json_object"}}):
        r = c.http.post("/v1/chat/completions", json={"messages": messages, **extra})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", (extra, r.text)
    r = c.http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400


def test_the_openai_sdk_chats_streamed_and_not(exported, tmp_path):
    openai = pytest.importorskip("openai")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    proc = ServerProcess(exported().directory, "--vocab", str(vocab), "--memory-only")
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="m", messages=messages, max_tokens=10, temperature=0, stream=True) if ch.choices)
        assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens == 10
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="m", messages=messages, tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
        assert "tools is not supported" in str(error.value)
    finally:
        proc.kill()


def test_a_chat_template_of_ones_own_and_a_broken_one(exported, client_for, tmp_path, run_cli):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    c = client_for(exported().directory, vocab=vocab, chat_template=template)
    r = c.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == len("<user>hi>")
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # the sandbox: a template cannot reach Python
    c2 = client_for(exported().directory, tmp_path / "s2.sqlite", vocab=vocab, chat_template=escape)
    r = c2.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template"
    (tmp_path / "bad.jinja").write_text("{% for %}")
    code, _, err = run_cli("serve", exported().directory, "--memory-only", "--chat-template", tmp_path / "bad.jinja")
    assert code == 1 and "does not parse" in err


def test_chat_with_a_hugging_face_tokenizer_and_its_template(tmp_path, client_for, run_cli):
    """A tokenizer.json carried in the export and a tokenizer_config.json's chat_template: the
    prompt is the template's text in the tokenizer's ids; streamed deltas are whole characters."""
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.artifact.vocab import Vocab
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint
    from tests.test_eval import _hf_tokenizer

    tokenizer = _hf_tokenizer(tmp_path, 300)
    save_checkpoint(random_checkpoint(ModelConfig(320, 32, 4, 2), seed=2), tmp_path / "ckpt")
    d = export(tmp_path / "e", ExportOptions(max_seq=64), checkpoint=tmp_path / "ckpt", vocab=tokenizer).directory
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                                                   "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}))
    c = client_for(d, chat_template=json.loads(config.read_text())["chat_template"])
    messages = [{"role": "user", "content": "café 中?"}]
    body = c.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "seed": 1}).json()
    prompt = "[user] café 中?\n[assistant]"
    v = Vocab.load(tokenizer)
    assert body["usage"]["prompt_tokens"] == len(v.encode(prompt))
    assert body["choices"][0]["message"]["content"] == v.decode_ids(body["choices"][0]["token_ids"])
    code, _, err = run_cli("serve", d, "--memory-only", "--chat-template", tmp_path / "ckpt" / "config.json")
    assert code == 1 and "tokenizer_config.json" in err
