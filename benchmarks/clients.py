"""The clients themselves against `samout-edge serve` (issue 27): lm-eval, guidellm, LangChain, litellm.

Installs the clients, pinned (PINS below), into a venv of their own (--venv, default .venv-clients,
reused while its versions match), exports the trained SamOut at int4 (and the softmax baseline, for
guidellm) into --work, serves each with `samout-edge serve` on loopback with an API key, and runs:

- lm-eval ``local-completions`` on a multiple-choice task (token-id prompts, then text prompts 4 to a
  request) and a ``loglikelihood_rolling`` task, ``local-completions`` and ``local-chat-completions``
  on a generate_until task: custom tasks over JSONL made from the held-out text (``dataset_path:
  json``), the tokenizer the export directory itself (``tokenizer_backend=huggingface``); first
  lm-eval's own probe for a remote tokenizer (``GET /tokenizer_info``, ``POST /tokenize``).
- The check the issue demands: lm-eval's rolling log-likelihood of each document equals
  `samout-edge eval` of the same text on the same export, same tokens, to 1e-4 relative (eval
  scores every token after the first, so its text is the prefix token lm-eval conditions the first
  token on, then the document).
- guidellm: streamed completions, synchronous and concurrent profiles, --seconds each, SamOut vs
  softmax on synthetic prompts (its tokenizer: the export directory), straight to the server
  (request counts from the server's /metrics); and one short run each of completions and chat
  through the recording proxy, for their request shapes.
- LangChain (``OpenAI`` and ``ChatOpenAI``: invoke, stream with stream_usage, batch of 20 prompts)
  and litellm (``text_completion`` and ``completion``, plain and streamed).

Every client except guidellm's timed runs talks to the server through a small recording reverse
proxy (this script, ``_proxy``): each request's route and JSON body and the server's answer are
logged (``--work``/requests.jsonl), so a refused request is reported by its body. The distinct
request shapes, with trimmed prompts, go to ``client-requests.json`` for HTTP-level replay tests.
Nothing reaches the network at run time: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE,
litellm's local cost map, and a proxy that refuses every address but loopback.

Writes --results/clients.{md,json} and client-requests.json; exits 1 when any client request
failed or the rolling check did not hold (after writing them).

    make install && .venv/bin/python benchmarks/clients.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/clients.py --quick                    # 5 s guidellm runs, fewer documents
    .venv/bin/python benchmarks/clients.py --only lm-eval,langchain   # some clients only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import secrets
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ("lm-eval", "guidellm", "langchain", "litellm")
# the clients, pinned: results are per version, and these are the versions issue 27 measured against
PINS = {"lm-eval": "0.4.13", "guidellm": "0.8.1", "langchain-openai": "1.8.1", "litellm": "1.110.2"}
# guidellm needs torch: the CPU build the Makefile pins (PyPI's default build brings 4 GB of CUDA)
SUPPORT_PINS = {"torch": "2.13.0"}
# reported beside the pins: what the clients send requests with, and what they tokenize with
REPORTED = ("openai", "langchain-core", "transformers", "tokenizers", "datasets", "httpx", "aiohttp", "requests",
            "torch")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false",
    "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
    # anything but loopback goes to a port that refuses: a client that reaches for the network fails loudly
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "all_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}
NO_KEY = "no key"  # an operation sent without the API key on purpose: its 401 is the right answer, not an error
PREFIX_TOKEN = 10  # lm-eval's rolling windows condition the first token on this one ("\n" in a byte vocab)
DOC_BYTES = 900  # a rolling document: one window of lm-eval and of eval, one call of the export (max_seq 1024)
ROLLING_RTOL = 1e-4
HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # lm-eval's humaneval task's stop sequences
PROMPTS = ["def main(", "import os\n", "class Foo:\n    def __init__(self", "for i in range(", "# Copyright",
           "return ", "if __name__ == ", "while True:\n", "try:\n    import", "with open(",
           "def test_", "from typing import", "x = [", "print(", "raise ValueError(",
           "async def ", "lambda x: ", "assert ", "yield ", "self."]  # 20: LangChain's batch
TRIM_TEXT, TRIM_IDS, TRIM_LIST = 160, 32, 8


# -- shared helpers (both interpreters: this file runs in the project's venv and in the clients')


def log(message: str) -> None:
    print(f"[clients {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trim(value: Any, path: str = "", trimmed: list[str] | None = None) -> Any:
    """``value`` with long texts, id lists and lists of entries cut short (``trimmed`` collects
    where): still a valid request body, small enough to keep and replay."""
    if isinstance(value, str):
        if len(value) > TRIM_TEXT:
            if trimmed is not None:
                trimmed.append(path)
            return value[:TRIM_TEXT]
        return value
    if isinstance(value, dict):
        return {k: trim(v, f"{path}.{k}" if path else k, trimmed) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if len(value) > TRIM_IDS:
                if trimmed is not None:
                    trimmed.append(path)
                return value[:TRIM_IDS]
            return value
        return [trim(v, f"{path}[{i}]", trimmed) for i, v in enumerate(value)]
    return value


def trim_answer(value: Any) -> Any:
    """An answer kept as an example: texts cut, and long lists (logprobs, choices) to their first entries."""
    if isinstance(value, list) and len(value) > TRIM_LIST:
        return [trim_answer(v) for v in value[:TRIM_LIST]] + [f"... {len(value) - TRIM_LIST} more"]
    if isinstance(value, list):
        return [trim_answer(v) for v in value]
    if isinstance(value, dict):
        return {k: trim_answer(v) for k, v in value.items()}
    if isinstance(value, str) and len(value) > TRIM_TEXT:
        return value[:TRIM_TEXT] + f"... ({len(value)} characters)"
    return value


def set_phase(proxy: str | None, phase: str) -> None:
    """Tag the proxy's next records with ``phase`` (client:operation)."""
    if proxy:
        import urllib.request

        req = urllib.request.Request(f"{proxy}/__phase", data=json.dumps({"phase": phase}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).close()


def run_op(ops: dict, proxy: str, client: str, name: str, fn) -> None:
    """One client call, recorded under its phase: its output or its error, and its time."""
    set_phase(proxy, f"{client}:{name}")
    started = time.perf_counter()
    try:
        ops[name] = {"ok": True, "output": fn()}
    except BaseException as e:  # noqa: BLE001
        ops[name] = {"ok": False, "error": error_text(e)}
    ops[name]["seconds"] = round(time.perf_counter() - started, 3)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# -- the recording reverse proxy (the project's venv: starlette, httpx, uvicorn)


def sse_summary(raw: bytes) -> dict:
    events = [e for e in raw.decode("utf-8", "replace").split("\n\n") if e.strip()]
    parsed = []
    for e in events:
        data = "\n".join(line[5:].strip() for line in e.splitlines() if line.startswith("data:"))
        try:
            parsed.append(json.loads(data))
        except ValueError:
            parsed.append(data)
    errors = [p for p in parsed if isinstance(p, dict) and "error" in p]
    return {"events": len(parsed), "first": parsed[:3], "last": parsed[-2:] if len(parsed) > 3 else [],
            "errors": errors[:3]}


def parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"_raw": raw.decode("utf-8", "replace")[:4000]}


