"""One file holding everything train.py reads, for training where LUNGSENTRY_DATA, the phantom generator and the
caches are absent (the device machine: the git working tree and the carried files travel, 64 MiB in all).

    python models/train/device_pack.py                   # builds models/train/cache/device-pack.npz (~51 MiB)
    python models/train/train.py --config RUN.toml --pack models/train/cache/device-pack.npz --device cuda

The pack is an uncompressed .npz whose arrays are already compressed, one group of keys per part:
- `real`: covid19-ct-seg-256 (`data_real.load_real()`), all 1614 slices in their order (split.json, which is in
  git, indexes them);
- `neg-train`, `neg-val`: the lesion-free series (`data_negatives.load("train")`, `load("val")`);
- `phantoms-train-…`, `phantoms-long-…`, `phantoms-val-…`: the phantom caches train.py's `load_set` reads,
  named as their cache files; the training sets subsetted to every n-th series (--phantom-train-every,
  --phantom-long-every), the validation set whole.

Encoding. CT slices (u8 256 x 256, CLAHE-normalised, so full of fine noise that no lossless coder squeezes below
~45 KiB a slice: lzma of the real set alone is ~76 MiB) are WebP images (cv2.imencode; it beat JPEG by ~25 % in
size at the same mean absolute error on these slices, and JPEG 2000 by far): lossy at --train-quality for the
slices that are only trained on, at --val-quality for the validation slices (real validation patients of
split.json, the validation negatives and phantoms), so the checkpoint choice sees less of the loss; quality 101 is
lossless WebP. Labels (0 / 1 / 2) are lossless: the u8 array compressed with lzma. Per-series metadata (series
numbers, names, severities, seeds, involvement) is stored as is. `meta` (JSON) records what was chosen and the
measured mean absolute error of each part's CT.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
DEFAULT_PACK = CACHE / "device-pack.npz"
# The device tool carries at most 64 MiB in all: the working tree (tracked and untracked-not-ignored files, ~9 MiB
# now), the carried init checkpoint (~2 MiB for width 8 / 12) and the pack; keep a MiB spare for the tree to grow.
TRAVEL_MIB = 64.0
INIT_RESERVE_MIB = 2.5
SPARE_MIB = 1.0


def tree_mib() -> float:
    """The size of what git would send of the working tree: tracked plus untracked-not-ignored files."""
    root = HERE.parents[1]
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / f).stat().st_size for f in out.decode().split("\0") if f and (root / f).is_file()) / 2**20


def default_limit_mib() -> float:
    return TRAVEL_MIB - tree_mib() - INIT_RESERVE_MIB - SPARE_MIB
LOSSLESS = 101  # WebP quality above 100: lossless
PHANTOM_LISTS = ("severity", "seeds", "gt_involvement")  # per-series lists of a phantom set (load_set: .tolist())


# ---------------------------------------------------------------- encoding
def encode_ct(ct: np.ndarray, quality: np.ndarray | int, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u8 N x H x W -> (all slices' WebP bytes concatenated, N + 1 offsets); quality per slice or for all."""
    q = np.broadcast_to(np.asarray(quality), (len(ct),))

    def one(i: int) -> bytes:
        ok, buf = cv2.imencode(".webp", np.ascontiguousarray(ct[i]), [cv2.IMWRITE_WEBP_QUALITY, int(q[i])])
        if not ok:
            raise RuntimeError(f"WebP encoding of slice {i} failed")
        return buf.tobytes()

    with ThreadPoolExecutor(workers or os.cpu_count()) as ex:
        parts = list(ex.map(one, range(len(ct))))
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    return np.frombuffer(b"".join(parts), np.uint8), offsets


def decode_ct(blob: np.ndarray, offsets: np.ndarray, shape: tuple[int, int], workers: int | None = None) -> np.ndarray:
    """The inverse of encode_ct: u8 N x H x W."""
    out = np.empty((len(offsets) - 1, *shape), np.uint8)

    def one(i: int) -> None:
        img = cv2.imdecode(blob[offsets[i]:offsets[i + 1]], cv2.IMREAD_GRAYSCALE)
        if img is None or img.shape != shape:
            raise ValueError(f"slice {i} of the pack does not decode to {shape}")
        out[i] = img

    with ThreadPoolExecutor(workers or os.cpu_count()) as ex:
        list(ex.map(one, range(len(out))))
    return out


def encode_labels(labels: np.ndarray) -> np.ndarray:
    return np.frombuffer(lzma.compress(np.ascontiguousarray(labels, np.uint8).tobytes(), preset=6), np.uint8)


