"""The docs run as written: every fenced block in README.md and docs/*.md says what it is.

A fence's info string is its language and, for shell and Python, a mark (docs/architecture.md,
"Docs that run"): ```` ```bash run ```` is run here; ```` ```bash no-run: REASON ```` is not
(a Jetson, TensorRT, minutes of work) and is reported as a skip with its reason, so
``pytest -rs tests/test_docs.py`` lists every block nobody runs. A block without a language, a
shell or Python block without a mark, and a fence that does not close (text after the closing
backticks leaves the rest of the page code) fail.

Runnable blocks run as a reader runs them: from a scratch directory laid out as the checkout
after ``make demo`` (``out/pair-cummax-int4``: the trained SamOut at int4 with a byte vocab, here
rounded to nearest and at a short max_seq to export in seconds), against one ``samout-edge
serve`` with an API key, with ``$SAMOUT_URL`` and ``$SAMOUT_EDGE_API_KEY`` set. Each runs alone
(``bash -euo pipefail`` or ``python``), must exit 0 and print no error object, and a chat example
must answer text. Every block, run or not, is parsed (``bash -n``, ``compile``), and its
``samout-edge``, ``pip install`` and ``make`` lines are checked against the CLI, pyproject.toml
and the Makefile, so a block that is not run still fails on a stale option or extra.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
PYTHON = {"python", "py"}
TEXT = {"text", "json", "toml", "yaml", "jinja"}  # shown, never run: need no mark
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    mark: str  # "run", "no-run" or "" (text)
    reason: str
    code: str

    @property
    def name(self) -> str:
        return f"{shown(self.path)}:{self.line}"


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file as CommonMark reads them, and what is wrong with its fences."""
    blocks, problems = [], []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        where = f"{shown(path)}:{i + 1}"
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group(2)[0] == fence[0] and len(close.group(2)) >= len(fence):
                if not close.group(3).strip():
                    break
                problems.append(f"{where}: text after the fence at line {j + 1} keeps the block open "
                                f"(a closing fence is the backticks alone on their line)")
            body.append(re.sub(f"^ {{0,{indent}}}", "", lines[j]))  # the fence's indent, as CommonMark strips it
            j += 1
        else:
            problems.append(f"{where}: the block never closes")
        lang, _, attr = info.partition(" ")
        attr = attr.strip()
        mark, _, reason = attr.partition(":")
        mark, reason = mark.strip(), reason.strip()
        if not lang:
            problems.append(f"{where}: a fence without a language (```text for a diagram or an output)")
        elif lang in SHELL | PYTHON:
            if not (attr == "run" or (mark == "no-run" and reason)):
                problems.append(f"{where}: a {lang} block must say `run` or `no-run: REASON`, it says {attr!r}")
        elif lang not in TEXT:
            problems.append(f"{where}: unknown language {lang!r} (shell: {sorted(SHELL)}, python: {sorted(PYTHON)}, "
                            f"shown only: {sorted(TEXT)})")
        elif attr:
            problems.append(f"{where}: a {lang} block is never run, so it takes no mark ({attr!r})")
        blocks.append(Block(path, i + 1, lang, "run" if attr == "run" else mark if lang not in TEXT else "",
                            reason, "\n".join(body) + "\n"))
        i = j + 1
    return blocks, problems


PARSED = {path: parse(path) for path in DOCS}
CODE = [b for blocks, _ in PARSED.values() for b in blocks if b.lang in SHELL | PYTHON]


def test_every_fence_closes_and_says_what_it_is():
    problems = [p for _, found in PARSED.values() for p in found]
    assert not problems, "\n".join(problems)
    assert {b.path.name for b in CODE if b.mark == "run"} >= {"serving.md"}  # the parse found what it runs


def test_the_checks_catch_a_broken_fence_and_unmarked_blocks(tmp_path):
    """The parser itself: the page that rendered half as code (text after a closing fence) and blocks
    that say nothing about being run are found, so the test above cannot pass by parsing nothing."""
    page = tmp_path / "probe.md"
    page.write_text("```bash\nls\n```\n\n```\nx\n```\n```bash no-run:\nls\n```\n```text run\nx\n```\n"
                    "```python run\nprint(1)\n``` Every error is\n```\n")
    blocks, problems = parse(page)
    text = "\n".join(problems)
    assert "text after the fence at line 16" in text
    assert "a bash block must say `run` or `no-run: REASON`, it says ''" in text
    assert "a fence without a language" in text and "it says 'no-run:'" in text and "takes no mark" in text
    assert blocks[-1].code == "print(1)\n``` Every error is\n"  # as GitHub renders it: still code