def run_proxy(upstream: str, log_path: Path) -> None:
    import socket

    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    hop = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}
    kept_headers = ("content-type", "user-agent", "accept")
    state: dict[str, Any] = {"phase": None}
    sink = open(log_path, "a", buffering=1)
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None), trust_env=False)

    def write(record: dict) -> None:
        sink.write(json.dumps(record) + "\n")

    async def handle(request: Request) -> Response:
        if request.url.path == "/__phase":
            state["phase"] = (await request.json())["phase"]
            return JSONResponse({"phase": state["phase"]})
        body = await request.body()
        started = time.time()
        record = {"t": started, "phase": state["phase"], "method": request.method, "path": request.url.path,
                  "query": request.url.query, "headers": {k: request.headers[k] for k in kept_headers
                                                          if k in request.headers},
                  "body": parse_body(body)}
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        try:
            upstream_response = await client.send(client.build_request(request.method, url, headers=headers,
                                                                       content=body), stream=True)
        except httpx.HTTPError as e:
            record.update(status=502, response={"proxy_error": error_text(e)}, seconds=time.time() - started)
            write(record)
            return JSONResponse({"error": {"message": f"proxy: {error_text(e)}", "type": "proxy"}}, 502)
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in hop}
        record["status"] = upstream_response.status_code
        if "text/event-stream" in upstream_response.headers.get("content-type", ""):
            async def relay():
                chunks: list[bytes] = []
                try:
                    async for chunk in upstream_response.aiter_raw():
                        chunks.append(chunk)
                        yield chunk
                finally:
                    await upstream_response.aclose()
                    record.update(response=sse_summary(b"".join(chunks)), stream=True, seconds=time.time() - started)
                    write(record)
            return StreamingResponse(relay(), status_code=upstream_response.status_code, headers=out_headers)
        data = await upstream_response.aread()
        await upstream_response.aclose()
        record.update(response=parse_body(data), seconds=time.time() - started)
        write(record)
        return Response(data, status_code=upstream_response.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", handle, methods=methods)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    print(f"proxy on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


class Proxy:
    """The recording proxy as a child process, in front of ``upstream``."""

    def __init__(self, upstream: str, log_path: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "_proxy", upstream, str(log_path)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("proxy on "):
            self.proc.kill()
            raise RuntimeError(f"the recording proxy did not start: {line!r}")
        self.url = line.split(" on ", 1)[1]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- drivers: run in the clients' venv, one per client, each writing its results as JSON


def driver_lm_eval(spec: dict) -> dict:
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import check_remote_tokenizer_support

    logging.basicConfig(level=logging.WARNING)
    out: dict[str, Any] = {"runs": {}}
    proxy = spec["proxy"]
    out["remote_tokenizer"] = {}
    # what local-completions does with tokenizer_backend=auto (its default) before it picks a tokenizer: as
    # configured by default (no auth_token: the probe carries no key, and a keyed server's 401 is the answer
    # it should get; lm-eval then uses tokenizer=), and with auth_token=KEY
    for label, auth in ((NO_KEY, None), ("auth_token", spec["api_key"])):
        set_phase(proxy, f"lm-eval:remote-tokenizer-probe ({label})")
        try:
            out["remote_tokenizer"][label] = bool(check_remote_tokenizer_support(f"{proxy}/v1/completions",
                                                                                 auth_token=auth))
        except Exception as e:  # noqa: BLE001 - a client's failure is a result
            out["remote_tokenizer"][label] = error_text(e)
    manager = TaskManager(include_path=spec["tasks_dir"], include_defaults=False)
    for run in spec["runs"]:
        set_phase(proxy, f"lm-eval:{run['name']}")
        started = time.perf_counter()
        entry: dict[str, Any] = {"model": run["model"], "tasks": run["tasks"], "model_args": run["model_args"],
                                 "apply_chat_template": run.get("apply_chat_template", False)}
        try:
            result = lm_eval.simple_evaluate(
                model=run["model"], model_args=run["model_args"], tasks=run["tasks"], task_manager=manager,
                log_samples=True, apply_chat_template=run.get("apply_chat_template", False), bootstrap_iters=0,
                limit=spec.get("limit"))
            entry["ok"] = True
            entry["results"] = {t: {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "alias"}
                                for t, r in result["results"].items()}
            entry["n_samples"] = {t: len(s) for t, s in result.get("samples", {}).items()}
            if "samout_rolling" in result.get("samples", {}):
                entry["rolling"] = [{"doc_id": s["doc_id"], "text": s["doc"]["text"],
                                     "loglikelihood": float(s["filtered_resps"][0])}
                                    for s in result["samples"]["samout_rolling"]]
            if "samout_gen" in result.get("samples", {}):
                entry["generations"] = [{"target": s["target"], "response": s["resps"][0][0][:200]}
                                        for s in result["samples"]["samout_gen"][:3]]
        except BaseException as e:  # noqa: BLE001 - a failed run is a result; the proxy has the bodies
            entry["ok"] = False
            entry["error"] = error_text(e)
            entry["traceback"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.perf_counter() - started, 2)
        out["runs"][run["name"]] = entry
    if spec.get("tokenizer"):  # the ids lm-eval scores each rolling document as, for the check against eval
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        for entry in out["runs"].values():
            for doc in entry.get("rolling", []):
                doc["ids"] = tok(doc["text"], add_special_tokens=False).input_ids
    return out


def driver_langchain(spec: dict) -> dict:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI, OpenAI

    proxy, ops = spec["proxy"], {}
    common = dict(model=spec["model"], base_url=f"{proxy}/v1", api_key=spec["api_key"], max_tokens=16,
                  temperature=0, max_retries=0, timeout=120)

    def op(name: str, fn) -> None:
        run_op(ops, proxy, "langchain", name, fn)

    llm = OpenAI(**common)
    op("OpenAI.invoke", lambda: llm.invoke(PROMPTS[0]))
    op("OpenAI.stream", lambda: {"chunks": (chunks := list(llm.stream(PROMPTS[1]))) and len(chunks),
                                 "text": "".join(chunks)})
    op("OpenAI.batch", lambda: {"outputs": len(out := llm.batch(PROMPTS)), "first": out[0]})
    chat = ChatOpenAI(stream_usage=True, **common)

    def chat_stream() -> dict:
        chunks = list(chat.stream([HumanMessage(PROMPTS[1])]))
        usage = next((c.usage_metadata for c in reversed(chunks) if c.usage_metadata), None)
        return {"chunks": len(chunks), "text": "".join(str(c.content) for c in chunks), "usage": usage}

    op("ChatOpenAI.invoke", lambda: chat.invoke([HumanMessage(PROMPTS[0])]).content)
    # LangChain's standard content blocks, as a multimodal-ready application writes a text message
    op("ChatOpenAI.invoke (content blocks)",
       lambda: chat.invoke([HumanMessage(content=[{"type": "text", "text": PROMPTS[0]}])]).content)
    op("ChatOpenAI.stream", chat_stream)
    op("ChatOpenAI.batch", lambda: {"outputs": len(out := chat.batch([[HumanMessage(p)] for p in PROMPTS])),
                                    "first": out[0].content})
    return {"ops": ops}


def driver_litellm(spec: dict) -> dict:
    import litellm

    litellm.telemetry = False
    proxy, ops = spec["proxy"], {}
    common = dict(api_base=f"{proxy}/v1", api_key=spec["api_key"], max_tokens=16, temperature=0, num_retries=0,
                  timeout=120)
    text_model, chat_model = f"text-completion-openai/{spec['model']}", f"openai/{spec['model']}"
    messages = [{"role": "user", "content": PROMPTS[0]}]

    def op(name: str, fn) -> None:
        run_op(ops, proxy, "litellm", name, fn)

    def streamed(response) -> dict:
        parts = []
        for chunk in response:
            choice = chunk.choices[0] if chunk.choices else None
            piece = getattr(choice, "text", None) if choice is not None else None
            if piece is None and choice is not None and getattr(choice, "delta", None) is not None:
                piece = choice.delta.content
            parts.append(piece or "")
        return {"chunks": len(parts), "text": "".join(parts)}

    op("text_completion", lambda: litellm.text_completion(model=text_model, prompt=PROMPTS[0], **common)
       .choices[0].text)
    op("text_completion.stream", lambda: streamed(litellm.text_completion(model=text_model, prompt=PROMPTS[1],
                                                                           stream=True, **common)))
    op("completion", lambda: litellm.completion(model=chat_model, messages=messages, **common)
       .choices[0].message.content)
    op("completion.stream", lambda: streamed(litellm.completion(model=chat_model, messages=messages, stream=True,
                                                                 **common)))
    return {"ops": ops}


DRIVERS = {"lm-eval": driver_lm_eval, "langchain": driver_langchain, "litellm": driver_litellm}


def run_driver(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    try:
        out = DRIVERS[name](spec)
    except BaseException as e:  # noqa: BLE001 - reported, not raised: the orchestrator reads this file
        out = {"fatal": error_text(e), "traceback": traceback.format_exc()[-3000:]}
    write_atomic(out_path, json.dumps(out, indent=1, default=str))


# -- the orchestrator (the project's venv)


def clients_env(work: Path, api_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OFFLINE_ENV)
    env.update(HF_HOME=str(work / "hf-home"), HF_DATASETS_CACHE=str(work / "hf-home" / "datasets"),
               OPENAI_API_KEY=api_key, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def venv_versions(python: Path) -> dict[str, str | None]:
    names = list(PINS) + list(SUPPORT_PINS) + [n for n in REPORTED if n not in SUPPORT_PINS]
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try:\n        out[n] = m.version(n)\n    except m.PackageNotFoundError:\n        out[n] = None\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def pins_match(versions: dict[str, str | None]) -> bool:
    return all(versions.get(n) == v for n, v in PINS.items()) and \
        all((versions.get(n) or "").split("+")[0] == v for n, v in SUPPORT_PINS.items())


def ensure_venv(venv: Path) -> tuple[Path, dict[str, str | None]]:
    """The clients' venv, created or brought to the pins where it is not at them."""
    python = venv / "bin" / "python"
    if python.exists():
        versions = venv_versions(python)
        if pins_match(versions):
            log(f"clients' venv {venv}: at the pins, reused")
            return python, versions
        log(f"clients' venv {venv}: not at the pins ({', '.join(f'{n} {versions.get(n)}' for n in PINS)}), "
            "installing")
    else:
        log(f"creating the clients' venv {venv} (about 2 minutes, 2 GB)")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([*pip, "--upgrade", "pip"], check=True, env=env)
    specs = [f"{n}=={v}" for n, v in {**SUPPORT_PINS, **PINS}.items()]
    r = subprocess.run([*pip, *specs], env=env)
    if r.returncode:
        sys.exit(f"error: pip could not install {' '.join(specs)} into {venv} (exit {r.returncode})")
    versions = venv_versions(python)
    if not pins_match(versions):
        sys.exit(f"error: {venv} is not at the pins after installing: {versions}")
    return python, versions


def git_commit() -> str | None:
    """This checkout's commit (``-dirty`` with uncommitted changes to the package): what served."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def source_digest() -> str:
    """Of the exporter's code: exports made by other code are made again (a new export may carry more files)."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "src" / "samout_edge").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def samout(*args: str, quiet: bool = True) -> None:
    r = subprocess.run([sys.executable, "-m", "samout_edge", *args], capture_output=quiet, text=True)
    if r.returncode:
        tail = (r.stderr or r.stdout or "")[-3000:] if quiet else ""
        sys.exit(f"error: samout-edge {' '.join(args[:2])} failed (exit {r.returncode})\n{tail}")


def prepare(work: Path, trained: Path) -> dict[str, Path]:
    """Held-out text, calibration text and the two int4 exports in ``work``, made where missing or stale."""
    work.mkdir(parents=True, exist_ok=True)
    heldout, calibration = work / "heldout.txt", work / "calibration.txt"
    for path, flag, size in ((heldout, "--write-heldout", 65536), (calibration, "--write-training-sample", 32768)):
        if not path.exists():
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_set.py"), flag, str(path),
                                "--max-bytes", str(size)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"error: train_set.py {flag} failed:\n{r.stderr[-2000:]}")
    stamp_path, digest = work / "exports.json", source_digest()
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    exports = {}
    for arch in ("cummax", "softmax"):
        target = work / f"{arch}-int4"
        exports[arch] = target
        if stamp.get(arch) == digest and (target / "export.json").exists():
            continue
        log(f"exporting {trained / arch} ({arch}, int4, --vocab bytes, max_seq 1024; about 40 s)")
        samout("export", str(trained / arch), "--arch", arch, "--logits", "all", "--max-seq", "1024", "--vocab",
               "bytes", "--weights", "int4", "--calibration-text", str(calibration), "-o", str(target), "--force")
        stamp[arch] = digest
        write_atomic(stamp_path, json.dumps(stamp, indent=1))
    return {"heldout": heldout, **exports}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_dir(export: Path, work: Path) -> tuple[Path, str]:
    """(the tokenizer the clients load, what it is). The export directory itself when it carries
    tokenizer.json; else a byte-level stand-in (id b = byte b, as --vocab bytes) written here, so the
    clients can be run against today's exports."""
    if (export / "tokenizer.json").exists():
        return export, "the export directory"
    stand_in = work / "tokenizer-stand-in"
    stand_in.mkdir(parents=True, exist_ok=True)
    alphabet = bytes_to_unicode()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {alphabet[b]: b for b in range(256)}, "merges": []}}
    write_atomic(stand_in / "tokenizer.json", json.dumps(tok, ensure_ascii=False))
    write_atomic(stand_in / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024, "clean_up_tokenization_spaces": False}))
    return stand_in, f"a byte-level stand-in ({export.name} has no tokenizer.json)"


