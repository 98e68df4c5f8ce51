"""Synthetic HU phantom series from `lungsentry phantom`: generate, read, normalise, cache."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom

from models.train.normalise import hu_to_u8, resize_labels

SEVERITIES = ["none", "mild", "moderate", "severe"]


def read_hu(path: Path) -> np.ndarray:
    return hu_of(pydicom.dcmread(str(path)))


def hu_of(ds) -> np.ndarray:
    """A DICOM dataset's pixels in HU (slope/intercept; PixelPaddingValue -> -1024)."""
    px = ds.pixel_array
    stored = px.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    hu = stored * slope + intercept
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is not None:
        hu[px == pad] = -1024.0
    return hu


def truth_file(d: Path, name: str) -> Path:
    """A phantom folder's truth file: in its truth/ subfolder, or beside the DICOM files (older folders)."""
    sub = d / "truth" / name
    return sub if sub.exists() or not (d / name).exists() else d / name


def read_series(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HU slices z x y x x in file order, labels z x y x x). Files IM00001.dcm... are in label z order."""
    meta = json.loads(truth_file(d, "labels.json").read_text())
    # labels.json lists the DICOM files in labels.raw z order; fall back to name order
    files = [d / f for f in meta["files"]] if "files" in meta else sorted(d.glob("*.dcm"))
    z, y, x = meta["dims"]
    labels = np.fromfile(truth_file(d, "labels.raw"), dtype=np.uint8).reshape(z, y, x)
    hu = np.stack([read_hu(f) for f in files])
    assert hu.shape == labels.shape, (hu.shape, labels.shape)
    return hu, labels


def generate(binary: str, out: Path, seed: int, slices: int, size: int, severity: str) -> None:
    if truth_file(out, "labels.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([binary, "phantom", "--out", str(out), "--seed", str(seed), "--slices", str(slices),
                    "--size", str(size), "--severity", severity], check=True, capture_output=True)


def severity_for(k: int, none_every: int = 4) -> str:
    """Severity of the k-th series of a set: `none` every `none_every`-th series (k % none_every == 0), the
    others cycle mild/moderate/severe. none_every=4 is the v0.1.0 pattern (none/mild/moderate/severe)."""
    if k % none_every == 0:
        return "none"
    j = (k // none_every) * (none_every - 1) + (k % none_every) - 1
    return SEVERITIES[1 + j % 3]


def build_set(binary: str, root: Path, seeds: list[int], slices: int, size: int, none_every: int = 4) -> dict:
    """Generates (if missing) and normalises a phantom set; see `severity_for` for the severity pattern.

    Returns {"ct": u8 N x 256 x 256, "labels": u8 N x 256 x 256, "series": int N (series number),
    "severity": [str per series], "seeds": [...], "gt_involvement": [percent per series]}.
    """
    cts, labs, ser, sev, inv = [], [], [], [], []
    for k, seed in enumerate(seeds):
        s = severity_for(k, none_every)
        d = root / f"seed{seed}-{s}-{slices}x{size}"
        generate(binary, d, seed, slices, size, s)
        hu, lab = read_series(d)
        for i in range(len(hu)):
            cts.append(hu_to_u8(hu[i]))
            labs.append(resize_labels(lab[i]))
            ser.append(k)
        sev.append(s)
        lung = (lab >= 1).sum()
        inv.append(float(100.0 * (lab == 2).sum() / max(lung, 1)))
    return dict(ct=np.stack(cts), labels=np.stack(labs), series=np.array(ser), severity=sev, seeds=seeds,
                gt_involvement=inv)