# ---------------------------------------------------------------------------- static checks of every block


@functools.cache
def cli_commands() -> dict[str, set[str]]:
    """samout-edge's commands as click sees them: name -> the option names each takes."""
    import typer

    import samout_edge.cli.app as app

    root = typer.main.get_command(app.app)
    commands = {}
    for name, command in root.commands.items():
        subs = getattr(command, "commands", None)
        if subs:
            for sub, c in subs.items():
                commands[f"{name} {sub}"] = {o for p in c.params for o in (*p.opts, *p.secondary_opts)}
            if hasattr(command, "default_command"):  # `bench ARGS` is `bench run ARGS`
                commands[name] = commands[f"{name} {command.default_command}"]
        else:
            commands[name] = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return commands


def shell_commands(code: str) -> list[list[str]]:
    """Each simple command of a shell block, as words (lines joined at backslashes, comments dropped)."""
    found = []
    for line in code.replace("\\\n", " ").split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            words = list(lexer)
        except ValueError:  # a quote spanning lines (a heredoc): bash -n checks those
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word and set(word) <= set(";&|()"):
                if command:
                    found.append(command)
                command = []
            else:
                command.append(word)
    return found


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def static_problems(block: Block, commands: dict[str, set[str]]) -> list[str]:
    """What is wrong with a block without running it."""
    if block.lang in PYTHON:
        try:
            compile(block.code, block.name, "exec")
        except SyntaxError as e:
            return [f"{block.name}: {e}"]
        return []
    syntax = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
    if syntax.returncode:
        return [f"{block.name}: bash -n: {syntax.stderr.strip()}"]
    project = pyproject()["project"]
    extras, version = set(project["optional-dependencies"]), project["version"]
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    problems = []
    for words in shell_commands(block.code):
        while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value command
            words = words[1:]
        if not words:
            continue
        if words[0] == "samout-edge":
            args = [w for w in words[1:] if w not in ("--debug",)]
            name = " ".join(args[:2]) if " ".join(args[:2]) in commands else (args[0] if args else "")
            if name not in commands:
                problems.append(f"{block.name}: `samout-edge {' '.join(args[:1])}` is no command")
                continue
            for word in args:
                option = word.split("=", 1)[0]
                if option.startswith("-") and option not in commands[name] | {"--help"}:
                    problems.append(f"{block.name}: `samout-edge {name}` takes no {option}")
        elif words[:2] == ["pip", "install"] or words[:2] == ["pip", "wheel"]:
            for word in (w for w in words[2:] if not w.startswith("-")):
                if re.match(r"samout[-_]edge(\[|$|[<>=])", word):
                    problems.append(f"{block.name}: {word!r} installs from PyPI, where samout-edge is not")
                wheel = re.match(r"(?:.*/)?samout_edge-([^-]+)-", word)
                if wheel and wheel.group(1) != version:
                    problems.append(f"{block.name}: {word!r} is not version {version}'s wheel")
                asked = re.search(r"\[([^\]]*)\]$", word)
                if (word.startswith(".") or wheel) and asked:
                    problems += [f"{block.name}: no extra {e!r} in pyproject.toml" for e in asked.group(1).split(",")
                                 if e.strip() not in extras]
        elif words[0] == "make":
            problems += [f"{block.name}: the Makefile has no target {t!r}" for t in words[1:]
                         if not t.startswith("-") and "=" not in t and t not in targets]
    return problems


def test_the_static_checks_find_stale_commands():
    """Each check finds what it is for: a stale option, a PyPI install, an unknown extra or target."""
    code = ("samout-edge serve out/x --max-batch 4 --no-such-flag \\\n  --port 1\nsamout-edge nonsense\n"
            "pip install 'samout-edge[serve]'\npip install -e '.[serve,nope]'\nmake demo nope  # comment\n"
            "pip install ./samout_edge-9.9-py3-none-any.whl\n")
    block = Block(ROOT / "README.md", 1, "bash", "no-run", "probe", code)
    text = "\n".join(static_problems(block, cli_commands()))
    assert "takes no --no-such-flag" in text and "--max-batch" not in text and "--port" not in text
    assert "`samout-edge nonsense` is no command" in text
    assert "installs from PyPI" in text and "no extra 'nope'" in text and "no target 'nope'" in text
    assert "not version" in text and "target 'demo'" not in text
    broken = Block(ROOT / "README.md", 1, "python", "run", "", "print(x\n")
    assert static_problems(broken, {})


