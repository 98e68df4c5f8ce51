"""Patient blocks of covid19-ct-seg-256 (detected, see README.md) and the deterministic train/val split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def consecutive_correlation(ct: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pearson correlation of slice i with slice i+1 (length N-1), in chunks (the phantom sets are large)."""
    out = np.empty(max(len(ct) - 1, 0), np.float32)
    prev = None
    for a in range(0, len(ct), chunk):
        x = ct[a:a + chunk].reshape(min(chunk, len(ct) - a), -1).astype(np.float32)
        x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
        if prev is not None:
            out[a - 1] = (prev * x[0]).mean()
        if len(x) > 1:
            out[a:a + len(x) - 1] = (x[1:] * x[:-1]).mean(1)
        prev = x[-1]
    return out


def detect_boundaries(ct: np.ndarray, labels: np.ndarray, n_patients: int = 20) -> list[int]:
    """First slice index of each patient block, from drops in consecutive similarity.

    Score of the step i-1 -> i = image correlation + lung-mask IoU; a new patient is a sharp drop. The
    n_patients - 1 lowest scores are the boundaries. The result was checked by eye (README.md): it
    matches the block starts listed in split.json.
    """
    corr = consecutive_correlation(ct)
    m = (labels > 0).reshape(len(labels), -1)
    iou = (m[1:] & m[:-1]).sum(1) / np.maximum((m[1:] | m[:-1]).sum(1), 1)
    # normalise each step by its local context so thick-slice (noisier) series are judged fairly
    score = corr + iou
    local = np.array([np.median(score[max(0, i - 6):i + 7]) for i in range(len(score))])
    rel = score / np.maximum(local, 1e-3)
    order = np.argsort(rel)
    chosen: list[int] = []
    for i in order:
        b = int(i) + 1
        if all(abs(b - c) > 1 for c in chosen):
            chosen.append(b)
        if len(chosen) == n_patients - 1:
            break
    return [0] + sorted(chosen)


def load_split() -> dict:
    return json.loads((HERE / "split.json").read_text())


def split_indices(split: dict) -> tuple[np.ndarray, np.ndarray, list[tuple[str, np.ndarray]]]:
    """(train indices, val indices, [(patient id, indices) for each val patient])."""
    tr, va, per = [], [], []
    for p in split["patients"]:
        idx = np.arange(p["first"], p["last"] + 1)
        if p["set"] == "train":
            tr.append(idx)
        else:
            va.append(idx)
            per.append((p["id"], idx))
    return np.concatenate(tr), np.concatenate(va), per
