#!/usr/bin/env python3
"""PyTorch CPU reference for `scripts/bench`: the shipped model run by PyTorch, ms/slice.

The ONNX file carries BatchNorm folded into the convolutions, so the network is rebuilt from
models/train/model.py (width and levels found by matching the ONNX weights' shapes), each convolution gets the
folded weight and bias from the ONNX initializers in execution order, and each BatchNorm becomes the identity.
The output is checked against onnxruntime on the same input before timing (max |difference| printed), so the
time is the shipped model's, not a look-alike's.

    scripts/bench_torch.py [--threads 2] [--slices 40]     # prints one JSON line

Exits 3 when PyTorch or onnx is not installed (bench then says "not installed").
"""
import argparse, json, os, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
except ImportError:
    sys.exit(3)
sys.path.insert(0, os.path.join(ROOT, "models", "train"))
from model import UNet  # noqa: E402


def convs_in_order(net):
    """(conv, following BatchNorm or None) in forward order."""
    seq = [net.stem]
    seq += list(net.enc)
    seq.append(net.bottom)
    out = []
    for s in seq:
        mods = list(s)
        out += [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, torch.nn.Conv2d)]
    for up, dec in zip(net.up, net.dec):
        out.append((up, None))
        mods = list(dec)
        out += [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, torch.nn.Conv2d)]
    out.append((net.up_full, None))
    mods = list(net.refine)
    out += [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, torch.nn.Conv2d)]
    out.append((net.head, None))
    return out


def load(path):
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    params = [[inits[n] for n in node.input[1:] if n in inits]
              for node in m.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    for width in (4, 8, 12, 16, 24, 32):
        for levels in (2, 3, 4, 5):
            net = UNet(width, levels).eval()
            pairs = convs_in_order(net)
            if len(pairs) != len(params) or any(p[0].shape != tuple(c.weight.shape) for (c, _), p in zip(pairs, params)):
                continue
            with torch.no_grad():
                for (conv, bn), p in zip(pairs, params):
                    conv.weight.copy_(torch.from_numpy(p[0].copy()))
                    if len(p) > 1:
                        if conv.bias is None:
                            conv.bias = torch.nn.Parameter(torch.from_numpy(p[1].copy()))
                        else:
                            conv.bias.copy_(torch.from_numpy(p[1].copy()))
                    if bn is not None:
                        bn.reset_parameters()
                        bn.eps = 0.0
            return net, width, levels
    sys.exit("no UNet(width, levels) in models/train/model.py matches the ONNX weights")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "lungsentry-unet.onnx"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    # Denormal activations make PyTorch's CPU kernels ~10x slower on this model; flushing them is the usual setting.
    torch.set_flush_denormal(True)
    net, width, levels = load(a.model)
    x = np.random.default_rng(7).random((1, 1, 256, 256), dtype=np.float32)
    diff = None
    try:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        ref = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"]).run(None, {"ct": x})[0]
        with torch.no_grad():
            diff = float(np.abs(net(torch.from_numpy(x)).numpy() - ref).max())
        if diff > 1e-3:
            sys.exit(f"PyTorch and onnxruntime disagree (max |diff| {diff}): not the same model")
    except ImportError:
        pass
    with torch.inference_mode():
        xs = torch.from_numpy(x)
        for _ in range(3):
            net(xs)
        t0 = time.perf_counter()
        for _ in range(a.slices):
            net(xs)
        ms = 1000 * (time.perf_counter() - t0) / a.slices
    print(json.dumps({"engine": f"pytorch {torch.__version__}", "ms_per_slice": round(ms, 2), "threads": a.threads,
                      "width": width, "levels": levels, "max_abs_diff_vs_onnxruntime": diff}))


if __name__ == "__main__":
    main()