def make_tasks(text: str, out: Path, n_rolling: int, n_mc: int, n_gen: int, seed: int = 27) -> dict:
    """lm-eval tasks over JSONL made from the held-out text: rolling documents, multiple choice
    (the rest of a line, against three other lines' rests), generate_until (the next line)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = text.split("\n")
    docs, current = [], ""
    for line in lines:
        if len((current + line + "\n").encode()) > DOC_BYTES:
            if len(current.strip().encode()) >= 300:
                docs.append(current.strip())
            current = ""
        current += line + "\n"
        if len(docs) == n_rolling:
            break
    code = [i for i, line in enumerate(lines)
            if 24 <= len(line.strip()) <= 90 and line.isascii() and not line.strip().startswith(("#", '"', "'"))
            and i > 8]
    rng.shuffle(code)

    def before(i: int, limit: int) -> str:
        context = ""
        for line in reversed(lines[max(0, i - 40):i]):
            if len(context) + len(line) + 1 > limit:
                break
            context = line + "\n" + context
        return context

    mc, gen = [], []
    for i in code[:n_mc]:
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        cut = indent + max(4, (len(line) - indent) // 2)
        others = rng.sample([j for j in code if j != i], 3)
        rests = [lines[j][len(lines[j]) - len(lines[j].lstrip()) + max(4, len(lines[j].strip()) // 2):]
                 for j in others]
        label = rng.randrange(4)
        choices = rests[:label] + [line[cut:]] + rests[label:]
        mc.append({"context": before(i, 300) + line[:cut], "choices": choices, "label": label})
    for i in code[n_mc:n_mc + n_gen]:
        gen.append({"context": before(i, 400), "target": lines[i].strip()})
    files = {"rolling": [{"text": d} for d in docs], "mc": mc, "gen": gen}
    for name, rows in files.items():
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def task(name: str, rows: str, **fields) -> None:
        config = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str((out / f"{rows}.jsonl").resolve())}},
                  "test_split": "test", **fields, "metadata": {"version": 1.0}}
        write_atomic(out / f"{name}.yaml", json.dumps(config, indent=1))  # JSON is YAML

    task("samout_rolling", "rolling", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
         metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    task("samout_mc", "mc", output_type="multiple_choice", doc_to_text="context", doc_to_choice="choices",
         doc_to_target="label", target_delimiter="",
         metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                      {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    task("samout_gen", "gen", output_type="generate_until", doc_to_text="context", doc_to_target="target",
         generation_kwargs={"until": HUMANEVAL_UNTIL, "max_gen_toks": 48, "do_sample": False},
         filter_list=[{"name": "first_line", "filter": [{"function": "regex", "regex_pattern": "^[^\\n]*"},
                                                          {"function": "take_first"}]}],
         metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    return {name: len(rows) for name, rows in files.items()}


def run_in_venv(python: Path, args: list[str], env: dict, log_path: Path, timeout: float) -> int:
    """A client's process, its output to ``log_path``; its exit status (124 past ``timeout``)."""
    with open(log_path, "w") as sink:
        proc = subprocess.Popen([str(python), *args], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=log_path.parent)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124


