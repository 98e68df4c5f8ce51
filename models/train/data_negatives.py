"""Real lesion-free CT for training and validation: normal chests from other sites, with classical lung masks.

Sources (all under LUNGSENTRY_DATA, see its README.md; none copied into the repo):
- `real-ct-series/luna16-normal-3/normal_patient_{1,2,3}/z_NNN.png`: LUNA16 chests, 8-bit lung window
  (HU = v x 1500 / 255 - 1350, so HU is clipped to [-1350, 150]), already 256 x 256.
- `real-ct-series/normal-pancreas-ct-cb-001/`, `real-ct-series/normal-acrin-flt-breast-001/series-{1,2}/`: DICOM
  series (HU), chest + upper abdomen.
- `real-dicom/lidc-idri-2-slices/`: two LIDC chest slices.
- `real-dicom/siemens-abdomen-j2k-series/`: a Siemens abdomen series (JPEG 2000: pylibjpeg-openjpeg decodes it).

Each slice goes through the product's input normalisation (`normalise.hu_to_u8`: the same HU -> clip -> min-max ->
CLAHE -> 256 path the daemon runs), and gets labels 0 background / 1 lung, never 2: these chests hold no lesion.

The lung mask is classical, in 3D over each series (`lung_mask_3d`), the way lungmask's authors and most
pre-deep-learning pipelines did it:
1. body: per slice, the largest component of HU > -500 with its holes filled (the lungs are holes in it), so the
   air around the patient and under the table is outside;
2. air: HU < -400 inside the body;
3. 3D components (6-connectivity) of that air eroded in-plane by 2 pixels, so a lung base and the stomach gas
   under it (a diaphragm thinner than a resampled pixel, or overlapping in x-y on adjacent slices) stay apart; the
   lungs (with trachea and bronchi) are the large ones: kept when at least 10 % of the largest component's volume
   and at least 5 mL (bowel gas and stomach air under the diaphragm are separate, smaller components), and with a
   mean HU above -925 (lung is air with tissue: -890 to -700 on these series after resampling to 256; gas in
   stomach and bowel -930 to -990, which also keeps an abdomen-only series free of "lung"); the kept
   cores grown back in-plane inside the air;
4. airways: per slice, a small (< 6 cm^2) component centred in the body (within 10 % of the body width of its
   centre) is trachea or a main bronchus and dropped (lung apices sit lateral to it);
5. per slice, a closing with a 3 x 3 kernel to smooth the border, and holes under 3 cm^2 filled (vessels inside
   the lung are lung, as in the radiologist masks of covid19-ct-seg-256; a liver dome or the heart ringed by lung is
   not).
`python data_negatives.py --overlays DIR` writes overlays of every 10th slice of each series to look at.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from scipy import ndimage as ndi

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train.normalise import hu_to_u8  # noqa: E402
from models.train.phantoms import hu_of  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"

# series: (name, kind, path relative to LUNGSENTRY_DATA); the split follows issue 26 (validation never trained on)
TRAIN = [
    ("luna16-normal_patient_1", "luna-png", "real-ct-series/luna16-normal-3/normal_patient_1"),
    ("luna16-normal_patient_2", "luna-png", "real-ct-series/luna16-normal-3/normal_patient_2"),
    ("acrin-flt-breast-001-series-1", "dicom", "real-ct-series/normal-acrin-flt-breast-001/series-1"),
    ("acrin-flt-breast-001-series-2", "dicom", "real-ct-series/normal-acrin-flt-breast-001/series-2"),
    ("lidc-idri-2-slices", "dicom", "real-dicom/lidc-idri-2-slices"),
    ("siemens-abdomen-j2k", "dicom", "real-dicom/siemens-abdomen-j2k-series"),
    ("totalseg-example-ct", "nifti", "real-ct-nifti/totalseg-example-ct.nii.gz"),
]
VAL = [
    ("luna16-normal_patient_3", "luna-png", "real-ct-series/luna16-normal-3/normal_patient_3"),
    ("pancreas-ct-cb-001", "dicom", "real-ct-series/normal-pancreas-ct-cb-001"),
]
LUNA_PIXEL_MM = 1.4  # LUNA16 pixels are ~0.7 mm at 512; these PNGs are 256 wide (assumption, areas only)

AIR_HU = -400.0
BODY_HU = -500.0
KEEP_FRACTION = 0.10
KEEP_MIN_ML = 5.0
AIRWAY_MAX_CM2 = 6.0
AIRWAY_CENTRE = 0.10
GAS_MEAN_HU = -925.0
ERODE_PX = 2
VESSEL_MAX_CM2 = 3.0


def data_root() -> Path:
    return Path(os.environ.get("LUNGSENTRY_DATA", str(HERE.parent.parent.parent / "shared" / "data")))


EXTRA_LIST = HERE / "extra_negatives.toml"


def extra_root() -> Path:
    """Where the fetched public series of `extra_negatives.toml` lie (never in the repo)."""
    return Path(os.environ.get("LUNGSENTRY_EXTRA_DATA", str(HERE.parent.parent.parent / "extra-data")))


def extra_series() -> list[tuple[str, str, Path]]:
    """The fetched lesion-free training series listed in `extra_negatives.toml` (source, commit and licence of
    each are recorded there and in the model card); all training, none validation. Empty when the folder is absent
    (a machine without the fetched data trains on LUNGSENTRY_DATA alone, and says so)."""
    if not EXTRA_LIST.exists() or not extra_root().is_dir():
        return []
    import tomllib
    with open(EXTRA_LIST, "rb") as f:
        listed = tomllib.load(f).get("series", [])
    return [(s["name"], s["kind"], extra_root() / s["path"]) for s in listed]


def sources(which: str) -> list[tuple[str, str, Path]]:
    """(name, kind, folder) of the lesion-free series for "train" or "val"."""
    if which == "val":
        return [(n, k, data_root() / r) for n, k, r in VAL]
    return [(n, k, data_root() / r) for n, k, r in TRAIN] + extra_series()


def load_dicom_series(d: Path):
    """(HU z x H x W sorted by position along the slice normal, pixel mm, slice mm)."""
    dss = [pydicom.dcmread(str(f)) for f in sorted(d.iterdir()) if f.is_file()]
    def pos(ds):
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        n = np.cross(o[:3], o[3:])
        return float(np.dot(n, [float(v) for v in ds.ImagePositionPatient]))
    dss.sort(key=pos)
    hu = np.stack([hu_of(ds) for ds in dss])
    pix = float(dss[0].PixelSpacing[0])
    p = [pos(ds) for ds in dss]
    dz = float(np.median(np.diff(p))) if len(p) > 1 else float(getattr(dss[0], "SliceThickness", 1.0))
    return hu, pix, abs(dz)


def load_luna(d: Path):
    """(HU z x 256 x 256 in z order, pixel mm (assumed), slice mm (assumed 1.25))."""
    files = sorted(d.glob("z_*.png"))
    v = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]).astype(np.float64)
    return v * 1500.0 / 255.0 - 1350.0, LUNA_PIXEL_MM, 1.25


def load_nifti(f: Path):
    """(HU z x H x W, axial slices in the display orientation the DICOM path gives, pixel mm, slice mm) of a NIfTI
    CT volume: reoriented to RAS, then each axial slice turned so rows run anterior -> posterior and columns
    patient right -> left (DICOM's LPS view)."""
    import nibabel as nib
    img = nib.as_closest_canonical(nib.load(str(f)))
    v = np.asarray(img.dataobj, dtype=np.float64)  # x (R), y (A), z (S)
    zooms = img.header.get_zooms()
    v = np.transpose(v, (2, 1, 0))[:, ::-1, ::-1]  # z, rows = -y (anterior first), cols = -x (right first)
    z, h, w = v.shape
    n = max(h, w)  # a scanner's field of view is square: pad the short side with air
    sq = np.full((z, n, n), -1024.0)
    sq[:, (n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = v
    return sq, float(zooms[0]), float(zooms[2])


def body_mask(hu2d: np.ndarray) -> np.ndarray:
    t = hu2d > BODY_HU
    t = ndi.binary_opening(t, iterations=2)
    lab, n = ndi.label(t)
    if n == 0:
        return np.zeros_like(t)
    sizes = ndi.sum(t, lab, range(1, n + 1))
    return ndi.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))


def fill_small_holes(m: np.ndarray, max_px: float) -> np.ndarray:
    """Holes of the mask smaller than max_px pixels filled (vessels); larger ones (a liver dome ringed by lung
    base, the heart) stay out."""
    holes, n = ndi.label(ndi.binary_fill_holes(m) & ~m)
    if n == 0:
        return m
    sizes = ndi.sum(holes > 0, holes, range(1, n + 1))
    small = [i + 1 for i, v in enumerate(sizes) if v <= max_px]
    return m | np.isin(holes, small)


def lung_mask_3d(hu: np.ndarray, pix_mm: float, dz_mm: float) -> np.ndarray:
    """Classical lung mask of a HU volume (z x H x W, any H x W); see the module doc."""
    body = np.stack([body_mask(s) for s in hu])
    air = (hu < AIR_HU) & body
    # components of the air eroded in-plane, so a lung base and the gas of the stomach under it (apart by a
    # diaphragm thinner than a pixel after resampling, or overlapping in x-y on adjacent slices) do not merge
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndi.generate_binary_structure(2, 1)
    core = ndi.binary_erosion(air, structure=plane, iterations=ERODE_PX)
    lab, n = ndi.label(core)
    if n == 0:
        return np.zeros_like(air)
    voxel_ml = pix_mm * pix_mm * dz_mm / 1000.0
    vols = ndi.sum(core, lab, range(1, n + 1)) * voxel_ml
    means = ndi.mean(hu, lab, range(1, n + 1))
    keep = [i + 1 for i, (v, m) in enumerate(zip(vols, means))
            if v >= KEEP_FRACTION * vols.max() and v >= KEEP_MIN_ML and m > GAS_MEAN_HU]
    # the kept cores grown back in-plane inside the air (geodesic dilation: never across soft tissue)
    lung = ndi.binary_dilation(np.isin(lab, keep), structure=plane, iterations=ERODE_PX + 1, mask=air)
    px_cm2 = pix_mm * pix_mm / 100.0
    out = np.zeros_like(lung)
    for z in range(len(hu)):
        sl = lung[z]
        if not sl.any():
            continue
        cols = np.flatnonzero(body[z].any(0))
        centre, width = (cols[0] + cols[-1]) / 2.0, max(1, cols[-1] - cols[0])
        l2, m = ndi.label(sl)
        for k in range(1, m + 1):
            comp = l2 == k
            area = comp.sum() * px_cm2
            cx = np.flatnonzero(comp.any(0)).mean()
            if area < AIRWAY_MAX_CM2 and abs(cx - centre) < AIRWAY_CENTRE * width:
                sl = sl & ~comp
        sl = ndi.binary_closing(sl, structure=np.ones((3, 3)), iterations=1) & body[z]
        out[z] = fill_small_holes(sl, VESSEL_MAX_CM2 / px_cm2)
    return out


def build_series(kind: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model-input u8 z x 256 x 256, labels u8 z x 256 x 256: 0 background / 1 lung, HU int16 z x 256 x 256 resampled
    as the lung mask sees it)."""
    if kind == "luna-png":
        hu, pix, dz = load_luna(path)
    elif kind == "nifti":
        hu, pix, dz = load_nifti(path)
    else:
        hu, pix, dz = load_dicom_series(path)
    u8 = np.stack([hu_to_u8(s) for s in hu])
    h, w = hu.shape[1:]
    hu256 = hu if (h, w) == (256, 256) else np.stack(
        [cv2.resize(s.astype(np.float32), (256, 256), interpolation=cv2.INTER_AREA) for s in hu])
    lung = lung_mask_3d(hu256, pix * w / 256.0, dz)
    return u8, lung.astype(np.uint8), np.clip(np.rint(hu256), -32768, 32767).astype(np.int16)


def load(which: str) -> dict:
    """which: "train" or "val" -> dict(ct u8 N x 256 x 256, labels u8, hu int16 N x 256 x 256, series int per slice,
    names list)."""
    CACHE.mkdir(exist_ok=True)
    src = sources(which)
    # the cache is named after the series it holds, so a changed list builds a new one
    # (and after the cache layout: "hu" joined it, hence the "hu" line)
    tag = hashlib.sha1("\n".join(["hu"] + [f"{n}|{k}|{p}" for n, k, p in src]).encode()).hexdigest()[:8]
    f = CACHE / f"negatives-{which}-{tag}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=True)
        return dict(ct=z["ct"], labels=z["labels"], hu=z["hu"], series=z["series"], names=z["names"].tolist())
    cts, labs, hus, ser, names = [], [], [], [], []
    for k, (name, kind, path) in enumerate(src):
        u8, lab, hu = build_series(kind, path)
        cts.append(u8)
        labs.append(lab)
        hus.append(hu)
        ser.append(np.full(len(u8), k))
        names.append(name)
    d = dict(ct=np.concatenate(cts), labels=np.concatenate(labs), hu=np.concatenate(hus), series=np.concatenate(ser),
             names=names)
    np.savez(f, ct=d["ct"], labels=d["labels"], hu=d["hu"], series=d["series"], names=np.array(names))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overlays", type=Path, help="write every --every-th slice with its lung outline here")
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    for which in ("train", "val"):
        d = load(which)
        for k, name in enumerate(d["names"]):
            m = d["series"] == k
            lung = d["labels"][m]
            print(f"{which} {name}: {int(m.sum())} slices, {int((lung.reshape(len(lung), -1).any(1)).sum())} with lung")
            if args.overlays:
                args.overlays.mkdir(parents=True, exist_ok=True)
                idx = np.flatnonzero(m)[::args.every]
                tiles = []
                for i in idx:
                    rgb = cv2.cvtColor(d["ct"][i], cv2.COLOR_GRAY2BGR)
                    rgb[d["labels"][i] == 1, 1] = 255  # lung tinted green
                    tiles.append(rgb)
                while len(tiles) % 6:
                    tiles.append(np.zeros_like(tiles[0]))
                rows = [np.concatenate(tiles[r:r + 6], 1) for r in range(0, len(tiles), 6)]
                cv2.imwrite(str(args.overlays / f"{which}-{name}.png"), np.concatenate(rows, 0))


if __name__ == "__main__":
    main()
