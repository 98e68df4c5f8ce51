"""The "minmax_clahe" input normalisation, shared by training and the Rust product (src/preprocess.rs).

A HU slice becomes model input by:
1. v = clip(hu, -1024, 3071)
2. per-slice min-max: u8 = round((v - lo) / (hi - lo) * 255), 0 when hi == lo
3. CLAHE (OpenCV, clipLimit 7.0, 8x8 tiles) at native resolution
4. resize to 256x256 with INTER_LINEAR
5. / 255.0 -> float32 in [0, 1]

The covid19-ct-seg-256 PNGs already went through steps 1-4 (8-bit min-max + CLAHE); for them
only step 5 applies (`png_to_input`).
"""
from __future__ import annotations

import cv2
import numpy as np

HU_CLIP = (-1024.0, 3071.0)
CLAHE_CLIP_LIMIT = 7.0
CLAHE_TILES = 8
SIZE = 256


def minmax_u8(hu: np.ndarray, hu_clip=HU_CLIP) -> np.ndarray:
    """Steps 1-2: clip to the HU window, per-slice min-max to uint8 (round half away from zero)."""
    v = np.clip(hu.astype(np.float64), hu_clip[0], hu_clip[1])
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return np.zeros(v.shape, np.uint8)
    scaled = (v - lo) / (hi - lo) * 255.0
    # values are >= 0 so floor(x + 0.5) is round-half-away-from-zero (what Rust's f64::round does)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def clahe_u8(u8: np.ndarray, clip_limit=CLAHE_CLIP_LIMIT, tiles=CLAHE_TILES) -> np.ndarray:
    """Step 3: OpenCV CLAHE at native resolution."""
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(u8)


def hu_to_u8(hu: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Steps 1-4: HU slice (H x W, any numeric dtype) -> 8-bit size x size image."""
    u8 = clahe_u8(minmax_u8(hu))
    if u8.shape != (size, size):
        u8 = cv2.resize(u8, (size, size), interpolation=cv2.INTER_LINEAR)
    return u8


def hu_to_input(hu: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Steps 1-5: HU slice -> float32 size x size in [0, 1] (the model's "ct" input, one channel)."""
    return hu_to_u8(hu, size).astype(np.float32) / 255.0


def png_to_input(u8: np.ndarray) -> np.ndarray:
    """Step 5 only, for the already normalised covid19-ct-seg-256 PNGs."""
    return u8.astype(np.float32) / 255.0


def resize_labels(labels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Nearest-neighbour resize of a label slice (u8 class ids) to size x size."""
    if labels.shape == (size, size):
        return labels
    return cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)
