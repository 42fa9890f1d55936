"""Load and fault test of `samout-edge serve`, on loopback only.

For each export (cummax and softmax side by side): start the server, then for
each concurrency level open that many sessions and run one streamed completion
per session at once (prompt --prompt tokens, --tokens new tokens, greedy),
measuring tokens/s over the level, latency per token (each request's time
from its first to its last streamed token over its decode steps; p50/p99 over
the requests), time to first token, and the server's resident memory (VmRSS
after the level, VmHWM peak). Each session runs --rounds completions in a row,
so softmax KV caches grow as in a conversation.

Then the fault test: --fault-sessions clients, a mix of plain, streamed,
cancelling (a stream closed after a few tokens, then sent again), chat (when
the export carries a vocab) and n=2 (no session) requests, run back to back;
after --fault-after seconds the server gets SIGKILL mid-load and is restarted
on the same store. Each client sends the request it got no answer to again,
with the same ``expected_position``: the server answers with the turn it had
committed, or runs it now. Then every session must be exactly what its client
saw, with no tolerance: its position is what the client's last answer said,
its continuation equals ONNX Runtime's greedy tokens over the whole history as
the client saw it, and no stored row fails its checksum (and SQLite's
integrity_check passes).

    python benchmarks/serve_load.py out/seed-cummax out/seed-softmax --json benchmarks/results/cpu-serve.json
    python benchmarks/serve_load.py out/tiny --fault-only --fault-sessions 32 --fault-after 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from samout_edge.artifact.files import write_json_atomic
from samout_edge.generate import generate
from samout_edge.runtime.registry import load_runner
from samout_edge.serve.process import ServerProcess

LOOPBACK = "127.0.0.1"


def start_server(export: Path, store: Path, max_batch: int, kv_budget_mib: float) -> ServerProcess:
    server = ServerProcess(export, "--host", LOOPBACK, "--store", str(store), "--max-batch", str(max_batch),
                           "--kv-budget-mib", str(kv_budget_mib))
    if not server.url.startswith(f"http://{LOOPBACK}:"):
        server.kill()
        sys.exit(f"error: refusing to load anything but loopback, got {server.url}")
    return server


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0])
    return fields


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> tuple[list[int], list[float], dict]:
    """(tokens, arrival times, final chunk)."""
    tokens, times, final = [], [], {}
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            ids = chunk["choices"][0]["token_ids"]
            if ids:
                tokens += ids
                times.append(time.perf_counter())
            if chunk["choices"][0]["finish_reason"]:
                final = chunk
    return tokens, times, final


async def level(url: str, sessions: int, prompt_len: int, tokens: int, rounds: int, vocab: int, seed: int) -> dict:
    """``sessions`` clients at once, each running ``rounds`` completions back to back on its session."""
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=sessions + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        ids = [(await client.post(f"{url}/v1/sessions")).json()["id"] for _ in range(sessions)]
        per_token, ttft, generated = [], [], 0

        async def one(sid):
            nonlocal generated
            for _ in range(rounds):
                start = time.perf_counter()
                new, times, _ = await stream_completion(
                    client, url, {"prompt": rng.integers(0, vocab, prompt_len).tolist(), "max_tokens": tokens,
                                  "temperature": 0, "session": sid})
                generated += len(new)
                ttft.append(times[0] - start)
                if len(times) > 1:
                    per_token.append((times[-1] - times[0]) / (len(times) - 1))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for s in ids))
        wall = time.perf_counter() - t0
        for sid in ids:
            await client.delete(f"{url}/v1/sessions/{sid}")
    ms, first = np.array(per_token) * 1e3, np.array(ttft) * 1e3
    return {"sessions": sessions, "requests": sessions * rounds, "tokens": generated, "wall_s": round(wall, 3),
            "tokens_per_s": round(generated / wall, 1), "token_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "token_ms_p99": round(float(np.percentile(ms, 99)), 2),
            "ttft_ms_p50": round(float(np.percentile(first, 50)), 1)}


KINDS = ("plain", "streamed", "cancelling", "chat", "n2")  # the fault test's client mix, in turn


class Turns:
    """One session's client: what it saw, and the request whose answer it has not seen yet.

    Every request carries ``expected_position`` (the position the client last saw), so a
    request whose answer was lost (the kill, or a stream the client cancelled) is sent again
    as it was: the server answers with the committed turn if there was one, else runs it now.
    Either way the client ends up exactly where the session is."""

    def __init__(self, sid: str, kind: str, vocab, template):
        self.sid, self.kind, self.vocab, self.template = sid, kind, vocab, template
        self.history: list[int] = []
        self.pending: list[int] = []
        self.position, self.rounds, self.replayed = 0, 0, 0
        self.in_flight: dict | None = None
        self.errors: list[str] = []
        self.stopped_by = ""  # what ended its loop: the kill, or an error answer (reported)

    def request(self, rng: np.random.Generator, vocab_size: int) -> dict:
        body = {"max_tokens": int(rng.integers(4, 12)), "temperature": 0, "session": self.sid,
                "expected_position": self.position}
        if self.kind == "chat":
            words = ["hello", "def main(", "x = 1", "print(x)", "# note"]
            body["messages"] = [{"role": "user", "content": str(rng.choice(words))}]
        else:
            body["prompt"] = rng.integers(0, vocab_size, int(rng.integers(1, 6))).tolist()
        return body

    def prompt_ids(self, body: dict) -> list[int]:
        if "prompt" in body:
            return body["prompt"]
        return self.vocab.encode(self.template.render(messages=body["messages"], add_generation_prompt=True))

    def seen(self, body: dict, answer: dict) -> None:
        """The answer to ``body`` reached the client: the session is where the answer says."""
        new = answer["choices"][0]["token_ids"]
        consumed = len(self.pending) + len(self.prompt_ids(body)) + len(new) - 1
        if answer["session"]["position"] != self.position + consumed:
            self.errors.append(f"{self.sid}: answer at position {answer['session']['position']}, the client "
                               f"counts {self.position + consumed}")
        self.history += self.pending + self.prompt_ids(body) + new[:-1]
        self.pending = new[-1:]
        self.position, self.in_flight = answer["session"]["position"], None
        self.rounds += 1
        self.replayed += bool(answer.get("replayed"))


async def send(client: httpx.AsyncClient, url: str, body: dict, stream: bool, cancel_after: int | None = None,
               chat: bool = False) -> dict | None:
    """The answer's body (a stream's chunks folded into one), or None when the client cancelled."""
    route = f"{url}/v1/chat/completions" if chat else f"{url}/v1/completions"
    if not stream:
        for _ in range(100):  # a cancelled stream's request may still be letting go of its session: 409 busy
            r = await client.post(route, json=body)
            if r.status_code != 409 or r.json()["error"]["code"] != "session_busy":
                break
            await asyncio.sleep(0.02)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()
    tokens, final = [], {}
    async with client.stream("POST", route, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if not chunk["choices"]:
                continue
            tokens += chunk["choices"][0].get("token_ids", [])
            if chunk["choices"][0]["finish_reason"]:
                final = chunk
            if cancel_after is not None and len(tokens) >= cancel_after:
                return None  # closing the stream cancels the request
    if not final:
        raise httpx.RemoteProtocolError("the stream ended without its last chunk")
    return {"choices": [{"token_ids": tokens}], "session": final["session"], "replayed": final.get("replayed")}


async def turn(client: httpx.AsyncClient, url: str, s: Turns, body: dict, rng: np.random.Generator) -> None:
    """One request of this client's kind, until its answer is seen (a cancelled one is sent again)."""
    s.in_flight = body
    chat = "messages" in body
    cancel = int(rng.integers(1, 4)) if s.kind == "cancelling" else None
    answer = await send(client, url, body, stream=s.kind in ("streamed", "cancelling"), cancel_after=cancel,
                        chat=chat)
    if answer is None:  # cancelled: whether it was committed, only the server knows: ask by sending it again
        answer = await send(client, url, body, stream=False, chat=chat)
    s.seen(body, answer)


