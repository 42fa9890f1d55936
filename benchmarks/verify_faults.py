"""What `verify` catches: the smallest fault of each kind it fails, per arch and form (issue 30).

Each arch of the trained set (benchmarks/trained/) is exported in each form (fp32, fp16, int8,
int4 with GPTQ, int4 and int8 with int8 compute) with --max-seq 256. Then each fault is put into
a copy of the exported graph the way an exporter bug would put it there, the hashes in
export.json updated so that only the golden comparison can catch it, and `verify` (ONNX
Runtime, the golden outputs) runs on the copy. Magnitudes go from the smallest up; the table
gives the smallest that fails verify (and says where a larger one passed):

- ``ffn bias``: k entries of layer 0's ffn1 bias negated (every form);
- ``scale rows``: k output rows' scales of layer 0's ffn1 weight negated (quantized forms);
- ``int4 block``: one block's scale of layer 0's ffn1 weight negated (int4 forms);
- ``embedding row``: one embedding row (or its int8 scale) times 1 + e;
- ``layer alpha``: layer 0's alpha (the FFN/residual blend) moved by d;
- ``decode shortcut``: layer 0's ``If(length == 1)`` taken up to length n (a running max).

    .venv/bin/python benchmarks/verify_faults.py --work out/faults --calibration-text out/calibration.txt \\
        [--archs cummax,softmax,hybrid-w64] [--markdown M.md] [--json J.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from samout_edge.artifact.manifest import read_manifest, record_file
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.runtime.verify import verify

TRAINED = Path(__file__).parent / "trained"
FORMS = {
    "fp32": dict(),
    "fp16": dict(dtype="fp16"),
    "int8": dict(weights="int8"),
    "int4": dict(weights="int4"),
    "int4 (int8 compute)": dict(weights="int4", activations="int8"),
    "int8 (int8 compute)": dict(weights="int8", activations="int8"),
}
FFN1 = "decoder_layers.0.ffn.ffn1"


def initializer(model: onnx.ModelProto, match) -> onnx.TensorProto | None:
    return next((i for i in model.graph.initializer if match(i.name)), None)


def edit(init: onnx.TensorProto, change) -> None:
    values = numpy_helper.to_array(init).copy()
    change(values)
    init.CopyFrom(numpy_helper.from_array(values, init.name))


def ffn_bias(k: int):
    def fault(model):
        edit(initializer(model, lambda n: n.endswith(f"{FFN1}.bias")), lambda a: a.__setitem__(slice(0, k), -a[:k]))
    return fault


def scale_rows(k: int):
    def fault(model):
        init = initializer(model, lambda n: FFN1 in n and "scale" in n)
        edit(init, lambda a: a.reshape(a.shape[0], -1).__setitem__(slice(0, k), -a.reshape(a.shape[0], -1)[:k]))
    return fault


def int4_block(model):
    init = initializer(model, lambda n: FFN1 in n and "scale" in n)
    edit(init, lambda a: a.reshape(-1).__setitem__(0, -a.reshape(-1)[0]))


def embedding_row(e: float):
    def fault(model):
        scale = initializer(model, lambda n: "em.weight" in n and "scale" in n)
        if scale is not None and scale.dims and scale.dims[0] > 7:  # one int8 scale per row
            edit(scale, lambda a: a.reshape(a.shape[0], -1).__setitem__(7, a.reshape(a.shape[0], -1)[7] * (1 + e)))
        else:
            table = initializer(model, lambda n: n.endswith("em.weight"))
            edit(table, lambda a: a.__setitem__(7, a[7] * (1 + e)))
    return fault


def layer_alpha(d: float):
    def fault(model):
        edit(initializer(model, lambda n: n.endswith("decoder_layers.0.alpha")), lambda a: a.__iadd__(d))
    return fault


def decode_shortcut(n: int):
    def fault(model):
        if_node = next(node for node in model.graph.node if node.op_type == "If")
        producers = {o: node for node in model.graph.node for o in node.output}
        equal = producers[producers[if_node.input[0]].input[0]]
        const = producers[equal.input[1]]
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([n], np.int64), const.output[0]))
    return fault


def faults(manifest) -> dict[str, list[tuple[str, object]]]:
    """The faults that apply to this export, each kind's magnitudes smallest first."""
    w = manifest.weights
    kinds = {"ffn bias": [(f"{k} entr{'ies' if k > 1 else 'y'}", ffn_bias(k)) for k in (1, 4, 16)]}
    if w.quantized:
        kinds["scale rows"] = [(f"{k} row{'s' * (k > 1)}", scale_rows(k)) for k in (1, 4, 16)]
    if w.kind == "int4":
        kinds["int4 block"] = [("1 block", int4_block)]
    kinds["embedding row"] = [(f"x{1 + e:g}", embedding_row(e)) for e in (0.001, 0.01, 0.1)]
    kinds["layer alpha"] = [(f"+{d:g}", layer_alpha(d)) for d in (0.001, 0.01, 0.02)]
    if manifest.arch != "softmax" and not manifest.arch.startswith("softmax"):
        kinds["decode shortcut"] = [(f"up to {n}", decode_shortcut(n)) for n in (2, 16)]
    return kinds


