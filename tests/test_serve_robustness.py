"""samout-edge serve under faults and hostile clients (issue 26): a lost answer is replayed, not
run twice; a locked or unwritable store stalls nothing but its writes; API keys are refused when
they cannot work, checked before the body, and one key cannot evict another's sessions."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from samout_edge.serve.app import create_app
from samout_edge.serve.process import ServerProcess
from samout_edge.serve.sessions import SessionPolicy
from tests import test_serve
from tests.test_serve import KEY_A, KEY_B, greedy

client_for = test_serve.client_for  # the fixture: a server on a TestClient, closed with the test


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- item 6: exact from the client's side


def test_a_lost_answer_is_replayed_not_run_twice(exported, client_for, tmp_path):
    """The same request sent again from the position it started at gets the committed answer
    (streamed or not, after a restart too) and moves nothing; another request there is a 409."""
    d = exported().directory
    c = client_for(d)
    sid = c.http.post("/v1/sessions").json()["id"]
    body = {"prompt": [5, 9], "max_tokens": 4, "temperature": 1.0, "seed": 3, "session": sid, "expected_position": 0}
    first = c.http.post("/v1/completions", json=body).json()
    position = first["session"]["position"]
    again = c.http.post("/v1/completions", json=body).json()  # the client never saw `first`
    assert again["replayed"] is True and again["choices"] == first["choices"] and again["id"] == first["id"]
    assert c.http.get(f"/v1/sessions/{sid}").json()["position"] == position  # not a second turn
    with c.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == first["choices"][0]["token_ids"]
    assert chunks[-1]["session"]["position"] == position
    other = c.http.post("/v1/completions", json={**body, "prompt": [17]})
    assert other.status_code == 409 and other.json()["error"]["code"] == "position_mismatch"
    assert f"at position {position}" in other.json()["error"]["message"]
    c.close()
    c = client_for(d)  # the turn is kept with the session, in the same commit
    assert c.http.post("/v1/completions", json=body).json()["choices"] == first["choices"]
    nxt = c.http.post("/v1/completions", json={**body, "prompt": [17], "expected_position": position,
                                               "temperature": 0})
    assert nxt.status_code == 200 and "replayed" not in nxt.json()
    want = greedy(d, [5, 9, *first["choices"][0]["token_ids"], 17], 4)
    assert nxt.json()["choices"][0]["token_ids"] == want
    bad = c.http.post("/v1/completions", json={"prompt": [1], "expected_position": 0})
    assert bad.status_code == 400 and "needs a session" in bad.json()["error"]["message"]


def test_a_chat_turn_is_replayed_as_chat(exported, client_for, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    c = client_for(exported().directory, vocab=vocab)
    sid = c.http.post("/v1/sessions").json()["id"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "session": sid,
            "expected_position": 0}
    first = c.http.post("/v1/chat/completions", json=body).json()
    with c.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == first["choices"][0]["message"]["content"] and chunks[0]["object"] == "chat.completion.chunk"


# --------------------------------------------------------------------------- item 10: a locked store


def _hold_exclusive(store: Path) -> subprocess.Popen:
    """Another process that holds ``BEGIN EXCLUSIVE`` on the store until killed."""
    code = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_store_stalls_no_reads(exported, tmp_path):
    """Another process holds the store locked: creating a session and a session's completion wait
    for SQLite (then 503), off the event loop and without the session table's lock; /health, reads
    and a completion that writes nothing answer at once meanwhile."""
    store = tmp_path / "s.sqlite"
    with ServerProcess(exported().directory, "--store", str(store)) as server:
        url = server.url
        sid = httpx.post(f"{url}/v1/sessions").json()["id"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 2, "session": sid}).is_success
        holder = _hold_exclusive(store)
        try:
            answers: list[httpx.Response] = []
            writers = [threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/sessions", timeout=30))),
                       threading.Thread(target=lambda: answers.append(httpx.post(
                           f"{url}/v1/completions", json={"prompt": [9], "max_tokens": 2, "session": sid},
                           timeout=30)))]
            for w in writers:
                w.start()
                time.sleep(0.3)  # the create holds whatever it holds while SQLite waits
            slowest = 0.0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for call in (lambda: httpx.get(f"{url}/health", timeout=10),
                             lambda: httpx.get(f"{url}/v1/sessions/{sid}", timeout=10),
                             lambda: httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 1},
                                                timeout=10)):
                    t0 = time.perf_counter()
                    assert call().status_code == 200
                    slowest = max(slowest, time.perf_counter() - t0)
            print(f"slowest read while the store was locked: {slowest * 1e3:.0f} ms")
            assert slowest < 0.5
            for w in writers:
                w.join()
            assert [a.status_code for a in answers] == [503, 503]
            assert all(a.json()["error"]["code"] == "store_unavailable" for a in answers)
        finally:
            holder.kill()
            holder.wait()
        assert httpx.post(f"{url}/v1/sessions").status_code == 200  # and on it goes


# --------------------------------------------------------------------------- item 11: an unwritable -shm


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_shm_file_is_a_503_not_a_sigbus(exported, tmp_path):
    """SQLite maps the -shm file; growing an immutable one was a SIGBUS that killed the server."""
    store = tmp_path / "s.sqlite"
    shm = Path(f"{store}-shm")
    with ServerProcess(exported().directory, "--store", str(store)) as server:
        url = server.url
        sid = httpx.post(f"{url}/v1/sessions").json()["id"]
        if not (shm.exists() and _chattr("+i", shm)):
            pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE) and a filesystem with the flag")
        try:
            for _ in range(100):  # enough rows to need a second page of the WAL index on the old tree
                r = httpx.post(f"{url}/v1/sessions", timeout=30)
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                assert "-shm" in r.json()["error"]["message"]
            r = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 2, "session": sid}, timeout=30)
            assert r.status_code == 503 and server.proc.poll() is None
            assert httpx.get(f"{url}/health").status_code == 503  # says why
        finally:
            _chattr("-i", shm)
        assert httpx.post(f"{url}/v1/sessions").status_code == 200


# --------------------------------------------------------------------------- item 13: API keys


def test_key_files_and_keys_that_cannot_work_are_refused_at_start(run_cli, exported, tmp_path, monkeypatch):
    monkeypatch.delenv("SAMOUT_EDGE_API_KEY", raising=False)

    def served(*args, **kwargs):  # what the refusals must never reach
        raise AssertionError("serve started")

    monkeypatch.setattr("samout_edge.serve.open_server", served)
    d = exported().directory
    keys = tmp_path / "keys.txt"
    for text in ("", "\r\n\r\n   \n", "\n"):
        keys.write_text(text)
        keys.chmod(0o600)
        code, _, err = run_cli("serve", d, "--memory-only", "--api-key-file", keys)
        assert code == 1 and "holds no key" in err and len(err.strip().splitlines()) == 1
    keys.write_text(f"{KEY_A}\r\n")
    keys.chmod(0o644)
    code, _, err = run_cli("serve", d, "--memory-only", "--api-key-file", keys)
    assert code == 1 and "chmod 600" in err and KEY_A not in err
    code, _, err = run_cli("serve", d, "--memory-only", "--api-key", "clé-secrète-0123456789")
    assert code == 1 and "ASCII" in err and "secr" not in err


def test_one_key_cannot_evict_another_keys_sessions(exported, client_for):
    """--max-sessions is shared out: a key at its share evicts its own least recently used idle session."""
    c = client_for(exported().directory, api_keys=[KEY_A, KEY_B], policy=SessionPolicy(max_sessions=4))
    b = [c.http.post("/v1/sessions", headers=_auth(KEY_B)).json()["id"] for _ in range(2)]
    a = [c.http.post("/v1/sessions", headers=_auth(KEY_A)).json()["id"] for _ in range(6)]
    for sid in b:
        assert c.http.get(f"/v1/sessions/{sid}", headers=_auth(KEY_B)).status_code == 200
    assert [c.http.get(f"/v1/sessions/{sid}", headers=_auth(KEY_A)).status_code for sid in a] == [404] * 4 + [200] * 2


def test_the_key_is_checked_before_the_body_is_read(exported, client_for):
    """An unauthenticated POST is answered 401 without a byte of its body read (no buffering)."""
    app = create_app(client_for(exported().directory, api_keys=[KEY_A]).server)
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 2**20, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"content-length", b"8000000")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and not reads


# --------------------------------------------------------------------------- item 7: memory admission


def test_the_cgroup_limit_is_what_memory_a_container_has(tmp_path):
    """cgroup v2 (a limit on an ancestor too) and v1; page cache that can be dropped counts as free."""
    from samout_edge.artifact.resources import cgroup_memory_left

    leaf = tmp_path / "v2" / "kube" / "pod"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text("1000\n")
    (leaf.parent / "memory.max").write_text(f"{600 * 2**20}\n")
    (leaf.parent / "memory.current").write_text(f"{100 * 2**20}\n")
    (leaf.parent / "memory.stat").write_text(f"anon 5\ninactive_file {2**20}\n")
    assert cgroup_memory_left(tmp_path / "v2", "0::/kube/pod\n") == 501 * 2**20
    v1 = tmp_path / "v1" / "memory" / "docker"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{600 * 2**20}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{200 * 2**20}\n")
    assert cgroup_memory_left(tmp_path / "v1", "4:memory:/docker\n1:cpu:/\n") == 400 * 2**20
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_memory_left(tmp_path / "v1", "4:memory:/docker\n") is None


def test_a_request_is_admitted_against_the_memory_it_needs(exported, client_for, monkeypatch):
    """A --logits all export keeps every prompt position's logits, per choice: a request that needs
    more than the container leaves is refused with the numbers before anything is allocated."""
    c = client_for(exported(logits="all").directory, store=None)
    one = c.server.request_bytes(300, 300 + 8)
    monkeypatch.setattr("samout_edge.artifact.resources.cgroup_memory_left", lambda: 2 * one)
    assert c.tokens([5] * 300, 8) == c.tokens([5] * 300, 8)  # one choice fits
    r = c.complete([5] * 300, 8, n=4)
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
    assert "MiB" in r.json()["error"]["message"] or "KiB" in r.json()["error"]["message"]
    assert c.server.memory_held == 0  # given back by every finished or refused request


# --------------------------------------------------------------------------- item 8: the event loop and the GIL


def _unigram(tmp_path: Path, added: str | None = None) -> Path:
    """A Unigram tokenizer.json with NFKC normalisation (as T5's, XLNet's), 99 tokens, one of 16 characters
    (so a bound of N / 16 tokens lets a million characters through), maybe one long added token."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    pieces = [("<unk>", 0.0)] + [(chr(c), -5.0) for c in range(32, 127)] + [(" the", -3.0), ("ing", -3.5),
                                                                          ("abcdefghijklmnop", -8.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    if added:
        tokenizer.add_tokens([AddedToken(added)])
    path = tmp_path / f"tokenizer-{len(added or '')}.json"
    tokenizer.save(str(path))
    return path


def _slowest_health_while(url: str, route: str, body: dict) -> tuple[httpx.Response, float]:
    """(the answer to ``body``, the slowest /health answer while it was being refused or served)."""
    answers: list[httpx.Response] = []
    raw = json.dumps(body, ensure_ascii=False).encode()
    sender = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}{route}", content=raw, headers={"content-type": "application/json"}, timeout=120)))
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.005)
    sender.join()
    return answers[0], slowest


