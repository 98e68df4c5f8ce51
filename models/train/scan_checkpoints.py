"""Score checkpoints on the validation normals as the product would count them, without exporting each one.

    python models/train/scan_checkpoints.py models/train/runs/n11/epoch00{1,2,3}.pt [--floor -700] [--no-partial-volume]

For each checkpoint (2D or 2.5D, the architecture from its run folder's arch.json): the 2D PyTorch prediction on the lesion-free
validation series of `data_negatives.load("val")` (LUNA16 normal_patient_3, Pancreas-CT-CB-001), then
- the HU floor (`analysis.lesion_min_hu`): lesion pixels less dense than --floor count as lung;
- the partial-volume rule (`analysis.partial_volume_rule`, `PARTIAL_VOLUME_FRACTION` = 0.9): a 3D lesion component
  (26-connectivity) at least 90 % of whose voxels have no lung (model lung or lesion) in the slice below is lung.
  Both validation series are stored foot to head (index + 1 = towards the head), as `data_negatives` sorts DICOM by
  position along the slice normal and the LUNA16 PNGs run that way;
and prints per series the involvement without / with the rule (lesion / lung pixels, percent) and the slice
specificity (a slice with fewer than 5 lesion pixels is negative). No 3D lung guard and 256-pixel masks, so the
figures are close to, not equal to, `scripts/eval-real`'s (0.93x its pancreas figure on the three checked).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

if __spec__ is None:  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_negatives  # noqa: E402
from models.train import train as T  # noqa: E402
from models.train.context import Context  # noqa: E402
from models.train.model import UNet, from_summary  # noqa: E402

PARTIAL_VOLUME_FRACTION = 0.9  # as src/analysis/series.rs


def partial_volume(pred: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """`lesion` (z x H x W, foot to head) less the components resting on non-lung in the slice below."""
    below = np.zeros(pred.shape, bool)
    below[1:] = pred[:-1] == 0
    lab, n = ndi.label(lesion, np.ones((3, 3, 3), bool))
    if n == 0:
        return lesion
    on = np.asarray(ndi.sum(below & lesion, lab, range(1, n + 1)))
    tot = np.asarray(ndi.sum(lesion, lab, range(1, n + 1)))
    return lesion & ~np.isin(lab, np.flatnonzero(on >= PARTIAL_VOLUME_FRACTION * tot) + 1)


def load(path: Path) -> UNet:
    """A run's checkpoint with the architecture its run folder records (arch.json, as export.py reads it)."""
    m = from_summary(json.loads((path.parent / "arch.json").read_text()))
    m.load_state_dict(torch.load(path, map_location="cpu"))
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--floor", type=float, default=-700.0, help="lesion_min_hu, HU")
    ap.add_argument("--no-partial-volume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    neg = data_negatives.load("val")
    ctx = None
    for ck in args.checkpoints:
        m = load(ck)
        if m.in_ch == 3 and ctx is None:
            ctx = Context(neg["ct"], neg["series"])
        pred = T.predict(m, T.inputs(neg["ct"], ctx if m.in_ch == 3 else None))
        out = [str(ck)]
        for k, name in enumerate(neg["names"]):
            idx = neg["series"] == k
            p = pred[idx]
            les = (p == 2) & (neg["hu"][idx] >= args.floor)
            kept = les if args.no_partial_volume else partial_volume(p, les)
            before, after = T.negative_figures(p, les), T.negative_figures(p, kept)
            out.append(f"{name}: {before['involvement']:.3f} % -> {after['involvement']:.3f} %, "
                       f"slice spec {after['slice_specificity']:.3f}")
        print(" | ".join(out), flush=True)


if __name__ == "__main__":
    main()
