"""Where a model loses lesion Dice: the figures behind the model card's "Known limits".

    python models/train/error_analysis.py [--onnx models/lungsentry-unet.onnx] [--phantoms DIR ...] [--every 3]
        [--overlays DIR] [--json out.json]

Real validation patients (covid19-ct-seg-256, the split in split.json): per patient, lesion Dice and the missed
lesion pixels split by what the model called them (plain lung or background).

Phantom series (`lungsentry phantom` folders with labels.raw / lesion_ids.raw / truth.json; default: the fresh
acceptance set scripts/eval-phantoms writes, positive series only), every `--every`-th slice, through the product's
path (HU → minmax_clahe at 256², onnxruntime, each class map bilinearly back to native size, argmax):
- lesion Dice, and the resolution ceiling: the truth taken to 256² (area) and back (bilinear, argmax);
- missed truth lesion pixels within 2 px of a truth lesion edge ("edge") or deeper ("core"), and false lesion
  pixels near an edge or far from any — each as a share of the truth lesion pixels;
- missed lesion pixels called background, and per lesion class (ggo / consolidation / crazy_paving) the share of
  its voxels called background / lung / lesion.
`--overlays DIR` writes, per phantom series, the slice with most lesion called background (left: HU -1350…+150;
right: green hit, red missed as background, yellow missed as lung, magenta false lesion) and, per real validation
patient, its 4 worst slices (red missed, magenta false).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_real  # noqa: E402
from models.train import split as split_mod  # noqa: E402
from models.train.export import session  # noqa: E402
from models.train.normalise import hu_to_u8  # noqa: E402
from models.train.phantoms import read_series, truth_file  # noqa: E402
from models.train.train import dice  # noqa: E402

HERE = Path(__file__).resolve().parent


def probs(sess, x: np.ndarray, bs: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(x), bs):
        lg = sess.run(None, {"ct": x[i:i + bs]})[0]
        e = np.exp(lg - lg.max(1, keepdims=True))
        out.append(e / e.sum(1, keepdims=True))
    return np.concatenate(out)


def upsampled_argmax(p: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.stack([cv2.resize(p[c], (w, h), interpolation=cv2.INTER_LINEAR) for c in range(len(p))]).argmax(0)


def real_part(sess, overlays: Path | None) -> dict:
    ct, lab = data_real.load_real()
    _, _, per_patient = split_mod.split_indices(split_mod.load_split())
    out = {}
    for pid, idx in per_patient:
        pred = probs(sess, ct[idx].astype(np.float32)[:, None] / 255).argmax(1)
        t = lab[idx]
        miss = (t == 2) & (pred != 2)
        false = (t != 2) & (pred == 2)
        n_miss = int(miss.sum())
        out[pid] = dict(slices=len(idx), lesion_dice=round(dice(pred == 2, t == 2), 4),
                        lung_dice=round(dice(pred >= 1, t >= 1), 4), missed_pixels=n_miss,
                        false_pixels=int(false.sum()),
                        missed_called_lung=round(int((miss & (pred == 1)).sum()) / max(1, n_miss), 3),
                        missed_called_background=round(int((miss & (pred == 0)).sum()) / max(1, n_miss), 3))
        if overlays:
            bad = (miss | false).reshape(len(idx), -1).sum(1)
            tiles = []
            for k in np.argsort(-bad)[:4]:
                g = cv2.cvtColor(ct[idx[k]], cv2.COLOR_GRAY2BGR)
                ov = g.copy()
                ov[(t[k] == 2) & (pred[k] == 2)] = (0, 255, 0)
                ov[miss[k]] = (0, 0, 255)
                ov[false[k]] = (255, 0, 255)
                tiles.append(np.concatenate([g, cv2.addWeighted(g, 0.5, ov, 0.5, 0)], 0))
            cv2.imwrite(str(overlays / f"real-{pid}.png"), np.concatenate(tiles, 1))
    return out


def phantom_part(sess, dirs: list[Path], every: int, overlays: Path | None) -> dict:
    keys = ("truth", "pred", "inter", "ceiling_pred", "ceiling_inter", "miss_edge", "miss_core", "false_edge",
            "false_far", "miss_bg")
    pooled = dict.fromkeys(keys, 0)
    series = {}
    for d in dirs:
        hu, lab = read_series(d)
        ids = np.fromfile(truth_file(d, "lesion_ids.raw"), dtype="<u2").reshape(lab.shape)
        cls = {l["id"]: l["class"] for l in json.loads(truth_file(d, "truth.json").read_text())["lesions"]}
        sl = list(range(0, len(hu), every))
        hu, lab, ids = hu[sl], lab[sl], ids[sl]
        h, w = lab.shape[1:]
        p = probs(sess, np.stack([hu_to_u8(s) for s in hu]).astype(np.float32)[:, None] / 255)
        pred = np.stack([upsampled_argmax(q, h, w) for q in p])
        ceiling = []
        for t in lab:
            small = [cv2.resize((t == c).astype(np.float32), (256, 256), interpolation=cv2.INTER_AREA)
                     for c in range(3)]
            ceiling.append(upsampled_argmax(np.stack(small), h, w))
        ceiling = np.stack(ceiling)
        t2, p2 = lab == 2, pred == 2
        edge = np.stack([ndi.binary_dilation(m, iterations=2) & ~ndi.binary_erosion(m, iterations=2) for m in t2])
        miss, false = t2 & ~p2, ~t2 & p2
        c = dict(truth=int(t2.sum()), pred=int(p2.sum()), inter=int((t2 & p2).sum()),
                 ceiling_pred=int((ceiling == 2).sum()), ceiling_inter=int((t2 & (ceiling == 2)).sum()),
                 miss_edge=int((miss & edge).sum()), miss_core=int((miss & ~edge).sum()),
                 false_edge=int((false & edge).sum()), false_far=int((false & ~edge).sum()),
                 miss_bg=int((miss & (pred == 0)).sum()))
        for k in keys:
            pooled[k] += c[k]
        per_class = {}
        for name in ("ggo", "consolidation", "crazy_paving"):
            m = np.isin(ids, [k for k, v in cls.items() if v == name]) & t2
            if m.any():
                per_class[name] = {f"called_{n}": round(float(np.mean(pred[m] == v)), 3)
                                   for n, v in (("background", 0), ("lung", 1), ("lesion", 2))}
        series[d.name] = dict(summarise(c), per_class=per_class)
        if overlays:
            k = int(np.argmax((miss & (pred == 0)).reshape(len(sl), -1).sum(1)))
            g = cv2.cvtColor(np.clip((hu[k] + 1350) / 1500 * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            ov = g.copy()
            ov[t2[k] & p2[k]] = (0, 255, 0)
            ov[miss[k] & (pred[k] == 0)] = (0, 0, 255)
            ov[miss[k] & (pred[k] == 1)] = (0, 255, 255)
            ov[false[k]] = (255, 0, 255)
            cv2.imwrite(str(overlays / f"phantom-{d.name}-slice{sl[k]}.png"),
                        np.concatenate([g, cv2.addWeighted(g, 0.5, ov, 0.5, 0)], 1))
    return dict(pooled=summarise(pooled), series=series)


def summarise(c: dict) -> dict:
    t = max(1, c["truth"])
    return dict(lesion_dice=round(2 * c["inter"] / max(1, c["truth"] + c["pred"]), 4),
                resolution_ceiling_dice=round(2 * c["ceiling_inter"] / max(1, c["truth"] + c["ceiling_pred"]), 4),
                missed_edge=round(c["miss_edge"] / t, 3), missed_core=round(c["miss_core"] / t, 3),
                false_edge=round(c["false_edge"] / t, 3), false_far=round(c["false_far"] / t, 3),
                missed_called_background=round(c["miss_bg"] / t, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, default=HERE.parent / "lungsentry-unet.onnx")
    ap.add_argument("--phantoms", type=Path, nargs="*", default=None,
                    help="phantom series folders (default: the positive fresh series under "
                         "/tmp/lungsentry-eval-phantoms, written by scripts/eval-phantoms)")
    ap.add_argument("--every", type=int, default=3, help="use every n-th slice of each phantom series")
    ap.add_argument("--overlays", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sess = session(args.onnx, args.threads)
    dirs = args.phantoms
    if dirs is None:
        dirs = sorted(d for d in Path("/tmp/lungsentry-eval-phantoms").glob("seed*")
                      if "-none-" not in d.name and truth_file(d, "truth.json").exists())
    if args.overlays:
        args.overlays.mkdir(parents=True, exist_ok=True)
    rep = dict(onnx=str(args.onnx), real_validation=real_part(sess, args.overlays),
               phantoms=phantom_part(sess, dirs, args.every, args.overlays) if dirs else None)
    text = json.dumps(rep, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