@pytest.mark.parametrize("case", ["nfkc", "long", "added", "messages"])
def test_health_answers_while_a_huge_prompt_is_refused_or_served(exported, tmp_path, case):
    """Characters are bounded before any tokenizer's work (as sent and NFKC-normalised), a long
    text is tokenized in a child process (the tokenizers library holds the GIL), chat messages
    are counted before they are validated: /health answers within 100 ms throughout."""
    pytest.importorskip("tokenizers")
    vocab = _unigram(tmp_path, "x" * 100_000 if case == "added" else None)
    with ServerProcess(exported().directory, "--memory-only", "--vocab", str(vocab)) as server:
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "warm " * 5000, "max_tokens": 1}, timeout=60)
        route, body = "/v1/completions", {"max_tokens": 1}
        if case == "nfkc":  # 1M characters, 18M once normalised
            body["prompt"] = "\ufdfa" * 1_000_000
        elif case == "long":  # 500k tokens, found out only by tokenizing
            body["prompt"] = "ab" * 250_000
        elif case == "added":  # one added token of 100,000 characters, ten times: served
            body["prompt"] = "x" * 1_000_000
        else:
            route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 200_000}
        answer, slowest = _slowest_health_while(server.url, route, body)
        print(f"{case}: HTTP {answer.status_code} in a slowest /health of {slowest * 1e3:.0f} ms")
        if case == "added":
            assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == 10
        else:
            error = answer.json()["error"]
            assert answer.status_code == 400, error
            assert ("--max-prompt-chars" if case == "nfkc" else "limit") in error["message"]
        # the target is 100 ms (40-85 ms measured here; was 11.7 s for "nfkc", 1.8 s for "messages"): a test on
        # a shared 2-core machine sees the scheduler's gaps too, so it asserts with that headroom
        assert slowest < 0.25