def driver(python: Path, name: str, spec: dict, work: Path, env: dict, timeout: float = 1800) -> dict:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    out_path.unlink(missing_ok=True)
    write_atomic(spec_path, json.dumps(spec, indent=1))
    started = time.perf_counter()
    code = run_in_venv(python, [__file__, "_driver", name, str(spec_path), str(out_path)], env,
                       work / f"{name}.log", timeout)
    if not out_path.exists():
        tail = (work / f"{name}.log").read_text()[-2000:]
        return {"fatal": f"the {name} driver exited {code} without results", "log_tail": tail}
    out = json.loads(out_path.read_text())
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def metrics_counts(url: str, key: str) -> dict[tuple[str, str], float]:
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    counts = {}
    for m in re.finditer(r'^samout_requests_total\{route="([^"]*)",status="(\d+)"\} ([0-9.e+]+)$', text, re.M):
        counts[(m.group(1), m.group(2))] = float(m.group(3))
    return counts


def counts_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (route, status), value in after.items():
        n = int(value - before.get((route, status), 0))
        if n and route not in ("/metrics", "/health"):
            out.setdefault(route, {})[status] = n
    return out


def guidellm_run(python: Path, env: dict, work: Path, name: str, target: str, model: str, key: str, tokenizer: Path,
                 request_format: str, profile: dict, seconds: float, max_requests: int | None,
                 prompt_tokens: int, output_tokens: int) -> dict:
    """One guidellm benchmark; its report's medians (or its failure)."""
    out_json = work / f"guidellm-{name}.json"
    out_json.unlink(missing_ok=True)
    constraints = [{"kind": "max_duration", "seconds": seconds}, {"kind": "max_errors", "count": 5}]
    if max_requests:
        constraints.append({"kind": "max_requests", "count": max_requests})
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": target, "model": model, "api_key": key,
                    "request_format": request_format, "stream": True, "timeout": 120},
        "profile": profile, "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}],
        "constraints": constraints, "seed": {"kind": "static", "value": 27},
        "outputs": [{"kind": "json", "path": str(out_json)}]}}
    scenario_path = work / f"guidellm-{name}.scenario.json"
    write_atomic(scenario_path, json.dumps(scenario, indent=1))
    guidellm = python.parent / "guidellm"
    started = time.perf_counter()
    code = run_in_venv(python, [str(guidellm), "run", "--config", str(scenario_path), "--disable-console-interactive"],
                       env, work / f"guidellm-{name}.log", seconds * 4 + 180)
    result: dict[str, Any] = {"exit": code, "seconds": round(time.perf_counter() - started, 1),
                              "profile": profile, "request_format": request_format}
    if out_json.exists():
        result.update(guidellm_summary(json.loads(out_json.read_text())))
    if code or not out_json.exists():
        result["log_tail"] = (work / f"guidellm-{name}.log").read_text()[-2500:]
    return result