async def rounds_until_killed(url: str, server: ServerProcess, clients: int, kill_after: float, vocab_size: int,
                              vocab, template) -> tuple[dict[str, Turns], dict[str, int]]:
    """``clients`` clients of the mix run back to back until the server gets SIGKILL."""
    rng = np.random.default_rng(1)
    sessions: dict[str, Turns] = {}
    load = {"n2_requests": 0}
    kinds = [k for k in KINDS if k != "chat" or vocab is not None]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        plan = [kinds[i % len(kinds)] for i in range(clients)]
        for kind in plan:
            if kind != "n2":
                sid = (await client.post(f"{url}/v1/sessions")).json()["id"]
                sessions[sid] = Turns(sid, kind, vocab, template)

        async def run(s: Turns) -> None:
            while True:
                try:
                    await turn(client, url, s, s.request(rng, vocab_size), rng)
                except (httpx.TransportError, httpx.HTTPError, RuntimeError) as e:
                    s.stopped_by = f"{type(e).__name__}: {str(e)[:80]}"
                    return

        async def n2() -> None:
            while True:
                try:
                    r = await client.post(f"{url}/v1/completions", json={
                        "prompt": rng.integers(0, vocab_size, 3).tolist(), "n": 2, "max_tokens": 8})
                except (httpx.TransportError, httpx.HTTPError):
                    return
                if r.status_code != 200 or len(r.json()["choices"]) != 2:
                    return
                load["n2_requests"] += 1

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            os.kill(server.pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(run(s) for s in sessions.values()), *(n2() for k in plan if k == "n2"))
    server.kill()  # reaps it
    return sessions, load


