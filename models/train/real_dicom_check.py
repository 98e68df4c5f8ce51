"""Issue 3's real-DICOM check: runs the shipped ONNX model (onnxruntime, the product's `minmax_clahe`
normalisation from normalise.py) over the uncompressed chest slices in $LUNGSENTRY_DATA/real-dicom
(LIDC-IDRI 2 slices, COVID-19-NY-SBU 20 slices), and for every slice reports whether both lungs were found
(a lung component of >= 1 % of the image on each side of the body's midline), lung area and volume per slice
(mL = area x slice thickness), lesion share of the lung, and writes an overlay PNG (input | lung blue,
lesion red) to --overlays for a person to look at.

    python models/train/real_dicom_check.py --overlays /tmp/overlays --json models/real_dicom_check.json

The Siemens J2K series is abdominal (and pydicom needs a JPEG 2000 plugin); the daemon's own test
(tests/e2e_serve.rs) covers its decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

import pydicom

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train.normalise import hu_to_input  # noqa: E402
from models.train.phantoms import read_hu  # noqa: E402

HERE = Path(__file__).resolve().parent
SETS = ["lidc-idri-2-slices", "covid19-ny-sbu-axial"]


def lungs_found(lung: np.ndarray) -> tuple[bool, bool]:
    """(left-of-image lung present, right-of-image lung present): a component >= 1 % of the image whose
    centroid lies on that side of the lung mask's own horizontal centre."""
    n, _, stats, cent = cv2.connectedComponentsWithStats(lung.astype(np.uint8), connectivity=8)
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 0.01 * lung.size]
    if not big:
        return False, False
    xs = np.nonzero(lung)[1]
    mid = (xs.min() + xs.max()) / 2.0
    return any(cent[i][0] < mid for i in big), any(cent[i][0] >= mid for i in big)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LUNGSENTRY_DATA", HERE.parent.parent.parent / "shared" / "data")))
    ap.add_argument("--model", type=Path, default=HERE.parent / "lungsentry-unet.onnx")
    ap.add_argument("--overlays", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.overlays.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"])
    rows = []
    for s in SETS:
        for f in sorted((args.data / "real-dicom" / s).glob("*.dcm")):
            ds = pydicom.dcmread(str(f))
            hu = read_hu(f)
            x = hu_to_input(hu)[None, None]
            logits = sess.run(None, {"ct": x})[0][0]
            cls = logits.argmax(0).astype(np.uint8)
            # back to native resolution the way the product does (nearest on the class map)
            native = cv2.resize(cls, (hu.shape[1], hu.shape[0]), interpolation=cv2.INTER_NEAREST)
            lung = native >= 1
            lesion = native == 2
            ps = [float(v) for v in ds.PixelSpacing]
            th = float(getattr(ds, "SliceThickness", 0) or 0)
            area_cm2 = lung.sum() * ps[0] * ps[1] / 100.0
            left, right = lungs_found(lung)
            row = dict(set=s, file=f.name, rows=int(hu.shape[0]), cols=int(hu.shape[1]), pixel_spacing=ps,
                       slice_thickness_mm=th, both_lungs_found=bool(left and right),
                       lung_area_cm2=round(area_cm2, 1), lung_ml_per_slice=round(area_cm2 * th / 10.0, 1),
                       lesion_percent_of_lung=round(100.0 * lesion.sum() / max(lung.sum(), 1), 2),
                       lesion_pixels=int(lesion.sum()))
            rows.append(row)
            img = (x[0, 0] * 255).astype(np.uint8)
            c = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            o = c.copy()
            o[cls == 1] = (0.6 * o[cls == 1] + [90, 0, 0]).astype(np.uint8)
            o[cls == 2] = (0.5 * o[cls == 2] + [0, 0, 127]).astype(np.uint8)
            cv2.imwrite(str(args.overlays / f"{s}--{f.stem}.png"), np.hstack([c, o]))
            print(f"{s}/{f.name}: both lungs {row['both_lungs_found']}, lung {row['lung_area_cm2']} cm2 "
                  f"({row['lung_ml_per_slice']} mL at {th} mm), lesion {row['lesion_percent_of_lung']} % of lung")
    summary = dict(model=str(args.model.name), slices=len(rows),
                   both_lungs_found=sum(r["both_lungs_found"] for r in rows), per_slice=rows)
    print(f"both lungs found on {summary['both_lungs_found']} of {len(rows)} chest slices")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