def _stat(stats: Any, key: str) -> float | None:
    """A guidellm distribution's ``key`` (median, mean) over its successful requests."""
    if isinstance(stats, dict) and isinstance(stats.get("successful"), dict):
        value = stats["successful"].get(key)
        if isinstance(value, (int, float)) and stats["successful"].get("count"):
            return float(value)
    return None


def guidellm_summary(report: dict) -> dict:
    """Per benchmark in a guidellm JSON report: requests by status, medians of TTFT, ITL and request
    latency, and output tokens and requests per second over the run (guidellm's server throughput)."""
    rows = []
    for b in report.get("benchmarks", []):
        metrics = b.get("metrics", {})
        row = {"requests": metrics.get("request_totals") or {}, "duration_s": b.get("duration"),
               "ttft_ms": _stat(metrics.get("time_to_first_token_ms"), "median"),
               "itl_ms": _stat(metrics.get("inter_token_latency_ms"), "median"),
               "request_latency_s": _stat(metrics.get("request_latency"), "median"),
               "output_tokens_per_s": _stat(metrics.get("output_tokens_per_second"), "mean"),
               "output_tokens_per_s_median": _stat(metrics.get("output_tokens_per_second"), "median"),
               "requests_per_s": _stat(metrics.get("requests_per_second"), "mean"),
               "concurrency": _stat(metrics.get("request_concurrency"), "mean")}
        errored = (b.get("requests") or {}).get("errored") or []
        row["errors_sample"] = [trim_answer((e.get("info") or {}).get("error") or e.get("error")) for e in errored[:2]]
        rows.append(row)
    return {"benchmarks": rows}


# -- what the proxy saw


