"""covid19-ct-seg-256: load slices + masks, detect the 20 patient blocks, deterministic split."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


def data_root() -> Path:
    return Path(os.environ.get("LUNGSENTRY_DATA", str(HERE.parent.parent.parent / "shared" / "data")))


def load_real(root: Path | None = None):
    """Returns (ct u8 N x 256 x 256, labels u8 N x 256 x 256 with 0 bg / 1 lung / 2 lesion)."""
    root = (root or data_root()) / "covid19-ct-seg-256"
    CACHE.mkdir(exist_ok=True)
    cache = CACHE / "real.npz"
    if cache.exists():
        z = np.load(cache)
        return z["ct"], z["labels"]
    names = sorted(p.name for p in (root / "ct").glob("*.png"))
    cts, labs = [], []
    for n in names:
        ct = cv2.imread(str(root / "ct" / n), cv2.IMREAD_GRAYSCALE)
        lung = cv2.imread(str(root / "lungs" / n), cv2.IMREAD_GRAYSCALE) > 127
        les = cv2.imread(str(root / "covid" / n), cv2.IMREAD_GRAYSCALE) > 127
        lab = np.zeros(ct.shape, np.uint8)
        lab[lung] = 1
        lab[les] = 2  # lesion implies lung
        cts.append(ct)
        labs.append(lab)
    ct = np.stack(cts)
    labels = np.stack(labs)
    np.savez(cache, ct=ct, labels=labels)
    return ct, labels