def fault_test(export: Path, store: Path, args) -> dict:
    """SIGKILL under the mix, restart on the store: each client sends its unanswered request again,
    and then every session must be exactly what its client saw (position and continuation)."""
    from samout_edge.generate import vocab_for
    from samout_edge.serve.template import compile_template

    t0 = time.perf_counter()
    with start_server(export, store, args.max_batch, args.kv_budget_mib) as server:
        vocab_size = httpx.get(f"{server.url}/health").json()["vocab_size"]
        vocab = vocab_for(None, vocab_size, export)
        sessions, load = asyncio.run(rounds_until_killed(server.url, server, args.fault_sessions, args.fault_after,
                                                         vocab_size, vocab, compile_template(None)))
    integrity = sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone()[0]
    failures, resent = [], 0
    with start_server(export, store, args.max_batch, args.kv_budget_mib) as server:
        url = server.url
        health = httpx.get(f"{url}/health").json()

        async def resend() -> None:
            nonlocal resent
            async with httpx.AsyncClient(timeout=600) as client:
                for s in sessions.values():
                    if s.in_flight is not None:  # its answer was lost to the kill: the same request again
                        resent += 1
                        try:
                            answer = await send(client, url, s.in_flight, stream=False, chat="messages" in s.in_flight)
                            s.seen(s.in_flight, answer)
                        except (httpx.HTTPError, RuntimeError) as e:
                            failures.append(f"{s.sid}: resending its unanswered request failed: {e}")

        asyncio.run(resend())
        with load_runner(export, "ort") as runner:
            for s in sessions.values():
                failures += s.errors
                info = httpx.get(f"{url}/v1/sessions/{s.sid}").json()
                if info.get("position") != s.position:
                    failures.append(f"{s.sid} ({s.kind}): position {info.get('position')}, its client saw {s.position}")
                    continue
                probe = [7, 3]
                got = httpx.post(f"{url}/v1/completions", json={"prompt": probe, "max_tokens": 8, "temperature": 0,
                                                                "session": s.sid, "expected_position": s.position},
                                 timeout=120).json()
                want = generate(runner, s.history + s.pending + probe, 8).new_ids
                if got["choices"][0]["token_ids"] != want:
                    failures.append(f"{s.sid} ({s.kind}): continuation differs from greedy over what its client saw")
        server.stop()
    rounds = [s.rounds for s in sessions.values()]
    return {"clients": args.fault_sessions, "sessions": len(sessions),
            "kinds": {k: sum(s.kind == k for s in sessions.values()) for k in KINDS if k != "n2"},
            "n2_requests": load["n2_requests"], "killed_after_s": args.fault_after, "completed_rounds": sum(rounds),
            "rounds_per_session_min": min(rounds), "rounds_per_session_max": max(rounds),
            "unanswered_resent": resent,
            "stopped_by": sorted({s.stopped_by.split(":")[0] + (f" ({s.kind})" if "HTTP" in s.stopped_by else "")
                                  for s in sessions.values()}),
            "rounds_by_kind_min": {k: min((s.rounds for s in sessions.values() if s.kind == k), default=0)
                                   for k in KINDS if k != "n2"}, "replayed": sum(s.replayed for s in sessions.values()),
            "resumed": health["sessions"], "corrupt_rows": health["corrupt_sessions"], "sqlite_integrity": integrity,
            "failures": failures, "wall_s": round(time.perf_counter() - t0, 1),
            "passed": not failures and integrity == "ok" and health["corrupt_sessions"] == 0
            and health["sessions"] == len(sessions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="export directories (e.g. a cummax and a softmax one)")
    parser.add_argument("--concurrency", default="1,8,64", help="concurrent sessions per level")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per completion")
    parser.add_argument("--rounds", type=int, default=3, help="completions per session per level")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--kv-budget-mib", type=float, default=1024)
    parser.add_argument("--fault-sessions", type=int, default=32, help="clients of the fault test's mix")
    parser.add_argument("--fault-after", type=float, default=20.0, help="seconds of load before SIGKILL")
    parser.add_argument("--fault-only", action="store_true", help="only the kill -9 test")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    levels = [] if args.fault_only else [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 or c > 256 for c in levels) or not 1 <= args.tokens <= 1024 or not 1 <= args.rounds <= 100 \
            or not 1 <= args.fault_sessions <= 256 or not 0 < args.fault_after <= 600:
        sys.exit("error: concurrency and --fault-sessions must be 1..256, --tokens 1..1024, --rounds 1..100 and "
                 "--fault-after at most 600 s (a bounded load)")
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "tokens": args.tokens, "prompt": args.prompt, "rounds": args.rounds, "exports": []}
    for export in args.exports:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "sessions.sqlite"
            with start_server(export, store, args.max_batch, args.kv_budget_mib) as server:
                health = httpx.get(f"{server.url}/health").json()
                entry = {"export": str(export), "arch": health["arch"], "dtype": health["dtype"],
                         "memory_at_start_kib": memory_kib(server.pid), "levels": []}
                for c in levels:
                    result = asyncio.run(level(server.url, c, args.prompt, args.tokens, args.rounds,
                                               health["vocab_size"], c))
                    result.update({f"server_{k}_kib": v for k, v in memory_kib(server.pid).items()})
                    entry["levels"].append(result)
                    print(f"{health['arch']:8} x{c:<3} {result['tokens_per_s']:8.1f} tok/s  p50 {result['token_ms_p50']:7.2f} ms"
                          f"  p99 {result['token_ms_p99']:7.2f} ms  ttft p50 {result['ttft_ms_p50']:8.1f} ms"
                          f"  rss {result['server_VmRSS_kib'] / 1024:6.0f} MiB (peak {result['server_VmHWM_kib'] / 1024:.0f})",
                          flush=True)
                server.stop()
            entry["fault"] = fault_test(export, Path(tmp) / "fault.sqlite", args)
            print(f"{health['arch']:8} kill -9: {json.dumps(entry['fault'])}", flush=True)
            report["exports"].append(entry)
    if args.json:
        write_json_atomic(args.json, report)
    if not all(e["fault"]["passed"] for e in report["exports"]):
        sys.exit("error: a session did not resume exactly after kill -9")


if __name__ == "__main__":
    main()
