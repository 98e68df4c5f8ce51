"""Synthetic COVID-19-like lesions inserted into real lesion-free CT, in HU (train.py --insert-lesions).

Why: covid19-ct-seg-256, the only real lesion data with masks, comes as CLAHE'd 8-bit slices without HU, from 20
patients; the real negatives (data_negatives) bring real hila, vessels, domes and dependent lung from other scanners
but never a lesion. A model then learns "Ma et al. texture = lesion, other scanners = no lesion" as much as "lesion
vs anatomy". Inserting lesions into the real negatives, in HU and before the product's normalisation, puts lesions
on those very backgrounds, so anatomy (a vessel, a dome) and lesion meet in the same images with a mask for each.

A slice gets 1-4 lesions, centres drawn inside the classical lung mask, two thirds of them weighted towards the
pleura (COVID-19's peripheral, subpleural pattern). Each lesion is a smooth random blob (Gaussian-filtered noise
under a radial envelope, 5-36 px radius at 256 px, about 7-50 mm), clipped to the lung:
- ground glass (70 %): the aerated parenchyma (HU < -500) rises by 150-450 HU towards the blob's core, with a
  soft edge and a 15 % texture; vessels and bronchial walls inside keep their density (ground glass preserves
  them), and the result stays below -250 HU;
- consolidation (30 %): the blob's core moves to soft tissue (-40 to +60 HU, noise 15 HU), blended at the edge;
  pure air (HU < -950: bronchi) inside keeps half of it (air bronchograms).
The lesion label is where the envelope is at least 0.3 (what reads as changed on the image) inside the lung; as in the radiologist masks, vessels inside
a ground-glass patch are lesion too.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

MIN_LUNG_PX = 1500  # a slice with less classical lung than this (at 256 px) gets no lesion
LABEL_ENVELOPE = 0.3  # the lesion label: envelope at least this


def _blob(shape, centre, radius, rng) -> np.ndarray:
    """Envelope in [0, 1]: a radial falloff around `centre` deformed by smooth noise."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), max(2.0, radius / 2.5))
    noise /= max(1e-6, float(np.abs(noise).max()))
    sy, sx = rng.uniform(0.6, 1.4, 2)
    r = np.sqrt(((yy - centre[0]) / sy) ** 2 + ((xx - centre[1]) / sx) ** 2) / radius
    env = np.clip(1.3 - r + 0.45 * noise, 0.0, 1.0)
    return cv2.GaussianBlur(env, (0, 0), 1.2)


def insert(hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator, n_max: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(HU with lesions float32, lesion mask bool) for one 256 x 256 HU slice and its lung mask (bool). A slice
    with too little lung comes back unchanged with an empty mask."""
    out = hu.astype(np.float32).copy()
    lesion = np.zeros(hu.shape, bool)
    if lung.sum() < MIN_LUNG_PX:
        return out, lesion
    d = ndi.distance_transform_edt(lung)
    ys, xs = np.nonzero(lung)
    wp = np.exp(-d[ys, xs] / 8.0)
    wp /= wp.sum()
    for _ in range(int(rng.integers(1, n_max + 1))):
        k = rng.choice(len(ys), p=wp) if rng.random() < 2 / 3 else rng.integers(len(ys))
        env = _blob(hu.shape, (ys[k], xs[k]), float(rng.uniform(5, 36)), rng) * lung
        if rng.random() < 0.7:
            rise = rng.uniform(150, 450) * env * (1 + 0.15 * rng.standard_normal(hu.shape).astype(np.float32))
            parenchyma = out < -500
            out = np.where(parenchyma, np.minimum(out + rise, np.maximum(out, -250.0)), out)
        else:
            tissue = rng.uniform(-40, 60) + 15 * rng.standard_normal(hu.shape).astype(np.float32)
            a = np.clip(env * 1.6, 0, 1)
            air = out < -950
            a = np.where(air, a * 0.5, a)
            out = (1 - a) * out + a * tissue
        lesion |= (env >= LABEL_ENVELOPE) & lung
    return out.astype(np.float32), lesion
