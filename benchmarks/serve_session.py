"""The demo's serve step: a conversation that outlives a kill -9.

Starts `samout-edge serve EXPORT` (an export made with --vocab) on loopback, opens a session,
sends one turn, SIGKILLs the server, restarts it on the same store, sends a
second turn on the same session, and shows that the continuation is the one the
uninterrupted model gives (ONNX Runtime over the whole history, sampling with the same seed);
then one chat turn through the default template.

    python benchmarks/serve_session.py out/pair-cummax-int4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

from samout_edge.artifact.vocab import export_vocab
from samout_edge.generate import Sampler, generate
from samout_edge.runtime.registry import load_runner
from samout_edge.serve.process import ServerProcess

SAMPLING = {"temperature": 0.7, "top_k": 20, "seed": 3}

# The chat turn. The default template renders one "role: content" line per message and ends
# with "assistant: ", so the answer is the rest of that line: stop at its newline. Sampled, not
# greedy: greedy decoding of these small byte models falls into runs of spaces (indentation) on
# some prompts. tests/test_docs.py checks that this answers text on the trained model.
CHAT = {"messages": [{"role": "user", "content": "write a Python function, café-safe"}], "stop": ["\n"],
        **SAMPLING}


def turn(url: str, sid: str, text: str, n: int) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": n, "session": sid, **SAMPLING},
                   timeout=120)
    r.raise_for_status()
    return r.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    vocab = export_vocab(args.export)
    if vocab is None:
        sys.exit(f"error: {args.export} carries no vocab: export it with --vocab FILE")
    first_text, second_text = "class Foo:\n    def __init__(self", "\n\n    def read(self"
    with tempfile.TemporaryDirectory() as tmp:
        options = ("--store", str(Path(tmp) / "sessions.sqlite"))
        with ServerProcess(args.export, *options) as server:
            print(server.banner)
            sid = httpx.post(f"{server.url}/v1/sessions").json()["id"]
            first = turn(server.url, sid, first_text, args.tokens)
            print(f"turn 1 -> {first['choices'][0]['text']!r}\nsession: {first['session']}")
            server.kill()
        print("server killed with SIGKILL; restarting on the same store")
        with ServerProcess(args.export, *options) as server:
            print(server.banner)
            second = turn(server.url, sid, second_text, args.tokens)
            print(f"turn 2 -> {second['choices'][0]['text']!r}\nsession: {second['session']}")
            history = vocab.encode(first_text) + first["choices"][0]["token_ids"] + vocab.encode(second_text)
            with load_runner(args.export, "ort") as runner:
                want = generate(runner, history, args.tokens, Sampler(**SAMPLING)).new_ids
            same = second["choices"][0]["token_ids"] == want
            print(f"turn 2 equals one uninterrupted generation over the whole conversation: {same}")
            chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                              json={**CHAT, "max_tokens": args.tokens}).json()
            print(f"a chat turn (the default template; stop at the end of the assistant's line) -> "
                  f"{chat['choices'][0]['message']['content']!r} ({chat['choices'][0]['finish_reason']})")
            server.stop()
    if not same:
        sys.exit("error: the session did not resume exactly")


if __name__ == "__main__":
    main()