def decode_labels(blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(lzma.decompress(blob.tobytes()), np.uint8).reshape(shape).copy()


def pack_part(name: str, ct: np.ndarray, labels: np.ndarray, quality: np.ndarray | int,
              extra: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """One part's arrays (keys `name/...`) and its record for `meta` (slices, bytes, CT mean absolute error)."""
    blob, offsets = encode_ct(ct, quality)
    back = decode_ct(blob, offsets, ct.shape[1:])
    err = np.abs(back.astype(np.int16) - ct).reshape(len(ct), -1).mean(1)
    q = np.broadcast_to(np.asarray(quality), (len(ct),))
    arrays = {f"{name}/ct": blob, f"{name}/ct_offsets": offsets, f"{name}/labels": encode_labels(labels),
              f"{name}/shape": np.array(ct.shape, np.int64)}
    for k, v in (extra or {}).items():
        arrays[f"{name}/{k}"] = np.asarray(v)
    record = dict(slices=int(len(ct)), ct_bytes=int(blob.nbytes), label_bytes=int(arrays[f"{name}/labels"].nbytes),
                  qualities=sorted({int(x) for x in q}), ct_mean_abs_error=round(float(err.mean()), 3),
                  ct_mean_abs_error_by_quality={int(x): round(float(err[q == x].mean()), 3) for x in set(q.tolist())})
    return arrays, record


def write_pack(path: Path, parts: dict[str, dict[str, np.ndarray]], meta: dict) -> int:
    """Writes the pack (np.savez, uncompressed: the parts are compressed already); returns its size in bytes."""
    arrays = {k: v for part in parts.values() for k, v in part.items()}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path.stat().st_size


# ---------------------------------------------------------------- reading
class Pack:
    """A pack opened for train.py: each part decoded on request into the dicts the normal loaders return."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.z = np.load(self.path, allow_pickle=False)
        self.meta = json.loads(str(self.z["meta"]))
        self.parts = sorted({k.split("/")[0] for k in self.z.files if "/" in k})

    def _ct_labels(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.parts:
            raise KeyError(f"{self.path} holds no part `{name}` (it holds {self.parts}); rebuild it with "
                           f"device_pack.py and the options of this run")
        shape = tuple(int(s) for s in self.z[f"{name}/shape"])
        return (decode_ct(self.z[f"{name}/ct"], self.z[f"{name}/ct_offsets"], shape[1:]),
                decode_labels(self.z[f"{name}/labels"], shape))

    def real(self) -> tuple[np.ndarray, np.ndarray]:
        """As data_real.load_real(): (ct u8 N x 256 x 256, labels u8)."""
        return self._ct_labels("real")

    def negatives(self, which: str) -> dict:
        """As data_negatives.load(which): dict(ct, labels, series, names)."""
        ct, labels = self._ct_labels(f"neg-{which}")
        return dict(ct=ct, labels=labels, series=self.z[f"neg-{which}/series"],
                    names=self.z[f"neg-{which}/names"].tolist())

    def phantoms(self, cache_name: str) -> dict:
        """As train.py's load_set for the cache file `cache_name` (e.g. phantoms-train-40x40x512-none3): its
        subset of series, renumbered 0..k-1."""
        ct, labels = self._ct_labels(cache_name)
        d = dict(ct=ct, labels=labels, series=self.z[f"{cache_name}/series"])
        for k in PHANTOM_LISTS:
            d[k] = self.z[f"{cache_name}/{k}"].tolist()
        return d


# ---------------------------------------------------------------- building
def subset_series(d: dict, every: int) -> dict:
    """Every `every`-th series of a phantom set (series 0, every, 2 every, ...), renumbered 0..k-1."""
    keep = list(range(0, len(d["severity"]), every))
    if ("none" in d["severity"]) != ("none" in [d["severity"][i] for i in keep]) or (
            {s for s in d["severity"] if s != "none"} and all(d["severity"][i] == "none" for i in keep)):
        raise ValueError(f"every {every}-th series keeps only {sorted({d['severity'][i] for i in keep})} of "
                         f"{sorted(set(d['severity']))}: choose a step that is no multiple of the none-every pattern")
    mask = np.isin(d["series"], keep)
    renum = np.full(len(d["severity"]), -1, np.int64)
    renum[keep] = np.arange(len(keep))
    out = dict(ct=d["ct"][mask], labels=d["labels"][mask], series=renum[d["series"][mask]])
    for k in PHANTOM_LISTS:
        out[k] = [d[k][i] for i in keep]
    return out


def phantom_cache_name(name: str, series: int, slices: int, size: int, none_every: int) -> str:
    """The cache file stem train.py's load_set reads (without .npz)."""
    tag = "" if none_every == 4 else f"-none{none_every}"
    return f"phantoms-{name}-{series}x{slices}x{size}{tag}"


def build(args: argparse.Namespace) -> dict:
    from models.train import data_negatives, data_real
    from models.train import split as split_mod

    t0 = time.time()
    parts: dict[str, dict[str, np.ndarray]] = {}
    records: dict[str, dict] = {}

    def add(name: str, ct, labels, quality, extra=None) -> None:
        parts[name], records[name] = pack_part(name, ct, labels, quality, extra)
        r = records[name]
        print(f"{name}: {r['slices']} slices, CT {r['ct_bytes'] / 2**20:.2f} MiB (WebP quality {r['qualities']}, "
              f"mean abs error {r['ct_mean_abs_error_by_quality']}), labels {r['label_bytes'] / 2**20:.2f} MiB "
              f"({time.time() - t0:.0f} s)", flush=True)

    ct, lab = data_real.load_real()
    _, va_idx, _ = split_mod.split_indices(split_mod.load_split())
    q = np.full(len(ct), args.train_quality)
    q[va_idx] = args.val_quality
    add("real", ct, lab, q)
    for which, quality in (("train", args.train_quality), ("val", args.val_quality)):
        neg = data_negatives.load(which)
        add(f"neg-{which}", neg["ct"], neg["labels"], quality,
            dict(series=neg["series"], names=np.array(neg["names"])))
    sets = [("train", args.phantom_train_series, args.phantom_slices, args.phantom_train_every, args.train_quality),
            ("long", args.phantom_long_series, 120, args.phantom_long_every, args.train_quality),
            ("val", args.phantom_val_series, args.phantom_slices, 1, args.val_quality)]
    phantom_sets = {}
    for name, series, slices, every, quality in sets:
        if series == 0:
            continue
        stem = phantom_cache_name(name, series, slices, args.phantom_size, args.phantom_none_every)
        f = CACHE / f"{stem}.npz"
        if not f.exists():
            raise SystemExit(f"{f} is missing: run train.py with these phantom options once to build it")
        z = np.load(f, allow_pickle=True)
        d = subset_series({k: (z[k].tolist() if k in PHANTOM_LISTS else z[k]) for k in z.files}, every)
        add(stem, d["ct"], d["labels"], quality,
            dict(series=d["series"], severity=np.array(d["severity"]), seeds=np.array(d["seeds"], np.int64),
                 gt_involvement=np.array(d["gt_involvement"], np.float64)))
        phantom_sets[stem] = dict(every_nth_series=every, series=len(d["severity"]), of_series=series,
                                  severities=d["severity"])
    meta = dict(built=time.strftime("%Y-%m-%dT%H:%M:%S"), codec="webp", train_quality=args.train_quality,
                val_quality=args.val_quality, lossless_quality=LOSSLESS, labels="lzma u8", parts=records,
                phantom_sets=phantom_sets)
    size = write_pack(args.out, parts, meta)
    total = sum(r["ct_bytes"] + r["label_bytes"] for r in records.values())
    print(f"wrote {args.out}: {size / 2**20:.2f} MiB ({total / 2**20:.2f} MiB of parts) in {time.time() - t0:.0f} s")
    if size > args.limit_mib * 2**20:
        raise SystemExit(f"{args.out} is {size / 2**20:.2f} MiB, over the limit of {args.limit_mib} MiB: lower "
                         f"--train-quality / --val-quality or raise --phantom-train-every / --phantom-long-every "
                         f"(the device tool carries 64 MiB in all, working tree included)")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_PACK)
    ap.add_argument("--limit-mib", type=float, default=None,
                    help="fail when the pack is larger (default: 64 MiB less the working tree, 2.5 MiB for the "
                         "init checkpoint and 1 MiB spare)")
    ap.add_argument("--train-quality", type=int, default=40,
                    help="WebP quality of the CT slices only trained on (101: lossless)")
    ap.add_argument("--val-quality", type=int, default=70,
                    help="WebP quality of the validation CT slices (101: lossless)")
    ap.add_argument("--phantom-train-every", type=int, default=4, help="keep every n-th training phantom series")
    ap.add_argument("--phantom-long-every", type=int, default=4, help="keep every n-th long phantom series")
    # which phantom caches: train.py's options of the same names (the n10 / n12 recipe by default)
    ap.add_argument("--phantom-train-series", type=int, default=40)
    ap.add_argument("--phantom-long-series", type=int, default=12)
    ap.add_argument("--phantom-val-series", type=int, default=12)
    ap.add_argument("--phantom-slices", type=int, default=40)
    ap.add_argument("--phantom-size", type=int, default=512)
    ap.add_argument("--phantom-none-every", type=int, default=3)
    args = ap.parse_args()
    if args.limit_mib is None:
        args.limit_mib = round(default_limit_mib(), 2)
    print(f"limit {args.limit_mib} MiB", flush=True)
    build(args)


if __name__ == "__main__":
    main()
