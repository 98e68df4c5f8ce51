"""Rebuilds a trainable PyTorch checkpoint from a shipped ONNX file, so training can continue from the shipped model
on a machine that has no run folder (runs/ is git-ignored and lives only where it was trained).

The export folds every BatchNorm into the convolution before it (W' = W * g / s, b' = beta - g * mu / s). This
unfolds it so the network computes exactly the shipped function in both modes: each convolution gets the folded
weight, and its BatchNorm is set from the per-channel mean mu and variance v of that convolution's output over a
batch of real training slices: gamma = sqrt(v + eps), beta = mu + b', running mean mu, running variance v. In eval
mode that is (y - mu) + mu + b' = y + b' for any input; in training mode it is exact on that batch and close on
others, so fine-tuning starts from the shipped model rather than from a shifted one.

    python models/train/from_onnx.py --onnx models/lungsentry-unet.onnx --arch '{"width": 8, "levels": 4}' \
        --out models/train/runs/from-v0.5.0/best.pt
Prints the largest logit difference to onnxruntime on real validation slices (eval mode), which must be ~1e-5.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_real  # noqa: E402
from models.train import split as split_mod  # noqa: E402
from models.train.model import UNet, from_summary  # noqa: E402

HERE = Path(__file__).resolve().parent


def module_of(node_name: str) -> str:
    """'/enc.0/enc.0.3/Conv' -> 'enc.0.3'; '/head/Conv' -> 'head'."""
    return node_name.strip("/").split("/")[-2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=HERE.parent / "lungsentry-unet.onnx")
    ap.add_argument("--arch", default='{"width": 8, "levels": 4}', help="the architecture (a run's arch.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stats-slices", type=int, default=64, help="real training slices for the BatchNorm statistics")
    args = ap.parse_args()

    model = from_summary(json.loads(args.arch))
    g = onnx.load(args.onnx).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    mods = dict(model.named_modules())
    bn_after: dict[str, torch.nn.BatchNorm2d] = {}
    state = model.state_dict()
    done = set()
    with torch.no_grad():
        for n in g.node:
            if n.op_type not in ("Conv", "ConvTranspose"):
                continue
            name = module_of(n.name)
            m = mods[name]
            w = torch.from_numpy(inits[n.input[1]].copy())
            b = torch.from_numpy(inits[n.input[2]].copy())
            assert m.weight.shape == w.shape, (name, m.weight.shape, w.shape)
            m.weight.copy_(w)
            done.add(f"{name}.weight")
            if m.bias is not None:
                m.bias.copy_(b)
                done.add(f"{name}.bias")
                continue
            # a conv without bias is followed by its BatchNorm: <parent>.<index + 1>
            parent, idx = name.rsplit(".", 1)
            bn = mods[f"{parent}.{int(idx) + 1}"]
            assert isinstance(bn, torch.nn.BatchNorm2d), name
            bn.weight.fill_(1.0)
            bn.bias.copy_(b)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn_after[name] = bn
            done.update(f"{parent}.{int(idx) + 1}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                                  "num_batches_tracked"))
    missing = [k for k in state if k not in done]
    assert not missing, f"not set from the ONNX file: {missing}"

    # BatchNorm statistics of each convolution's (bias-free) output on real training slices, in eval mode (where the
    # network now computes the shipped function exactly)
    ct, lab = data_real.load_real()
    sp = split_mod.load_split()
    tr_idx, va_idx, _ = split_mod.split_indices(sp)
    rng = np.random.default_rng(0)
    pick = rng.choice(tr_idx, size=min(args.stats_slices, len(tr_idx)), replace=False)
    x = torch.from_numpy(ct[np.sort(pick)].astype(np.float32) / 255.0)[:, None]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [mods[name].register_forward_hook(
        lambda mod, inp, out, name=name: stats.__setitem__(name, (out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=False))))
        for name in bn_after]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for name, bn in bn_after.items():
            mu, var = stats[name]
            b = bn.bias.clone()
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mu + b)
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(var)

    # check against onnxruntime on validation slices (eval mode)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    xv = ct[va_idx[:: max(1, len(va_idx) // 16)]].astype(np.float32)[:, None] / 255.0
    ref = sess.run(None, {sess.get_inputs()[0].name: xv})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(xv)).numpy()
    diff = float(np.abs(ref - got).max())
    probe = copy.deepcopy(model).train()  # training mode updates running statistics: not on the saved model
    with torch.no_grad():
        got_train = probe(x[:16]).numpy()
        ref_train = model(x[:16]).numpy()
    print(f"max |logit| difference to onnxruntime (eval mode, {len(xv)} validation slices): {diff:.2e}; "
          f"training mode vs eval mode on 16 of the statistics slices: {float(np.abs(got_train - ref_train).max()):.2e}")
    if diff > 1e-3:
        raise SystemExit("the rebuilt checkpoint does not reproduce the ONNX file")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    (args.out.parent / "arch.json").write_text(args.arch)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