# ---------------------------------------------------------------------------- running the runnable blocks


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory laid out as the checkout after `make demo`, and commands that run the code under test."""
    from samout_edge.exporter.onnx_export import ExportOptions, export

    root = tmp_path_factory.mktemp("checkout")
    export(root / "out" / "pair-cummax-int4", ExportOptions(arch="cummax", max_seq=128, logits="all", weights="int4"),
           checkpoint=ROOT / "benchmarks" / "trained" / "cummax", vocab="bytes")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, run in (("samout-edge", f'"{sys.executable}" -m samout_edge'), ("python3", f'"{sys.executable}"'),
                      ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return root


@pytest.fixture(scope="module")
def served(scratch):
    """One server for every block: the demo's export, an API key, its store in the scratch directory."""
    from samout_edge.serve.process import ServerProcess

    key = secrets.token_urlsafe(32)
    export_dir = scratch / "out" / "pair-cummax-int4"
    with ServerProcess(export_dir, "--store", str(scratch / "sessions.sqlite"), "--api-key", key) as server:
        import samout_edge

        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}  # the blocks say it all
        env.update(SAMOUT_URL=server.url, SAMOUT_EDGE_API_KEY=key, NO_PROXY="127.0.0.1,localhost",
                   no_proxy="127.0.0.1,localhost", PATH=f"{scratch / 'bin'}{os.pathsep}{env['PATH']}",
                   PYTHONPATH=os.pathsep.join([str(Path(samout_edge.__file__).parents[1]),
                                               *filter(None, [env.get("PYTHONPATH")])]))
        yield server, env
        server.stop()


def json_objects(text: str) -> list:
    """Every JSON object in a block's output (curl prints them back to back, without newlines)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        found.append(value)
        i = end
    return found


def chat_answers(output: str) -> list[str]:
    """What a chat example answered: each JSON answer's messages, else the printed text."""
    answers = [choice.get("message", {}).get("content") or "" for value in json_objects(output)
               if isinstance(value, dict) for choice in value.get("choices", [])]
    return answers or [output]


@pytest.mark.parametrize("block", CODE, ids=[b.name for b in CODE])
def test_block(block, request):
    """A runnable block runs against the server and succeeds; any other says why it is not run here."""
    problems = static_problems(block, cli_commands())
    assert not problems, "\n".join(problems)
    assert block.mark == "run" or block.reason, f"{block.name}: say `run` or `no-run: REASON` after {block.lang!r}"
    if block.mark != "run":
        pytest.skip(f"{block.name} not run: {block.reason}")
    _, env = request.getfixturevalue("served")
    scratch = request.getfixturevalue("scratch")
    command = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang in SHELL else \
        [sys.executable, "-c", block.code]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=120)
    report = (f"{block.name} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
              f"--- stderr\n{done.stderr[-3000:]}")
    assert done.returncode == 0, report
    errors = [v for v in json_objects(done.stdout) if isinstance(v, dict) and "error" in v]
    assert not errors, report
    if re.search(r"chat[./]completions", block.code):
        answers = chat_answers(done.stdout)
        assert all(a.strip() for a in answers), f"a chat example answered only whitespace: {answers!r}\n{report}"


# ---------------------------------------------------------------------------- the demo's chat turn


def test_the_demo_chat_turn_answers_text_on_the_trained_model(served):
    """benchmarks/serve_session.py's chat turn, as `make demo` sends it, answers text, not whitespace.
    Sixteen choices (its seed and the fifteen after): with the template ending at "assistant:" the
    trained model answered a newline and indentation for its seed, and for 2 of these 16."""
    spec = importlib.util.spec_from_file_location("serve_session", ROOT / "benchmarks" / "serve_session.py")
    session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(session)
    server, env = served
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {env['SAMOUT_EDGE_API_KEY']}"},
                   json={**session.CHAT, "max_tokens": 48, "n": 16})
    assert r.status_code == 200, r.text
    answers = [choice["message"]["content"] for choice in r.json()["choices"]]
    assert len(answers) == 16 and all(a.strip() for a in answers), answers
