"""Load and fault test of `samout-edge serve`, on loopback only.

For each export (cummax and softmax side by side): start the server, then for
each concurrency level open that many sessions and run one streamed completion
per session at once (prompt --prompt tokens, --tokens new tokens, greedy),
measuring tokens/s over the level, latency per token (each request's time
from its first to its last streamed token over its decode steps; p50/p99 over
the requests), time to first token, and the server's resident memory (VmRSS
after the level, VmHWM peak). Each session runs --rounds completions in a row,
so softmax KV caches grow as in a conversation.

Then the fault test: --fault-sessions sessions run rounds of completions
back to back; after --fault-after seconds the server gets SIGKILL mid-load and
is restarted on the same store. Every session must resume from its last
completed request: its position is what the last response said (or one round
further, when the kill fell between the commit and the response), its
continuation equals ONNX Runtime's greedy tokens over the whole history as the
client saw it, and no stored row fails its checksum (and SQLite's
integrity_check passes).

    python benchmarks/serve_load.py out/seed-cummax out/seed-softmax --json benchmarks/results/cpu-serve.json
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


async def rounds_until_killed(url: str, server: ServerProcess, sessions: int, kill_after: float, vocab: int,
                              tokens: int) -> dict[str, dict]:
    """Each session runs rounds back to back; history holds what each client saw complete."""
    rng = np.random.default_rng(1)
    seen: dict[str, dict] = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=sessions + 4)) as client:
        for _ in range(sessions):
            sid = (await client.post(f"{url}/v1/sessions")).json()["id"]
            seen[sid] = {"history": [], "pending": [], "position": 0, "rounds": 0, "in_flight": None}

        async def run(sid: str) -> None:
            s = seen[sid]
            while True:
                prompt = rng.integers(0, vocab, 4).tolist()
                s["in_flight"] = prompt
                try:
                    new, _, final = await stream_completion(client, url, {"prompt": prompt, "max_tokens": tokens,
                                                                          "temperature": 0, "session": sid})
                except (httpx.TransportError, httpx.HTTPError, RuntimeError):
                    return
                if not final:
                    return
                s["history"] += s["pending"] + prompt + new[:-1]
                s["pending"] = new[-1:]
                s["position"], s["rounds"], s["in_flight"] = final["session"]["position"], s["rounds"] + 1, None

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            os.kill(server.pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(run(sid) for sid in seen))
    server.kill()  # reaps it
    return seen


def fault_test(export: Path, store: Path, args) -> dict:
    with start_server(export, store, args.max_batch, args.kv_budget_mib) as server:
        vocab = httpx.get(f"{server.url}/health").json()["vocab_size"]
        seen = asyncio.run(rounds_until_killed(server.url, server, args.fault_sessions, args.fault_after, vocab,
                                               args.fault_tokens))
    integrity = sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone()[0]
    failures, ahead = [], 0
    with start_server(export, store, args.max_batch, args.kv_budget_mib) as server:
        url = server.url
        health = httpx.get(f"{url}/health").json()
        with load_runner(export, "ort") as runner:
            for sid, s in seen.items():
                info = httpx.get(f"{url}/v1/sessions/{sid}").json()
                if info.get("position") != s["position"]:
                    # the kill fell between the commit and the response: one unseen round, whose tokens we lack
                    ahead += 1
                    if s["in_flight"] is None or info.get("position", -1) <= s["position"]:
                        failures.append(f"{sid}: position {info.get('position')} but the last response said {s['position']}")
                    continue
                probe = [7, 3]
                got = httpx.post(f"{url}/v1/completions", json={"prompt": probe, "max_tokens": 8, "temperature": 0,
                                                                "session": sid}, timeout=120).json()
                want = generate(runner, s["history"] + s["pending"] + probe, 8).new_ids
                if got["choices"][0]["token_ids"] != want:
                    failures.append(f"{sid}: continuation differs from greedy over the history")
        server.stop()
    rounds = [s["rounds"] for s in seen.values()]
    return {"sessions": len(seen), "killed_after_s": args.fault_after, "completed_rounds": sum(rounds),
            "rounds_per_session_min": min(rounds), "rounds_per_session_max": max(rounds),
            "resumed": health["sessions"], "corrupt_rows": health["corrupt_sessions"], "sqlite_integrity": integrity,
            "committed_but_unseen": ahead, "failures": failures, "passed": not failures and integrity == "ok"
            and health["corrupt_sessions"] == 0 and health["sessions"] == len(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="export directories (e.g. a cummax and a softmax one)")
    parser.add_argument("--concurrency", default="1,8,64", help="concurrent sessions per level")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per completion")
    parser.add_argument("--rounds", type=int, default=3, help="completions per session per level")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--kv-budget-mib", type=float, default=1024)
    parser.add_argument("--fault-sessions", type=int, default=16)
    parser.add_argument("--fault-after", type=float, default=4.0, help="seconds of load before SIGKILL")
    parser.add_argument("--fault-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 or c > 256 for c in levels) or not 1 <= args.tokens <= 1024 or not 1 <= args.rounds <= 100:
        sys.exit("error: concurrency must be 1..256, --tokens 1..1024 and --rounds 1..100 (a bounded load)")
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
