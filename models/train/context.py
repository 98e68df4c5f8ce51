"""Neighbour slices for the 2.5D input (train.py `--context`): [slice above | slice | slice below] as channels.

Every training set is a concatenation of series in slice order (covid19-ct-seg-256 in patient blocks, the real
negatives and the phantoms by series), so a slice's neighbours are the slices next to it in the same series. Two
things break that:
- covid19-ct-seg-256 dropped the slices without infection, so two files next to each other may be far apart in the
  body; a step whose images correlate below `BREAK_CORRELATION` (the same Pearson correlation split.py finds the
  patient blocks with) is treated as a gap, and no neighbour is taken across it;
- the slice spacing is not known for the PNG sets. A series whose consecutive slices correlate above
  `THIN_CORRELATION` (median) is thin-slice (about 1 mm: Coronacases, LUNA16, LungFCP); its neighbour is drawn 1 to
  `THIN_MAX_STEP` slices away in training and `THIN_EVAL_STEP` away in evaluation, so the neighbours sit a few mm
  away as on thick-slice (3–5 mm) series, where the neighbour is the next slice.
At a series end or a gap the missing neighbour is the slice itself (a single slice is [s | s | s]).
"""
from __future__ import annotations

import numpy as np

from models.train.split import consecutive_correlation

BREAK_CORRELATION = 0.6
THIN_CORRELATION = 0.9
THIN_MAX_STEP = 3
THIN_EVAL_STEP = 2


class Context:
    """Neighbour lookup for one set: `ct` (N x H x W u8, series in slice order), `group` (series id per slice)."""

    def __init__(self, ct: np.ndarray, group: np.ndarray):
        n = len(ct)
        group = np.asarray(group)
        corr = consecutive_correlation(ct)
        link = (group[1:] == group[:-1]) & (corr >= BREAK_CORRELATION)
        run = np.concatenate([[0], np.cumsum(~link)])  # runs of linked slices
        starts = np.flatnonzero(np.concatenate([[True], run[1:] != run[:-1]]))
        ends = np.concatenate([starts[1:] - 1, [n - 1]])
        self.lo = starts[run]
        self.hi = ends[run]
        self.thin = np.zeros(n, bool)
        for g in np.unique(group):
            m = np.flatnonzero(group == g)
            steps = corr[m[:-1]][link[m[:-1]]] if len(m) > 1 else np.array([])
            self.thin[m] = len(steps) > 0 and float(np.median(steps)) > THIN_CORRELATION
        self.n_runs = len(starts)

    def neighbours(self, i: int, step: int) -> tuple[int, int]:
        return max(i - step, int(self.lo[i])), min(i + step, int(self.hi[i]))

    def eval_step(self, i: int) -> int:
        return THIN_EVAL_STEP if self.thin[i] else 1

    def draw_step(self, i: int, rng: np.random.Generator) -> int:
        return int(rng.integers(1, THIN_MAX_STEP + 1)) if self.thin[i] else 1

    def stack(self, ct: np.ndarray, i: int, step: int) -> np.ndarray:
        """H x W x 3: above, the slice, below."""
        p, q = self.neighbours(i, step)
        return np.stack([ct[p], ct[i], ct[q]], -1)

    def inputs(self, ct: np.ndarray, idx) -> np.ndarray:
        """len(idx) x 3 x H x W u8 with the evaluation step."""
        idx = np.asarray(idx)
        out = np.empty((len(idx), 3) + ct.shape[1:], ct.dtype)
        for j, i in enumerate(idx):
            p, q = self.neighbours(int(i), self.eval_step(int(i)))
            out[j, 0], out[j, 1], out[j, 2] = ct[p], ct[i], ct[q]
        return out
