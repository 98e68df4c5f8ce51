"""CPU latency of candidate widths/depths: onnxruntime, intra_op_num_threads=2, batch 1 and 8."""
import argparse, io, json, sys, time
from pathlib import Path

import numpy as np, torch, onnxruntime as ort

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train.model import UNet, count_params  # noqa: E402

def export_bytes(m):
    m.eval(); f = io.BytesIO()
    torch.onnx.export(m, torch.zeros(1, 1, 256, 256), f, input_names=["ct"], output_names=["scores"],
                      dynamic_axes={"ct": {0: "n"}, "scores": {0: "n"}}, opset_version=17, dynamo=False)
    return f.getvalue()

def bench_onnx(data, threads=2, reps=20):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    out = {}
    for b in (1, 8):
        x = np.random.rand(b, 1, 256, 256).astype(np.float32)
        for _ in range(3): s.run(None, {"ct": x})
        t = []
        for _ in range(reps if b == 1 else max(3, reps // 4)):
            t0 = time.perf_counter(); s.run(None, {"ct": x}); t.append(time.perf_counter() - t0)
        out[f"b{b}_ms_per_slice"] = round(1000 * float(np.median(t)) / b, 2)
    return out

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--configs", default="8x4,12x4,16x4")
    a = ap.parse_args()
    for c in a.configs.split(","):
        w, l = map(int, c.split("x"))
        m = UNet(w, l); d = export_bytes(m)
        r = dict(width=w, levels=l, params=count_params(m), onnx_bytes=len(d), **bench_onnx(d))
        print(json.dumps(r), flush=True)
