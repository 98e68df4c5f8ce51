"""Lesion-logit offset calibration on data that is neither training nor validation data.

    python models/train/calibrate.py --run models/train/runs/<run> --out-run models/train/runs/<run>-cal

The product takes argmax of the logits. Subtracting an offset d from the lesion logit (the head bias of class 2)
trades lesion sensitivity against false positives on lesion-free lungs without changing the ONNX contract.
d is chosen on held-out calibration phantoms (seeds 5000+, never trained on nor used for validation) plus the
real training patients, maximising the same score train.py uses to pick the best epoch:
real lesion Dice + phantom lesion Dice - 0.02 * max involvement error - fp_penalty * false-positive series.
Writes <out-run>/best.pt (bias adjusted), summary.json (with a `calibration` record) for export.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_real  # noqa: E402
from models.train import split as split_mod  # noqa: E402
from models.train.model import UNet, from_summary  # noqa: E402

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def logits_iter(model, u8, bs=16):
    for i in range(0, len(u8), bs):
        x = torch.from_numpy(u8[i:i + bs].astype(np.float32) / 255.0)[:, None]
        yield i, model(x)


def pred_with_offset(lg: torch.Tensor, d: float) -> torch.Tensor:
    lg = lg.clone()
    lg[:, 2] -= d
    return lg.argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out-run", type=Path, required=True)
    ap.add_argument("--calib", type=Path, default=HERE / "cache" / "phantoms-calib-12x40x512-none3.npz")
    ap.add_argument("--offsets", default="-1,-0.5,-0.25,0,0.25,0.5,0.75,1,1.5,2,2.5,3,4")
    ap.add_argument("--real-every", type=int, default=2, help="use every n-th real training slice")
    ap.add_argument("--fp-penalty", type=float, default=0.3)
    ap.add_argument("--fp-threshold", type=float, default=0.4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    offs = [float(x) for x in args.offsets.split(",")]

    summ = json.loads((args.run / "summary.json").read_text())
    model = from_summary(summ)
    model.load_state_dict(torch.load(args.run / "best.pt"))
    model.eval()

    ct, lab = data_real.load_real()
    tr_idx, _, _ = split_mod.split_indices(split_mod.load_split())
    ridx = tr_idx[::args.real_every]
    rc = {d: [0, 0] for d in offs}  # lesion |P&T|, |P|+|T|
    for i, lg in logits_iter(model, ct[ridx]):
        t = torch.from_numpy(lab[ridx[i:i + len(lg)]] == 2)
        for d in offs:
            p = pred_with_offset(lg, d) == 2
            rc[d][0] += int((p & t).sum()); rc[d][1] += int(p.sum() + t.sum())

    z = np.load(args.calib, allow_pickle=True)
    pct, plab, pser, psev = z["ct"], z["labels"], z["series"], list(z["severity"])
    ns = len(psev)
    les_c = {d: [0, 0] for d in offs}
    per = {d: np.zeros((ns, 2), np.int64) for d in offs}  # lesion px, lung px predicted per series
    truth = np.zeros((ns, 2), np.int64)
    for i, lg in logits_iter(model, pct):
        t = plab[i:i + len(lg)]
        s = pser[i:i + len(lg)]
        tl = torch.from_numpy(t == 2)
        lesion_series = torch.from_numpy(np.array([psev[k] != "none" for k in s]))[:, None, None]
        for k in np.unique(s):
            m = s == k
            truth[k] += [(t[m] == 2).sum(), (t[m] >= 1).sum()]
        for d in offs:
            p = pred_with_offset(lg, d)
            pl = (p == 2)
            les_c[d][0] += int((pl & tl & lesion_series).sum()); les_c[d][1] += int(((pl | tl) & lesion_series).sum() + (pl & tl & lesion_series).sum())
            for k in np.unique(s):
                m = torch.from_numpy(s == k)
                per[d][k] += [int((p[m] == 2).sum()), int((p[m] >= 1).sum())]
    res = []
    inv_t = 100.0 * truth[:, 0] / np.maximum(truth[:, 1], 1)
    for d in offs:
        inv_p = 100.0 * per[d][:, 0] / np.maximum(per[d][:, 1], 1)
        fp = int(sum(1 for k in range(ns) if psev[k] == "none" and inv_p[k] >= args.fp_threshold))
        r = dict(offset=d, real_train_lesion_dice=rc[d][0] * 2 / max(rc[d][1], 1),
                 calib_lesion_dice=les_c[d][0] * 2 / max(les_c[d][1], 1),
                 calib_max_inv_err=float(np.abs(inv_p - inv_t).max()), calib_fp_series=fp,
                 calib_none_max_inv=float(max(inv_p[k] for k in range(ns) if psev[k] == "none")))
        r["score"] = (r["real_train_lesion_dice"] + r["calib_lesion_dice"] - 0.02 * r["calib_max_inv_err"]
                      - args.fp_penalty * fp)
        res.append(r)
        print(json.dumps(r), flush=True)
    best = max(res, key=lambda r: r["score"])
    print("chosen", json.dumps(best))
    sd = model.state_dict()
    sd["head.bias"][2] -= best["offset"]
    args.out_run.mkdir(parents=True, exist_ok=True)
    torch.save(sd, args.out_run / "best.pt")
    summ["calibration"] = dict(lesion_logit_offset=best["offset"], chosen=best, grid=res,
                               calib_set=args.calib.name, real_every=args.real_every, source_run=str(args.run))
    (args.out_run / "summary.json").write_text(json.dumps(summ, indent=1))
    print(f"wrote {args.out_run}")


if __name__ == "__main__":
    main()