def try_fault(clean: Path, work: Path, fault) -> bool:
    """True when verify fails the export with ``fault`` in its graph (hashes updated)."""
    broken = work / "broken"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(clean, broken)
    model = onnx.load(str(broken / "model.onnx"))
    fault(model)
    onnx.save(model, str(broken / "model.onnx"))
    manifest = read_manifest(broken)
    for name in manifest.files:
        record_file(broken, manifest, name)
    manifest.save(broken)
    try:
        return not verify(broken, fp16_seconds=0).passed
    except SamoutError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--calibration-text", type=Path, required=True, help="training text (fp16 islands, GPTQ)")
    parser.add_argument("--archs", default="cummax,softmax,hybrid-w64")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--max-seq", type=int, default=256)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--render", action="store_true", help="only rewrite --markdown from --json")
    args = parser.parse_args()
    if args.render:
        markdown = render(json.loads(args.json.read_text()))
        save_results(json.loads(args.json.read_text()), markdown, None, args.markdown)
        return
    started = time.time()
    rows = []
    for arch in args.archs.split(","):
        for form in args.forms.split(","):
            out = args.work / f"{arch}-{form.replace(' (int8 compute)', '-a8')}"
            text = args.calibration_text if form != "fp32" else None  # fp16's islands, GPTQ's rounding
            options = ExportOptions(arch=arch, max_seq=args.max_seq, calibration_text=text, **FORMS[form])
            if out.is_dir() and read_manifest(out).verification:
                manifest = read_manifest(out)
            else:
                manifest = export(out, options, checkpoint=TRAINED / arch, vocab="bytes", force=True).manifest
            assert manifest.verification["passed"], (arch, form)
            row = {"arch": arch, "form": form, "faults": {}}
            for kind, sizes in faults(manifest).items():
                caught = [(label, try_fault(out, args.work, fault)) for label, fault in sizes]
                row["faults"][kind] = caught
                print(arch, form, kind, caught, flush=True)
            rows.append(row)
    shutil.rmtree(args.work / "broken", ignore_errors=True)
    data = {"machine": describe(), "max_seq": args.max_seq, "seconds": round(time.time() - started), "rows": rows}
    markdown = render(data)
    print(markdown)
    save_results(data, markdown, args.json, args.markdown)


def render(data: dict) -> str:
    kinds = ["ffn bias", "scale rows", "int4 block", "embedding row", "layer alpha", "decode shortcut"]
    lines = [f"verify against seeded faults, {data['machine']['label']}, ONNX Runtime CPU, max_seq {data['max_seq']}, "
             f"{data['seconds']} s", "",
             "The smallest fault of each kind that fails `verify` (hashes updated: only the golden comparison "
             "catches it); 'none' where even the largest tried passed, '-' where the kind does not apply.", "",
             "| arch | form | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for row in data["rows"]:
        cells = []
        for kind in kinds:
            caught = row["faults"].get(kind)
            if caught is None:
                cells.append("-")
                continue
            first = next((i for i, (_, ok) in enumerate(caught) if ok), None)
            if first is None:
                cells.append(f"none (up to {caught[-1][0]})")
            else:
                later_missed = any(not ok for _, ok in caught[first:])
                cells.append(caught[first][0] + (" (a larger one passed)" if later_missed else ""))
        lines.append(f"| {row['arch']} | {row['form']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