def skeleton(value: Any) -> Any:
    """A body's shape: keys and types, the element shapes of lists."""
    if isinstance(value, dict):
        return {k: skeleton(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        shapes = sorted({json.dumps(skeleton(v), sort_keys=True) for v in value})
        return [json.loads(s) for s in shapes]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "null"


def field_values(body: Any, prefix: str = "") -> dict[str, str]:
    """Scalar fields (and short lists of them) by dotted name, the prompt and messages left out."""
    out = {}
    if not isinstance(body, dict):
        return out
    for k, v in body.items():
        name = f"{prefix}{k}"
        if k in ("prompt", "messages", "input"):
            if isinstance(v, list):
                out[f"{name} (items)"] = str(len(v))
            continue
        if isinstance(v, dict):
            out.update(field_values(v, name + "."))
        else:
            out[name] = json.dumps(v)[:100]
    return out


def error_message(response: Any) -> str | None:
    if isinstance(response, dict):
        if isinstance(response.get("error"), dict):
            e = response["error"]
            return f"{e.get('code') or e.get('type')}: {e.get('message')}"
        if response.get("errors"):
            return json.dumps(response["errors"][0])[:500]
        if "proxy_error" in response:
            return response["proxy_error"]
    return None


def inventory(records: list[dict]) -> dict:
    """Per client: requests, errors, and each distinct request shape with an example body."""
    clients: dict[str, dict] = {}
    for r in records:
        phase = r.get("phase") or "unknown:unknown"
        client, _, op = phase.partition(":")
        c = clients.setdefault(client, {"requests": 0, "errors": 0, "by_operation": {}, "shapes": {}})
        c["requests"] += 1
        status = int(r.get("status", 0))
        message = error_message(r.get("response")) if status >= 400 or r.get("stream") else None
        expected = status == 401 and op.endswith(f"({NO_KEY})")
        failed = (status >= 400 or bool(message)) and not expected
        c["errors"] += failed
        o = c["by_operation"].setdefault(op, {"requests": 0, "errors": 0, "statuses": {}})
        o["requests"] += 1
        o["errors"] += failed
        o["statuses"][str(status)] = o["statuses"].get(str(status), 0) + 1
        body = r.get("body")
        key = f"{r['method']} {r['path']} {json.dumps(skeleton(body), sort_keys=True)}"
        s = c["shapes"].get(key)
        if s is None:
            trimmed: list[str] = []
            s = c["shapes"][key] = {"method": r["method"], "route": r["path"], "operations": [],
                                    "body": trim(body, "", trimmed), "trimmed": trimmed,
                                    "headers": r.get("headers", {}), "count": 0, "statuses": {}, "values": {},
                                    "answers": []}
        s["count"] += 1
        if failed and "_failed_body" not in s and status != 404:
            s["_failed_body"] = body
        s["statuses"][str(status)] = s["statuses"].get(str(status), 0) + 1
        if op not in s["operations"]:
            s["operations"].append(op)
        for name, v in field_values(body).items():
            seen = s["values"].setdefault(name, [])
            if v not in seen and len(seen) < 6:
                seen.append(v)
        answer = {"status": status, "error": message, **({"expected": True} if expected else {})}
        if len(s["answers"]) < 3 and not any(a["status"] == status and a["error"] == message and a.get("expected") == answer.get("expected")
                    for a in s["answers"]):
            s["answers"].append({**answer, "response": trim_answer(r.get("response"))})
    for c in clients.values():
        c["shapes"] = list(c["shapes"].values())
    return clients


def refusal(message: str, body: dict) -> tuple[str, dict] | None:
    """(what the server refused, the body without it) from a 400's message, or None when the
    message names nothing this can take out: the next refusal shows once this one is gone."""
    body = json.loads(json.dumps(body))
    text = message.split(": ", 1)[1] if message.startswith(("invalid_request: ", "unsupported_parameter: ")) else message
    if text.startswith("echo with logprobs"):
        body.pop("echo", None)
        return "echo with logprobs", body
    text = text.removeprefix("unsupported parameter: ")
    m = re.match(r"[A-Za-z_][\w.]*", text)
    if not m:
        return None
    parts = [p for p in m.group(0).split(".") if p]
    if parts[0] in ("stop", "prompt") and isinstance(body.get(parts[0]), list) and len(body[parts[0]]) > 1:
        # a list past a limit: as many as the message says are allowed (else half), to find what else is refused
        items = body[parts[0]]
        limit = re.search(r"at most ([\d,]+)", text)
        keep = min(int(limit.group(1).replace(",", "")), len(items) - 1) if limit else len(items) // 2
        body[parts[0]] = items[:max(1, keep)]
        return f"{parts[0]}: a list of {len(items)}", body
    if parts[0] == "messages" and any(isinstance(m.get("content"), list) for m in body.get("messages", [])):
        kinds = sorted({p.get("type", "?") for m in body["messages"] if isinstance(m.get("content"), list)
                        for p in m["content"] if isinstance(p, dict)})
        for m in body["messages"]:
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        return f"messages[].content as a list of parts ({', '.join(kinds)})", body
    node, path = body, []
    for part in parts:  # the longest prefix of the named path the body has
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        else:
            break
    if not path or path[0] in ("prompt", "messages", "model"):
        return None
    parent = body
    for part in path[:-1]:
        parent = parent[part]
    value = parent.pop(path[-1])
    return f"{'.'.join(path)}: {json.dumps(value)[:60]}", body


def probe_refusals(url: str, key: str, method: str, route: str, body: Any, limit: int = 8) -> dict:
    """Send a refused body again, taking out what each 400 names, until the server takes it:
    every field of the shape the server refuses, not only the first it names."""
    import httpx

    found, status, message = [], None, None
    with httpx.Client(timeout=120, trust_env=False) as client:
        for _ in range(limit):
            r = client.request(method, f"{url}{route}", json=body, headers={"Authorization": f"Bearer {key}"})
            status = r.status_code
            message = error_message(parse_body(r.content)) if status >= 400 else None
            if status < 400 or not isinstance(body, dict) or message is None:
                break
            step = refusal(message, body)
            if step is None:
                break
            found.append({"refused": step[0], "message": message})
            body = step[1]
    return {"refused": found, "then": status, "then_error": message}


def dumps_compact(data: Any) -> str:
    """JSON indented, but each list of plain values (token ids, stop strings) on one line."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",\n")) + "]", text) + "\n"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the rolling check


def rolling_check(lm_out: dict, export: Path, work: Path) -> dict:
    """Each rolling document: lm-eval's log-likelihood (natural log, every token given the prefix
    token and those before it) against `samout-edge eval` of prefix + document on the same export
    (every token after the first: the same tokens, the same contexts), to ROLLING_RTOL relative."""
    from samout_edge.artifact.vocab import export_vocab, read_tokens
    from samout_edge.evaluate import eval_target

    run = (lm_out.get("runs") or {}).get("rolling") or {}
    docs = run.get("rolling") or []
    if not docs:
        return {"passed": False, "reason": f"lm-eval's rolling run gave no scores: {run.get('error', 'not run')}"}
    vocab = export_vocab(export)
    rows, passed = [], True
    for doc in docs:
        path = work / "rolling" / f"doc{doc['doc_id']}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([PREFIX_TOKEN]) + doc["text"].encode())  # the export's vocab is bytes
        tokens, _ = read_tokens(path, 256, vocab)
        same_tokens = [int(t) for t in tokens] == [PREFIX_TOKEN] + list(doc.get("ids", []))
        result = eval_target(export, path, window=1024, with_reference=False)
        nll = result.bits_per_byte * math.log(2) * result.bytes
        rel = abs(-doc["loglikelihood"] - nll) / nll
        ok = same_tokens and rel <= ROLLING_RTOL
        passed &= ok
        rows.append({"doc_id": doc["doc_id"], "bytes": len(doc["text"].encode()), "tokens": result.tokens,
                     "lm_eval_loglikelihood": doc["loglikelihood"], "eval_nll": nll,
                     "eval_bits_per_byte": result.bits_per_byte, "relative_difference": rel,
                     "same_tokens": same_tokens, "passed": ok})
    total_lm = -sum(r["lm_eval_loglikelihood"] for r in rows)
    total_eval = sum(r["eval_nll"] for r in rows)
    return {"passed": passed, "rtol": ROLLING_RTOL, "prefix_token": PREFIX_TOKEN, "documents": rows,
            "total_nll_lm_eval": total_lm, "total_nll_eval": total_eval,
            "relative_difference": abs(total_lm - total_eval) / total_eval}


# -- the report


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(data: dict) -> str:
    m, lines = data["machine"], []
    lines += ["# The clients themselves against `samout-edge serve`", "",
              f"`benchmarks/clients.py`{' --quick' if data['quick'] else ''}, {data['date']}, samout-edge at "
              f"{data.get('commit') or 'an unknown commit'}, on {m['cores']} cores "
              f"of {m['cpu']} (shared; Python {m['python']}, ONNX Runtime {m['onnxruntime']}), exports "
              f"{', '.join(data['exports'])} (int4 weights, --vocab bytes, max_seq 1024), tokenizer: "
              f"{data['tokenizer']}, offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE; every "
              "address but loopback refused). Requests counted by the recording proxy (guidellm's timed runs: by "
              "the server's /metrics).", "",
              "| client | version | requests | errors | status |", "|---|---|---|---|---|"]
    versions = data["versions"]
    names = {"lm-eval": "lm-eval", "guidellm": "guidellm", "langchain": "langchain-openai", "litellm": "litellm"}
    for client, c in data["clients"].items():
        status = "ok" if not c["errors"] and not c.get("failures") else "FAILED"
        lines.append(f"| {client} | {versions.get(names.get(client, client))} | {c['requests']} | {c['errors']} | "
                     f"{status} |")
    other = ", ".join(f"{n} {versions.get(n)}" for n in REPORTED if versions.get(n))
    lines += ["", f"Beside them in the clients' venv: {other}.", ""]
    lm = data.get("lm_eval")
    if lm:
        probe = ", ".join(f"{k}: {v}" for k, v in (lm.get("remote_tokenizer") or {}).items())
        lines += ["## lm-eval", "", f"Remote tokenizer supported, as `tokenizer_backend=auto` probes it: {probe}.",
                  "", "| run | model | tasks | result | seconds |", "|---|---|---|---|---|"]
        for name, run in lm.get("runs", {}).items():
            if run.get("ok"):
                result = "; ".join(f"{t}: " + ", ".join(f"{k.split(',')[0]} {fmt(v)}" for k, v in r.items())
                                   for t, r in run["results"].items())
            else:
                result = "failed: " + run.get("error", "")[:300].replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {name} | {run['model']} | {', '.join(run['tasks'])} | {result} | {run['seconds']} |")
        lines.append("")
    rc = data.get("rolling_check")
    if rc:
        lines += ["## lm-eval's loglikelihood_rolling against `samout-edge eval`", ""]
        if rc.get("documents"):
            lines += [f"Same export, same tokens (prefix token {rc['prefix_token']} then the document), "
                      f"tolerance {rc['rtol']:g} relative: **{'passed' if rc['passed'] else 'FAILED'}**.", "",
                      "| document | bytes | lm-eval log-likelihood | eval NLL (nats) | eval bits/byte | relative "
                      "difference | same tokens |", "|---|---|---|---|---|---|---|"]
            for r in rc["documents"]:
                lines.append(f"| {r['doc_id']} | {r['bytes']} | {r['lm_eval_loglikelihood']:.6f} | "
                             f"{r['eval_nll']:.6f} | {r['eval_bits_per_byte']:.5f} | {r['relative_difference']:.2e} "
                             f"| {r['same_tokens']} |")
            lines.append(f"| all | | {-rc['total_nll_lm_eval']:.6f} | {rc['total_nll_eval']:.6f} | | "
                         f"{rc['relative_difference']:.2e} | |")
        else:
            lines.append(f"**Not checked**: {rc.get('reason')}")
        lines.append("")
    gl = data.get("guidellm")
    if gl:
        lines += ["## guidellm", "", f"Streamed completions (`/v1/completions`), synthetic prompts of "
                  f"{gl['prompt_tokens']} tokens and {gl['output_tokens']} output tokens, {gl['seconds']:g} s per "
                  "profile, straight to the server; TTFT, ITL and request latency are medians over the successful "
                  "requests, tokens and requests per second guidellm's rate over the run (the median of its per-second "
                  "series in brackets):", "",
                  "| export | profile | requests ok / errored / incomplete | TTFT ms | ITL ms | request s | output "
                  "tok/s | req/s | the server's answers |", "|---|---|---|---|---|---|---|---|---|"]
        for run in gl["runs"].values():
            for b in run.get("benchmarks") or [{}]:
                req = b.get("requests") or {}
                counts = " / ".join(str(req.get(k, "-")) for k in ("successful", "errored", "incomplete"))
                server = "; ".join(f"{route}: " + ", ".join(f"{st} x{n}" for st, n in sorted(sts.items()))
                                   for route, sts in run.get("server", {}).items())
                lines.append(f"| {run['export']} | {run['label']} | {counts} | {fmt(b.get('ttft_ms'), 3)} | "
                             f"{fmt(b.get('itl_ms'), 3)} | {fmt(b.get('request_latency_s'), 3)} | "
                             f"{fmt(b.get('output_tokens_per_s'), 4)} ({fmt(b.get('output_tokens_per_s_median'), 4)}) | "
                             f"{fmt(b.get('requests_per_s'), 3)} | "
                             f"{server} |")
        lines.append("")
    lines += ["## What each client sent, and what the server answered", "",
              "Every distinct request shape (route and body keys), from the recording proxy; bodies with trimmed "
              "prompts in `client-requests.json`.", ""]
    for client, c in data["clients"].items():
        for s in c.get("shapes", []):
            fields = ", ".join(f"`{k}`={'/'.join(v)}" for k, v in s["values"].items())
            statuses = ", ".join(f"{k} x{v}" for k, v in sorted(s["statuses"].items()))
            lines.append(f"- **{client}** `{s['method']} {s['route']}` ({', '.join(s['operations'])}; {statuses}): "
                         f"{fields or 'no body'}")
            for a in s["answers"]:
                if a["error"]:
                    note = " (expected: sent without the key on purpose)" if a.get("expected") else ""
                    lines.append(f"  - {a['status']}{note}: {a['error'][:400]}")
            if s.get("refusals"):
                refused = "; ".join(f"`{r['refused']}`" for r in s["refusals"]["refused"]) or "nothing it could name"
                then = s["refusals"]["then"]
                lines.append(f"  - refused, found by sending it again without each: {refused}; then {then}"
                             + (f" ({s['refusals']['then_error'][:200]})" if s["refusals"]["then_error"] else ""))
    failures = data.get("failures", [])
    lines += ["", "## Failures", ""] + ([f"- {f}" for f in failures] or ["None."])
    return "\n".join(lines) + "\n"


def summary(data: dict) -> dict:
    """The results without what client-requests.json holds (bodies, answers) or the documents' texts."""
    out = json.loads(json.dumps(data))
    for run in ((out.get("lm_eval") or {}).get("runs") or {}).values():
        for doc in run.get("rolling", []):
            doc.pop("text", None)
            doc["tokens"] = len(doc.pop("ids", []))
    for c in out["clients"].values():
        for shape in c["shapes"]:
            shape.pop("body", None)
            shape.pop("trimmed", None)
            for a in shape["answers"]:
                a.pop("response", None)
    return out


# -- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "clients", help="exports, tasks, logs (default %(default)s)")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-clients", help="the clients' venv (default %(default)s)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where clients.{md,json} and client-requests.json go (default %(default)s)")
    p.add_argument("--trained", type=Path, default=ROOT / "benchmarks" / "trained")
    p.add_argument("--only", default=",".join(CLIENTS), help=f"comma-separated subset of {','.join(CLIENTS)}")
    p.add_argument("--quick", action="store_true", help="5 s guidellm profiles, fewer documents: a smoke run")
    p.add_argument("--seconds", type=float, help="guidellm seconds per profile (default 30, --quick 5)")
    p.add_argument("--concurrency", type=int, default=8, help="guidellm's concurrent profile's streams")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    args = p.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(CLIENTS)
    if unknown:
        p.error(f"--only: unknown client(s) {', '.join(sorted(unknown))}; choose from {', '.join(CLIENTS)}")
    args.seconds = args.seconds or (5.0 if args.quick else 30.0)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's samout_edge, for us and for every child
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    from samout_edge.bench.machine import describe
    from samout_edge.bench.report import save_results
    from samout_edge.serve.process import ServerProcess

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python, versions = ensure_venv(args.venv.resolve())
    paths = prepare(work, args.trained)
    cummax, softmax = paths["cummax"], paths["softmax"]
    tokenizer, tokenizer_kind = tokenizer_dir(cummax, work)
    log(f"tokenizer: {tokenizer_kind} ({tokenizer})")
    sizes = make_tasks(paths["heldout"].read_text(), work / "tasks", *((2, 10, 4) if args.quick else (4, 40, 10)))
    key = secrets.token_urlsafe(32)
    key_file = work / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    env = clients_env(work, key)
    requests_log = work / "requests.jsonl"
    requests_log.unlink(missing_ok=True)
    failures: list[str] = []
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "quick": args.quick,
                            "machine": describe(),
                            "versions": versions, "pins": {**PINS, **SUPPORT_PINS}, "tokenizer": tokenizer_kind,
                            "exports": [cummax.name, softmax.name], "task_sizes": sizes, "clients": {}}
    serve_options = ("--host", "127.0.0.1", "--memory-only", "--api-key-file", str(key_file))
    started = time.perf_counter()
    log(f"serving {cummax.name}")
    with ServerProcess(cummax, *serve_options) as server:
        proxy = Proxy(server.url, requests_log)
        try:
            model = cummax.name
            if "lm-eval" in args.only:
                common = {"model": model, "tokenizer": str(tokenizer), "tokenizer_backend": "huggingface",
                          "custom_prefix_token_id": PREFIX_TOKEN, "max_retries": 1, "num_concurrent": 1,
                          "base_url": f"{proxy.url}/v1/completions"}
                runs = [
                    {"name": "mc-token-ids", "model": "local-completions", "tasks": ["samout_mc"],
                     "model_args": common},
                    {"name": "mc-text", "model": "local-completions", "tasks": ["samout_mc"],
                     "model_args": {**common, "tokenized_requests": False, "batch_size": 4}},
                    {"name": "rolling", "model": "local-completions", "tasks": ["samout_rolling"],
                     "model_args": common},
                    {"name": "mc-remote-tokenizer", "model": "local-completions", "tasks": ["samout_mc"],
                     "model_args": {**{k: v for k, v in common.items() if k != "tokenizer"},
                                    "tokenizer_backend": "remote", "auth_token": key}},
                    {"name": "gen-completions", "model": "local-completions", "tasks": ["samout_gen"],
                     "model_args": common},
                    {"name": "gen-chat", "model": "local-chat-completions", "tasks": ["samout_gen"],
                     "model_args": {"model": model, "base_url": f"{proxy.url}/v1/chat/completions",
                                    "max_retries": 1, "num_concurrent": 1}, "apply_chat_template": True}]
                log(f"lm-eval: {len(runs)} runs ({sizes})")
                lm = driver(python, "lm-eval", {"proxy": proxy.url, "api_key": key, "tasks_dir": str(work / "tasks"),
                                                "tokenizer": str(tokenizer), "runs": runs}, work, env)
                data["lm_eval"] = lm
                if lm.get("fatal"):
                    failures.append(f"lm-eval: {lm['fatal']}")
                for name, run in (lm.get("runs") or {}).items():
                    if not run.get("ok"):
                        failures.append(f"lm-eval {name}: {run.get('error', '')[:300]}")
                data["rolling_check"] = rolling_check(lm, cummax, work)
                if not data["rolling_check"]["passed"]:
                    failures.append("lm-eval rolling vs samout-edge eval: " +
                                    (data["rolling_check"].get("reason") or "outside the tolerance"))
            for client in ("langchain", "litellm"):
                if client in args.only:
                    log(f"{client}")
                    out = driver(python, client, {"proxy": proxy.url, "api_key": key, "model": model}, work, env, 600)
                    data[client.replace("-", "_")] = out
                    if out.get("fatal"):
                        failures.append(f"{client}: {out['fatal']}")
                    for op, r in (out.get("ops") or {}).items():
                        if not r["ok"]:
                            failures.append(f"{client} {op}: {r['error'][:300]}")
            if "guidellm" in args.only:
                data["guidellm_shapes"] = {}
                for fmt_name, route in (("completions", "/v1/completions"), ("chat", "/v1/chat/completions")):
                    log(f"guidellm {fmt_name} through the proxy (request shapes)")
                    set_phase(proxy.url, f"guidellm:{fmt_name}")
                    r = guidellm_run(python, env, work, f"shapes-{fmt_name}", proxy.url, model, key, tokenizer, route,
                                     {"kind": "synchronous"}, 10, 3, 64, 16)
                    data["guidellm_shapes"][fmt_name] = r
        finally:
            proxy.close()
        data["clients"] = inventory(read_records(requests_log))
        for c in data["clients"].values():  # every field each refused shape carries, not only the first
            for shape in c["shapes"]:
                if isinstance(shape.get("_failed_body"), dict):
                    shape["refusals"] = probe_refusals(server.url, key, shape["method"], shape["route"],
                                                       shape["_failed_body"])
    if "guidellm" in args.only:
        gl = {"seconds": args.seconds, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
              "runs": {}}
        profiles = (("synchronous", {"kind": "synchronous"}),
                    (f"concurrent {args.concurrency}", {"kind": "concurrent", "streams": args.concurrency}))
        for export in (cummax, softmax):
            log(f"serving {export.name} for guidellm")
            with ServerProcess(export, *serve_options) as server:
                for label, profile in profiles:
                    log(f"guidellm {export.name} {label}: {args.seconds:g} s")
                    before = metrics_counts(server.url, key)
                    r = guidellm_run(python, env, work, f"{export.name}-{profile['kind']}", server.url, export.name,
                                     key, tokenizer, "/v1/completions", profile, args.seconds, None,
                                     args.prompt_tokens, args.output_tokens)
                    r.update(export=export.name, label=label,
                             server=counts_delta(before, metrics_counts(server.url, key)))
                    gl["runs"][f"{export.name} {label}"] = r
        data["guidellm"] = gl
    if "guidellm" in args.only:  # the timed runs went straight to the server: its counts
        g = data["clients"].setdefault("guidellm", {"requests": 0, "errors": 0, "by_operation": {}, "shapes": []})
        for name, run in data["guidellm"]["runs"].items():
            n = sum(v for st in run["server"].values() for v in st.values())
            bad = sum(v for st in run["server"].values() for k, v in st.items() if int(k) >= 400)
            g["requests"] += n
            g["errors"] += bad
            g["by_operation"][f"timed: {name}"] = {"requests": n, "errors": bad, "statuses": run["server"]}
            if run["exit"] or bad or not run.get("benchmarks"):
                failures.append(f"guidellm {name}: exit {run['exit']}, {bad} refused by the server")
    for client, c in data["clients"].items():
        for s in c["shapes"]:
            for a in s["answers"]:
                if a["error"] and not a.get("expected"):
                    failures.append(f"{client} {s['method']} {s['route']} ({', '.join(s['operations'])}): "
                                    f"{a['status']} {a['error'][:300]}")
    data["failures"] = list(dict.fromkeys(failures))
    data["seconds"] = round(time.perf_counter() - started, 1)
    for c in data["clients"].values():
        for shape in c["shapes"]:
            shape.pop("_failed_body", None)
    requests_json = {"generated_by": "benchmarks/clients.py", "date": data["date"],
                     "versions": {n: versions.get(n) for n in PINS}, "tokenizer": tokenizer_kind,
                     "clients": {client: c["shapes"] for client, c in data["clients"].items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    save_results({}, markdown(data), None, args.results / "clients.md")
    write_atomic(args.results / "clients.json", dumps_compact(summary(data)))
    write_atomic(args.results / "client-requests.json", dumps_compact(requests_json))
    log(f"wrote {args.results / 'clients.md'}, clients.json, client-requests.json ({data['seconds']} s)")
    for client, c in data["clients"].items():
        log(f"{client}: {c['requests']} requests, {c['errors']} errors")
    if data["failures"]:
        log(f"FAILED: {len(data['failures'])} failures (first: {data['failures'][0][:300]})")
        return 1
    log("every client request succeeded" + (" and the rolling check held" if "rolling_check" in data else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        run_proxy(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_driver":
        run_driver(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(main(sys.argv[1:]))
