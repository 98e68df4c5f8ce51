"""Export a trained checkpoint to models/lungsentry-unet.onnx, verify it, measure it, write the manifest.

    python models/train/export.py --run models/train/runs/<run>

1. builds the U-Net from <run>/summary.json, loads <run>/best.pt, exports ONNX opset 17 (dynamic batch)
2. onnx.checker + onnxruntime vs PyTorch on real validation slices (max abs logit diff, argmax agreement)
3. CPU latency with onnxruntime, intra_op_num_threads=2, batch 1 and 8 (ms/slice)
4. validation figures computed with onnxruntime on the exported file -> models/validation.json
5. sha256 -> models/manifest.toml
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_real  # noqa: E402
from models.train.manifest import MANIFEST  # noqa: E402
from models.train import split as split_mod  # noqa: E402
from models.train.model import UNet, from_summary, count_params  # noqa: E402
from models.train.train import export_onnx, seg_metrics, dice  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_predict(s: ort.InferenceSession, u8: np.ndarray, bs: int = 8) -> np.ndarray:
    out = []
    for i in range(0, len(u8), bs):
        x = (u8[i:i + bs].astype(np.float32) / 255.0)[:, None]
        out.append(s.run(None, {"ct": x})[0].argmax(1).astype(np.uint8))
    return np.concatenate(out)


def latency(s: ort.InferenceSession, reps: int = 30) -> dict:
    res = {}
    for b in (1, 8):
        x = np.random.default_rng(0).random((b, 1, 256, 256), dtype=np.float32)
        for _ in range(3):
            s.run(None, {"ct": x})
        ts = []
        for _ in range(reps if b == 1 else max(4, reps // 4)):
            t0 = time.perf_counter()
            s.run(None, {"ct": x})
            ts.append(time.perf_counter() - t0)
        res[f"batch{b}_ms_per_slice_median"] = round(1000 * float(np.median(ts)) / b, 2)
        res[f"batch{b}_ms_per_slice_min"] = round(1000 * float(np.min(ts)) / b, 2)
    return res


def phantom_eval(s, ph: dict, fp_threshold: float) -> dict:
    pred = ort_predict(s, ph["ct"])
    lab = ph["labels"]
    series = []
    for k, sev in enumerate(ph["severity"]):
        m = ph["series"] == k
        p, t = pred[m], lab[m]
        ip = 100.0 * (p == 2).sum() / max((p >= 1).sum(), 1)
        it = 100.0 * (t == 2).sum() / max((t >= 1).sum(), 1)
        series.append(dict(seed=int(ph["seeds"][k]), severity=str(sev), slices=int(m.sum()),
                           lung_dice=dice(p >= 1, t >= 1), lesion_dice=dice(p == 2, t == 2),
                           involvement_pred_percent=round(float(ip), 3), involvement_true_percent=round(float(it), 3)))
    les = np.isin(ph["series"], [k for k, sv in enumerate(ph["severity"]) if sv != "none"])
    none = [x for x in series if x["severity"] == "none"]
    return dict(
        series_count=len(series), slices=int(len(lab)),
        lesion_dice_global=dice(pred[les] == 2, lab[les] == 2), lung_dice_global=dice(pred >= 1, lab >= 1),
        max_involvement_error_points=round(max(abs(x["involvement_pred_percent"] - x["involvement_true_percent"])
                                               for x in series), 3),
        fp_threshold_percent=fp_threshold,
        false_positive_series=sum(1 for x in none if x["involvement_pred_percent"] >= fp_threshold),
        none_series=len(none), series=series)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=MODELS / "lungsentry-unet.onnx")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--phantom-val", type=Path, default=None, help="phantom val cache .npz (default: newest in cache/)")
    ap.add_argument("--fp-threshold", type=float, default=0.4)
    ap.add_argument("--checkpoint", default="best.pt",
                    help="checkpoint file in the run folder (train.py keeps best.pt, last.pt and epochNNN.pt)")
    ap.add_argument("--width", type=int, default=8, help="only used when the run has no summary.json yet")
    ap.add_argument("--levels", type=int, default=4, help="only used when the run has no summary.json yet")
    args = ap.parse_args()
    torch.set_num_threads(2)

    sf = args.run / "summary.json"
    # a run still in progress has no summary yet: export its best checkpoint so far
    arch = args.run / "arch.json"
    summ = (json.loads(sf.read_text()) if sf.exists() else
            dict(json.loads(arch.read_text()), partial_run=True) if arch.exists() else
            dict(width=args.width, levels=args.levels, partial_run=True))
    model = from_summary(summ)
    if model.in_ch != 1:
        # The product feeds one normalised slice per inference (manifest input contract, src/preprocess.rs); a
        # 2.5D model (train.py --context) needs the neighbour slices too, which nothing in the product supplies yet.
        raise SystemExit(f"{args.run}: a {model.in_ch}-channel (2.5D, --context) model; the product's input "
                         "contract is one slice: not exportable as a product model")
    model.load_state_dict(torch.load(args.run / args.checkpoint))
    model.eval()
    export_onnx(model, args.out)
    onnx.checker.check_model(onnx.load(str(args.out)))
    nbytes = args.out.stat().st_size

    ct, lab = data_real.load_real()
    sp = split_mod.load_split()
    _, va_idx, per_patient = split_mod.split_indices(sp)
    s = session(args.out)

    # parity: onnxruntime vs PyTorch on 16 validation slices, batch 8 (dynamic batch exercised)
    pick = va_idx[np.linspace(0, len(va_idx) - 1, 16).astype(int)]
    x = (ct[pick].astype(np.float32) / 255.0)[:, None]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = np.concatenate([s.run(None, {"ct": x[i:i + 8]})[0] for i in range(0, 16, 8)])
    parity = dict(max_abs_diff=float(np.abs(ref - got).max()),
                  argmax_agreement=float((ref.argmax(1) == got.argmax(1)).mean()), slices=16)
    print("parity", parity, flush=True)
    assert parity["max_abs_diff"] < 1e-3, parity

    lat = latency(s)
    lat.update(threads=2, runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider",
               cpu=platform.processor() or platform.machine(), load_avg_1min_at_measure=round(os.getloadavg()[0], 2))
    print("latency", lat, flush=True)

    pred = ort_predict(s, ct[va_idx])
    real = dict(global_=seg_metrics(pred, lab[va_idx]), per_patient={})
    off = 0
    for pid, idx in per_patient:
        real["per_patient"][pid] = dict(seg_metrics(pred[off:off + len(idx)], lab[idx]),
                                        files=next(p["files"] for p in sp["patients"] if p["id"] == pid))
        off += len(idx)
    real["global"] = real.pop("global_")
    print("real val", json.dumps(real), flush=True)

    ph = None
    pv = args.phantom_val
    if pv is None:
        cands = sorted((HERE / "cache").glob("phantoms-val-*.npz"), key=lambda p: p.stat().st_mtime)
        pv = cands[-1] if cands else None
    if pv is not None and pv.exists():
        z = np.load(pv, allow_pickle=True)
        phd = {k: z[k] for k in z.files}
        ph = phantom_eval(s, phd, args.fp_threshold)
        ph["cache"] = pv.name
        print("phantom val", json.dumps({k: v for k, v in ph.items() if k != "series"}), flush=True)

    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    # manifest and report beside the exported file (models/ for the default --out; a candidate's own folder else)
    dest = args.out.parent
    (dest / "manifest.toml").write_text(MANIFEST.format(version=args.version, sha256=sha, file=args.out.name))
    val = dict(
        model=dict(name="lungsentry-unet", version=args.version, sha256=sha, file=args.out.name, bytes=nbytes,
                   params=count_params(model), width=summ["width"], levels=summ["levels"]),
        definitions=dict(
            lung="pixels labelled lung or lesion (lesion implies lung); prediction = argmax class >= 1",
            lesion="pixels labelled lesion (class 2); prediction = argmax class == 2",
            dice="2*|P&T| / (|P|+|T|), pooled over all slices of the set (global) or of one patient",
            input_real="covid19-ct-seg-256 PNG / 255 (already minmax+CLAHE)",
            input_phantom="lungsentry phantom DICOM HU -> minmax_clahe (normalise.py), labels nearest-resized to 256",
            involvement="100 * lesion pixels / lung pixels over the series, percent"),
        covid19_ct_seg_256_val=real,
        phantom_val=ph,
        onnx_vs_pytorch=parity,
        cpu_latency=lat,
        training=dict((k, summ[k]) for k in ("epochs", "batch", "lr", "seed", "phantoms", "phantom_fraction",
                                              "samples_per_epoch", "crop", "train_seconds", "threads", "best_epoch",
                                              "partial_run")
                      if k in summ),
    )
    (dest / "validation.json").write_text(json.dumps(val, indent=1) + "\n")
    print(f"wrote {args.out} ({nbytes} bytes, sha256 {sha}), {dest / 'manifest.toml'}, {dest / 'validation.json'}")


if __name__ == "__main__":
    main()
