"""Compose several exported lungsentry U-Nets into one ONNX model whose scores are the ensemble's.

    python models/train/ensemble.py --member A.onnx --member B.onnx [--weight 0.5 --weight 0.5] \
        --out DIR/lungsentry-unet.onnx --version 0.6.0

Every member must have the product's input contract (input `ct`, N x 1 x 256 x 256 float32, output `scores`,
N x 3 x 256 x 256 logits over background / lung / lesion). The composed graph runs each member on the same input,
takes each member's softmax over the three classes, averages them with the given weights (equal by default) and
returns log(mean probability + 1e-6) as `scores`: logits again, so the product's argmax and softmax read it as they
read one model (softmax of the output is the ensemble's mean probability, up to the 1e-6). The input contract does
not change, so the daemon, `analyze`, `eval` and the GPU preprocessing kernel need nothing new.

Writes the model and, beside it, a manifest.toml (sha256, the input contract of the members) for `--manifest`.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import compose as onnx_compose, helper, numpy_helper, version_converter

if __spec__ is None:  # run as a file: make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train.manifest import MANIFEST  # noqa: E402

INPUT, OUTPUT, EPS = "ct", "scores", 1e-6


def check_member(m: onnx.ModelProto, path: Path) -> None:
    g = m.graph
    ins = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    outs = [o.name for o in g.output]
    if ins != [INPUT] or outs != [OUTPUT]:
        raise SystemExit(f"{path}: inputs {ins} / outputs {outs}, the product's contract is [{INPUT}] -> [{OUTPUT}]")
    dims = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]
    if dims != [1, 256, 256]:
        raise SystemExit(f"{path}: input shape {dims}, the product's contract is 1 x 256 x 256 (2D, one slice)")


def compose(members: list[onnx.ModelProto], weights: list[float]) -> onnx.ModelProto:
    if len(members) != len(weights) or not members:
        raise ValueError("one weight per member")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0 with a positive sum")
    opset = max(op.version for m in members for op in m.opset_import if op.domain in ("", "ai.onnx"))
    nodes, inits, probs = [], [], []
    for k, m in enumerate(members):
        m = version_converter.convert_version(m, opset) if m.opset_import[0].version != opset else m
        p = f"m{k}_"
        renamed = onnx_compose.add_prefix(m, prefix=p)
        g = renamed.graph
        # the member reads the shared input: rename its (prefixed) input back
        for n in g.node:
            n.input[:] = [INPUT if x == p + INPUT else x for x in n.input]
        nodes.extend(g.node)
        inits.extend(g.initializer)
        sm = f"{p}prob"
        nodes.append(helper.make_node("Softmax", [p + OUTPUT], [sm], axis=1))
        w = numpy_helper.from_array(np.array(weights[k] / total, dtype=np.float32), f"{p}weight")
        inits.append(w)
        nodes.append(helper.make_node("Mul", [sm, w.name], [f"{p}wprob"]))
        probs.append(f"{p}wprob")
    nodes.append(helper.make_node("Sum", probs, ["ens_prob"]))
    eps = numpy_helper.from_array(np.array(EPS, dtype=np.float32), "ens_eps")
    inits.append(eps)
    nodes.append(helper.make_node("Add", ["ens_prob", eps.name], ["ens_prob_eps"]))
    nodes.append(helper.make_node("Log", ["ens_prob_eps"], [OUTPUT]))
    first = members[0].graph
    graph = helper.make_graph(nodes, "lungsentry_ensemble", [first.input[0]], [first.output[0]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lungsentry-ensemble")
    model.ir_version = members[0].ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", type=Path, action="append", required=True, help="an exported model (repeat)")
    ap.add_argument("--weight", type=float, action="append", help="its weight (repeat, in order; default equal)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--version", required=True)
    a = ap.parse_args()
    weights = a.weight or [1.0] * len(a.member)
    members = []
    for path in a.member:
        m = onnx.load(str(path))
        check_member(m, path)
        members.append(m)
    model = compose(members, weights)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(a.out))
    digest = hashlib.sha256(a.out.read_bytes()).hexdigest()
    (a.out.parent / "manifest.toml").write_text(MANIFEST.format(version=a.version, file=a.out.name, sha256=digest))
    print(f"{a.out}: {len(members)} members, weights {[w / sum(weights) for w in weights]}, "
          f"{a.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
