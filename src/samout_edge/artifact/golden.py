"""Golden inputs and PyTorch outputs that travel with an export.

``export`` runs the PyTorch fp32 model on a fixed set of cases and writes them
beside model.onnx, so ``verify`` on the device needs only numpy and a runtime:
no torch, no checkpoint. The files are in Polygraphy's JSON format, so NVIDIA's
own tool checks an export or engine against them as well, with the tolerance the
index records (``GoldenIndex.polygraphy_command``; `samout-edge inspect` prints it):

    polygraphy run model.onnx --onnxrt \
        --load-inputs golden/inputs.json --load-outputs golden/outputs.json --rtol 0 --atol ATOL

- ``golden/inputs.json``: a list of feed dicts (``input_ids`` and every past state)
- ``golden/outputs.json``: Polygraphy ``RunResults``, one iteration per feed
- export.json ``golden``: the cases (what each iteration checks, and which
  decode step takes its state from the step before), written by GoldenIndex.

Arrays are ``np.save`` bytes in base64, as Polygraphy writes them; loading never
unpickles (``allow_pickle=False``).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.config import ModelConfig
from samout_edge.artifact.files import write_bytes_atomic
from samout_edge.errors import SamoutError

INPUTS_FILE = "golden/inputs.json"
OUTPUTS_FILE = "golden/outputs.json"
# int8 activations: MatMulNBits computes another function per CPU kernel family (ACTIVATION_FAMILIES): the
# golden outputs are x86's; these files hold the same cases as the other families compute them
FAMILY_OUTPUTS = {"arm": "golden/outputs-arm.json", "fp": "golden/outputs-fp.json"}
RUNNER_NAME = "pytorch-fp32"
# An output above this many bytes is not recorded (a softmax KV cache at max_seq,
# logits for every position): the golden files stay small enough to copy with the model.
MAX_OUTPUT_BYTES = 1 << 20
MAX_GOLDEN_FILE_BYTES = 256 << 20


DECODE_PREFILL = 11
DECODE_STEPS = 4
BATCH2_UP_TO = 128  # longer cases run batch 1, to keep the golden files small


def largest_prime_at_most(n: int) -> int | None:
    for p in range(n, 1, -1):
        if all(p % d for d in range(2, int(p**0.5) + 1)):
            return p
    return None


def golden_lengths(max_seq: int, trace_seq: int) -> list[int]:
    """1, a prime near 100, max_seq - 1 and max_seq; never the traced length where avoidable."""
    prime = largest_prime_at_most(min(100, max_seq))
    if prime == trace_seq:
        prime = largest_prime_at_most(prime - 1)
    return sorted({1, max_seq, max(1, max_seq - 1)} | ({prime} if prime else set()))


SHORT_UP_TO = 16  # every call length up to this is checked: a chunked prefill makes any of them


def chain_lengths(max_seq: int, block: int) -> list[int]:
    """The calls of the "calls" golden case, each continuing the state of the one before:
    every length from 1 to SHORT_UP_TO (both sides of a decode shortcut such as
    ``If(length == 1)``, and of every doubling step), then both sides of the blocked scan's
    block. A wrong graph that is right at 1, 97 and max_seq is wrong at one of these."""
    lengths = list(range(1, min(SHORT_UP_TO, max_seq) + 1))
    return lengths + [n for n in (block - 1, block, block + 1) if SHORT_UP_TO < n <= max_seq]


EVERY_ID = "every id"
CALLS = "calls"  # every short call length, the state carried (exporter/golden.py chain_case)
LONG = "long"  # cummax: a prompt past max_seq, fed in calls of max_seq (exporter/golden.py long_case)
LONG_FACTOR = 2.5
LONG_STEPS = 2
LONG_WINDOW_FACTOR = 8  # a softmax window up to this x max_seq: the long case runs past it


# Each "every id" row feeds an empty state, which a windowed softmax makes large (the seed
# preset's softmax-w64: 1.5 MiB a row, 15 GiB for every id): a case's empty states stay within
# MAX_CASE_STATE_BYTES, and the golden files' within EVERY_ID_FEED_BYTES (every_id_step).
MAX_CASE_STATE_BYTES = 16 << 20
EVERY_ID_FEED_BYTES = 128 << 20


def every_id_chunks(vocab: int, first_row_bytes: int, state_row_bytes: int = 0, step: int = 1) -> list[np.ndarray]:
    """The ids of the "every id" cases: each id once (every ``step``-th, and the last), as a
    one-token row, so each embedding row shows in the first layer's state (a linear function
    of it). Random ids miss some rows (18 of 128 in the tiny preset), and a corrupted row the
    golden inputs never select would pass verify. Rows per case keep that state
    (``first_row_bytes`` a row: hidden x 4 for a running max, a window of keys for a windowed
    softmax) within MAX_OUTPUT_BYTES and the rows' empty states (``state_row_bytes`` each)
    within MAX_CASE_STATE_BYTES."""
    ids = np.arange(0, vocab, step)
    if ids[-1] != vocab - 1:
        ids = np.append(ids, vocab - 1)
    rows = max(1, min(MAX_OUTPUT_BYTES // first_row_bytes, MAX_CASE_STATE_BYTES // max(1, state_row_bytes)))
    return [ids[i : i + rows] for i in range(0, len(ids), rows)]


def every_id_row_bytes(cfg: ModelConfig, spec: ArchSpec) -> tuple[int, int]:
    """Bytes a row of an "every id" case takes: its first state (what the case records; a KV
    cache's past may be empty, its present holds the token) and its empty state (what it feeds)."""
    empty = list(graph.empty_state(cfg, spec, 1, "fp32").values())
    return max(empty[0].nbytes, cfg.hidden_size * 4), sum(v.nbytes for v in empty)


def every_id_step(vocab: int, state_row_bytes: int, budget: int = EVERY_ID_FEED_BYTES) -> int:
    """1 (every id) while the cases' empty states fit ``budget`` bytes of golden inputs (the seed
    preset's cummax: 120 MiB), else the stride that makes them fit."""
    return max(1, -(-vocab * state_row_bytes // max(1, min(budget, EVERY_ID_FEED_BYTES))))


def feed_budget(feeds: list[dict[str, np.ndarray]]) -> int:
    """What the golden inputs file has left for the "every id" cases' feeds: base64 makes 3
    bytes 4, and the file stays below MAX_GOLDEN_FILE_BYTES with 16 MiB to spare."""
    used = sum(v.nbytes for feed in feeds for v in feed.values())
    return MAX_GOLDEN_FILE_BYTES * 3 // 4 - (16 << 20) - used


def every_id_name(ids: np.ndarray) -> str:
    step = int(ids[1] - ids[0]) if len(ids) > 1 else 1
    return f"{EVERY_ID} {ids[0]}..{ids[-1]}" + (f" by {step}" if step > 1 else "")


def golden_ids(rng: np.random.Generator, vocab: int, batch: int, seq: int) -> np.ndarray:
    """Random ids with 0 first in row 0 and vocab-1 last in the last row."""
    ids = rng.integers(0, vocab, (batch, seq))
    ids[0, 0] = 0
    ids[-1, -1] = vocab - 1
    return ids


@dataclass
class GoldenCase:
    name: str  # "prefill 2x97", "decode 2x(11+3)"
    batch: int
    seq: int
    past: int  # tokens already in the state
    state_from: int | None = None  # index of the case whose present state this one's past is
    skipped: list[str] = field(default_factory=list)  # outputs too large to record


@dataclass
class GoldenIndex:
    cases: list[GoldenCase]
    runner: str = RUNNER_NAME
    inputs: str = INPUTS_FILE
    outputs: str = OUTPUTS_FILE
    # Polygraphy's absolute tolerance for these files (with --rtol 0): verify's rtol times the
    # largest output scale, so `polygraphy run` passes where verify does (its default, 1e-5 on
    # every element, fails correct exports).
    atol: float | None = None
    families: dict[str, str] = field(default_factory=dict)  # kernel family -> its outputs file (FAMILY_OUTPUTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> GoldenIndex:
        try:
            atol = data.get("atol")
            families = data.get("families") or {}
            if any(FAMILY_OUTPUTS.get(k) != v for k, v in families.items()):
                raise TypeError(f"families {families!r} are not {FAMILY_OUTPUTS}")
            return cls([GoldenCase(**c) for c in data["cases"]], data.get("runner", RUNNER_NAME),
                       atol=float(atol) if isinstance(atol, (int, float)) and not isinstance(atol, bool) else None,
                       families=dict(families))
        except (KeyError, TypeError, AttributeError) as e:
            raise SamoutError(f"export.json: the golden index is malformed ({type(e).__name__}: {e})") from None

    def polygraphy_command(self, ort_level: str | None = None) -> str:
        """The NVIDIA Polygraphy line that checks this export (run in the export directory)
        against its golden outputs in ONNX Runtime. ``ort_level``: the graph optimization
        level the export needs (runtime_settings)."""
        args = ["polygraphy run model.onnx --onnxrt"]
        if ort_level:
            args.append(f"--graph-optimization-level {ort_level}")
        args.append(f"--load-inputs {self.inputs} --load-outputs {self.outputs}")
        if self.atol is not None:
            args.append(f"--rtol 0 --atol {self.atol:.3g}")
        return " ".join(args)


@dataclass
class Golden:
    index: GoldenIndex
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    family_outputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)  # as index.families


def encode_array(array: np.ndarray) -> dict[str, str]:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode(), "polygraphy_class": "ndarray"}


def decode_array(data: Any, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(data["array"].encode(), validate=True)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # binascii.Error, ValueError, KeyError, TypeError
        raise SamoutError(f"{where}: not an encoded array ({type(e).__name__})") from None


def _run_results(runner: str, outputs: list[dict[str, np.ndarray]]) -> bytes:
    iterations = [
        {
            "outputs": {k: {"values": encode_array(v), "polygraphy_class": "LazyArray"} for k, v in out.items()},
            "runtime": 0.0,
            "runner_name": runner,
            "polygraphy_class": "IterationResult",
        }
        for out in outputs
    ]
    return json.dumps({"lst": [[runner, iterations]], "polygraphy_class": "RunResults"}).encode()


def save_golden(directory: Path, golden: Golden) -> list[str]:
    """Write the files (atomically, each); returns their names relative to ``directory``."""
    feeds = [{k: encode_array(v) for k, v in feed.items()} for feed in golden.feeds]
    write_bytes_atomic(directory / INPUTS_FILE, json.dumps(feeds).encode())
    write_bytes_atomic(directory / OUTPUTS_FILE, _run_results(golden.index.runner, golden.outputs))
    names = [INPUTS_FILE, OUTPUTS_FILE]
    golden.index.families = {}
    for family, outputs in golden.family_outputs.items():
        name = FAMILY_OUTPUTS[family]
        write_bytes_atomic(directory / name, _run_results(f"{golden.index.runner}-{family}", outputs))
        golden.index.families[family] = name
        names.append(name)
    return names


def _read(path: Path) -> Any:
    if not path.is_file():
        raise SamoutError(f"{path} is missing; re-export, or verify against PyTorch with --checkpoint")
    if path.stat().st_size > MAX_GOLDEN_FILE_BYTES:
        raise SamoutError(f"{path} is larger than any golden file samout-edge writes")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise SamoutError(f"{path} is not valid JSON: {e}") from None


def load_golden(directory: Path, index: GoldenIndex, family: str = "x86") -> Golden:
    """The golden feeds and outputs; ``family``: the outputs of that kernel family where the export
    has them (int8 activations), else the x86 ones every export has."""
    feeds_data = _read(directory / index.inputs)
    results = _read(directory / index.families.get(family, index.outputs))
    try:
        (runner, iterations), = results["lst"]
        feeds = [{k: decode_array(v, f"{index.inputs}[{i}].{k}") for k, v in feed.items()} for i, feed in enumerate(feeds_data)]
        outputs = [{k: decode_array(v["values"], f"{index.outputs}[{i}].{k}") for k, v in it["outputs"].items()}
                   for i, it in enumerate(iterations)]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SamoutError(f"the golden files in {directory} are malformed ({type(e).__name__}: {e})") from None
    if not len(feeds) == len(outputs) == len(index.cases):
        raise SamoutError(f"the golden files in {directory} hold {len(feeds)} inputs and {len(outputs)} outputs "
                          f"for {len(index.cases)} cases")
    return Golden(index, feeds, outputs)


def polygraphy_line(manifest) -> str | None:
    """The Polygraphy command that checks an export against its golden files (None: it carries none).
    Here, not in inspection, so the CLI's render imports it without the onnx package (12 MB of RSS
    in every `generate` and `serve` process)."""
    from samout_edge.artifact.manifest import runtime_settings

    if not manifest.golden:
        return None
    level = runtime_settings(manifest).get("onnxruntime", {}).get("graph_optimization_level")
    return GoldenIndex.from_dict(manifest.golden).polygraphy_command(level)
