"""Train the lungsentry U-Net (one command; see README.md) and export models/lungsentry-unet.onnx.

    python models/train/train.py --config models/train/runs/<run>.toml [--option value ...]
    python -m models.train.train --epochs 40 [--phantoms] [--width 8 --levels 4]

A run file holds one run's options (options.py says how); options on the command line override it.

Real data: covid19-ct-seg-256 (LUNGSENTRY_DATA), patient-level split from split.json.
Phantoms (--phantoms): `lungsentry phantom` series, generated outside the repo (--phantom-cache).
With --pack FILE all three (real, negatives, phantoms) come from one device pack (device_pack.py) instead: no
LUNGSENTRY_DATA, phantom generator or cache needed. --device cuda trains on a GPU (README.md, "Training on the
device machine").
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

if __spec__ is None:  # run as a file (not with python -m): make the package models.train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.train import data_real  # noqa: E402
from models.train import lesion_insert  # noqa: E402
from models.train import split as split_mod  # noqa: E402
from models.train.context import Context  # noqa: E402
from models.train.model import UNet, context_from, count_params, widen_from  # noqa: E402
from models.train.normalise import hu_to_u8  # noqa: E402
from models.train.options import as_json, parse_args  # noqa: E402

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- augmentation
def elastic(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement field (Gaussian-filtered noise, sigma 16 px, peak 4–10 px): image linear,
    labels nearest."""
    h, w = lab.shape
    alpha = rng.uniform(4.0, 10.0)
    d = [cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), 16.0) for _ in range(2)]
    d = [x * (alpha / max(1e-6, float(np.abs(x).max()))) for x in d]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, my = gx + d[0], gy + d[1]
    img = cv2.remap(np.ascontiguousarray(img), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    lab = cv2.remap(np.ascontiguousarray(lab), mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
    return img, lab


def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator,
            elastic_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """img float32 [0,1] 256x256 (or 256x256xC: neighbour slices, moved together), lab u8. Geometry (flips, rotation,
    scale, shift, optionally elastic) + intensity mapping perturbations (gamma, contrast, blur, noise) so PNG-set and
    HU-pipeline inputs both look familiar."""
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if rng.random() < 0.5:
        img, lab = img[::-1], lab[::-1]
    if rng.random() < 0.7:
        ang = rng.uniform(-15, 15)
        sc = rng.uniform(0.85, 1.15)
        tx, ty = rng.uniform(-12, 12, 2)
        M = cv2.getRotationMatrix2D((128, 128), ang, sc)
        M[:, 2] += (tx, ty)
        border = float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
        img = cv2.warpAffine(np.ascontiguousarray(img), M, (256, 256), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(border,) * (img.shape[2] if img.ndim == 3 else 1))
        lab = cv2.warpAffine(np.ascontiguousarray(lab), M, (256, 256), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    img = np.ascontiguousarray(img, dtype=np.float32)
    if elastic_p > 0 and rng.random() < elastic_p:
        img, lab = elastic(img, lab, rng)
    if rng.random() < 0.5:
        img = np.power(np.clip(img, 0, 1), rng.uniform(0.7, 1.5)).astype(np.float32)
    if rng.random() < 0.5:
        c, b = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08)
        img = (img - 0.5) * c + 0.5 + b
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), np.ascontiguousarray(lab)


# ---------------------------------------------------------------- loss and metrics
AERATED = 3  # label of aerated lung on a lesion-free series (--aerated-below-hu): lung and lesion are both right
BORDER = 4  # label of the tissue rim around a lesion-free series' classical lung (--border-band-px): lung or background


def pixel_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy over labels 0 background / 1 lung / 2 lesion, and the partial labels AERATED "lung or
    lesion" (-log(p_lung + p_lesion)) and BORDER "background or lung" (-log(p_background + p_lung))."""
    lse = torch.logsumexp(logits, 1)
    ce = lse - logits.gather(1, y.clamp(max=2)[:, None])[:, 0]
    ce = torch.where(y == AERATED, lse - torch.logsumexp(logits[:, 1:3], 1), ce)
    return torch.where(y == BORDER, lse - torch.logsumexp(logits[:, 0:2], 1), ce)


def lung_label(y):
    """Pixels labelled lung (lung, lesion or aerated lung; not the BORDER rim), for numpy arrays and tensors."""
    return (y >= 1) & (y <= 3)


def dice_ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ce = pixel_ce(logits, y).mean()
    p = logits.softmax(1)
    # soft Dice on the nested regions the product reports: lung (= lung or lesion) and lesion; an AERATED pixel is
    # lung, and left out of the lesion Dice (either answer is right there)
    rim = (y != BORDER).float()  # either answer is right on the BORDER rim: out of the lung Dice
    p_lung = (p[:, 1] + p[:, 2]) * rim
    t_lung = lung_label(y).float()
    judged = (y != AERATED).float()
    p_les = p[:, 2] * judged
    t_les = (y == 2).float()
    def sdice(a, b):
        inter = (a * b).sum()
        return 1 - (2 * inter + 1) / (a.sum() + b.sum() + 1)
    return ce + 0.5 * sdice(p_lung, t_lung) + 1.0 * sdice(p_les, t_les)


def error_weighted_ce(logits: torch.Tensor, y: torch.Tensor, fp_weight: float, fn_weight: float) -> torch.Tensor:
    """Cross-entropy whose pixels the model currently gets wrong on lesion count more: a pixel called lesion
    (argmax) that is not lesion weighs fp_weight, a lesion pixel not called lesion weighs fn_weight, others 1.
    On lesion-free slices this is where a hilar vessel or a dependent density is read as lesion; on lesion slices
    where ground glass is read as lung."""
    with torch.no_grad():
        called = logits.argmax(1) == 2
        truth = y == 2
        w = torch.ones_like(logits[:, 0])
        w[called & ~truth & (y != AERATED)] = fp_weight
        w[~called & truth] = fn_weight
    return (pixel_ce(logits, y) * w).sum() / w.sum()


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    s = int(pred.sum()) + int(truth.sum())
    if s == 0:
        return None
    return 2.0 * int((pred & truth).sum()) / s


AMP = [False]  # --amp: bf16 autocast of the forward passes on cuda (set by main)


def autocast(device: torch.device):
    """bf16 autocast on cuda with --amp, else nothing."""
    if AMP[0] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(name: str) -> torch.device:
    """--device: cpu, cuda, or auto (cuda where PyTorch sees a GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device")
    return torch.device(name)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as CPU tensors (what checkpoints hold, whatever the device)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict(model: UNet, x_u8: np.ndarray, bs: int = 16) -> np.ndarray:
    """Labels (argmax) of u8 slices (N x H x W, or N x C x H x W with neighbour channels), on the model's device;
    a CPU numpy array."""
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cuda":
        bs = max(bs, 128)  # larger batches on the GPU (eval mode: a slice's result does not depend on its batch)
    out = []
    for i in range(0, len(x_u8), bs):
        x = torch.from_numpy(x_u8[i:i + bs].astype(np.float32) / 255.0)
        if x.dim() == 3:
            x = x[:, None]
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(x)
        out.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def seg_metrics(pred: np.ndarray, lab: np.ndarray) -> dict:
    return dict(lung_dice=dice(pred >= 1, lab >= 1), lesion_dice=dice(pred == 2, lab == 2), slices=int(len(lab)))


def inputs(ct: np.ndarray, ctx: Context | None, idx=None) -> np.ndarray:
    """The model's input for slices idx (default: all) of a set: the slices, or with --context (`ctx`) the slices
    and their neighbours."""
    if ctx is None:
        return ct if idx is None else ct[idx]
    return ctx.inputs(ct, np.arange(len(ct)) if idx is None else idx)


def set_inputs(d: dict, idx=None) -> np.ndarray:
    """`inputs` of a set held as a dict (phantoms, negatives: "ct", and "ctx" with --context)."""
    return inputs(d["ct"], d.get("ctx"), idx)


def eval_real(model, ct, lab, val_idx, per_patient, ctx: Context | None = None) -> dict:
    pred = predict(model, inputs(ct, ctx, val_idx))
    res = dict(global_=seg_metrics(pred, lab[val_idx]), per_patient={})
    off = 0
    for pid, idx in per_patient:
        p = pred[off:off + len(idx)]
        off += len(idx)
        res["per_patient"][pid] = seg_metrics(p, lab[idx])
    res["global"] = res.pop("global_")
    return res


def eval_phantoms(model, ph: dict, fp_threshold: float = 0.4) -> dict:
    pred = predict(model, set_inputs(ph))
    lab = ph["labels"]
    series = []
    for k, sev in enumerate(ph["severity"]):
        m = ph["series"] == k
        p, t = pred[m], lab[m]
        inv_pred = 100.0 * (p == 2).sum() / max((p >= 1).sum(), 1)
        inv_true = 100.0 * (t == 2).sum() / max((t >= 1).sum(), 1)
        series.append(dict(seed=int(ph["seeds"][k]), severity=sev, lung_dice=dice(p >= 1, t >= 1),
                           lesion_dice=dice(p == 2, t == 2), involvement_pred=round(float(inv_pred), 3),
                           involvement_true=round(float(inv_true), 3)))
    les = [s for s in series if s["severity"] != "none"]
    none = [s for s in series if s["severity"] == "none"]
    return dict(
        global_lesion_dice=dice(pred[np.isin(ph["series"], [k for k, s in enumerate(ph["severity"]) if s != "none"])] == 2,
                                lab[np.isin(ph["series"], [k for k, s in enumerate(ph["severity"]) if s != "none"])] == 2),
        global_lung_dice=dice(pred >= 1, lab >= 1),
        max_involvement_error_points=max([abs(s["involvement_pred"] - s["involvement_true"]) for s in series] or [0]),
        false_positive_series=sum(1 for s in none if s["involvement_pred"] >= fp_threshold),
        none_series=len(none), lesion_series=len(les), fp_threshold_percent=fp_threshold,
        **slice_figures(pred, lab), series=series)


def counted_lesion(pred: np.ndarray, neg: dict) -> np.ndarray:
    """The lesion pixels of a prediction on lesion-free series that count: with --aerated-below-hu (as the product's
    lesion_min_hu) not those on aerated lung, which the product counts as lung."""
    called = pred == 2
    return called & ~neg["aerated"] if "aerated" in neg else called


def eval_negatives(model, neg: dict, min_pixels: int = 5) -> dict:
    """Real lesion-free series (data_negatives): per series the involvement (lesion / lung pixels over the whole
    series, no 3D guard; with --aerated-below-hu lesion only at or above it) and the slice specificity (a slice is
    positive with at least `min_pixels` lesion pixels)."""
    pred = predict(model, set_inputs(neg))
    called = counted_lesion(pred, neg)
    out = {}
    for k, name in enumerate(neg["names"]):
        idx = neg["series"] == k
        out[name] = dict(**negative_figures(pred[idx], called[idx], min_pixels),
                         lung_dice=dice(pred[idx] >= 1, lung_label(neg["labels"][idx])))
    return out


def negative_figures(pred: np.ndarray, lesion: np.ndarray, min_pixels: int = 5) -> dict:
    """One lesion-free series' figures from its prediction (z x H x W classes) and the lesion pixels that count:
    involvement (lesion over lung pixels, percent) and slice specificity (a slice is positive with at least
    `min_pixels` lesion pixels)."""
    les = lesion.reshape(len(lesion), -1).sum(1)
    return dict(involvement=round(100.0 * float(les.sum()) / max(int((pred >= 1).sum()), 1), 3),
                slice_specificity=round(float((les < min_pixels).mean()), 4))


def slice_figures(pred: np.ndarray, lab: np.ndarray, min_pixels: int = 5) -> dict:
    """The paper's slice-level figures: a slice is positive with at least `min_pixels` lesion pixels; per-slice
    lesion IoU is 1 for a lesion-free slice with no prediction and 0 for a false positive."""
    p_les = (pred == 2).reshape(len(pred), -1)
    t_les = (lab == 2).reshape(len(lab), -1)
    pos_pred = p_les.sum(1) >= min_pixels
    pos_true = t_les.any(1)
    inter = (p_les & t_les).sum(1)
    union = (p_les | t_les).sum(1)
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    iou = np.where(~pos_true & pos_pred, 0.0, iou)
    neg = ~pos_true
    return dict(slice_specificity=float((~pos_pred[neg]).mean()) if neg.any() else None,
                slice_sensitivity=float(pos_pred[pos_true].mean()) if pos_true.any() else None,
                mean_iou=float(iou.mean()))


# ---------------------------------------------------------------- export
def export_onnx(model: UNet, path: Path) -> None:
    model.eval()
    torch.onnx.export(model, torch.zeros(1, model.in_ch, 256, 256), str(path), input_names=["ct"],
                      output_names=["scores"], dynamic_axes={"ct": {0: "n"}, "scores": {0: "n"}}, opset_version=17,
                      dynamo=False, do_constant_folding=True)


def main() -> None:
    args = parse_args(description=__doc__)
    if args.print_args:
        print(as_json(args))
        return
    if args.run is None:
        args.run = HERE / "runs" / time.strftime("%Y%m%d-%H%M%S")

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    AMP[0] = bool(args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # two input sizes (crop, full 256) and the eval batch: tuned once each
    args.run.mkdir(parents=True, exist_ok=True)
    log = open(args.run / "log.txt", "a")

    def say(*a):
        line = " ".join(str(x) for x in a)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    if args.data:
        os.environ["LUNGSENTRY_DATA"] = str(args.data)
    pack = None
    if args.pack is not None:
        from models.train.device_pack import Pack
        t0 = time.time()
        pack = Pack(args.pack)
        ct, lab = pack.real()
        say(f"pack {args.pack}: parts {pack.parts} (real decoded in {time.time() - t0:.0f} s)")
    else:
        ct, lab = data_real.load_real()
    sp = split_mod.load_split()
    tr_idx, va_idx, per_patient = split_mod.split_indices(sp)
    say(f"real: {len(ct)} slices, train {len(tr_idx)}, val {len(va_idx)} ({[p for p, _ in per_patient]})")
    real_groups = None  # with --real-source-balance: the training slices of each source group
    if args.real_source_balance:
        groups: dict[str, list[int]] = {}
        for p in sp["patients"]:
            if p["set"] == "train":
                groups.setdefault(p["source_guess"].split("-like")[0], []).extend(range(p["first"], p["last"] + 1))
        real_groups = [np.array(v) for v in groups.values()]
        say(f"real draws balanced over sources: {[(k, len(v)) for k, v in groups.items()]}")

    ph_tr = ph_va = None
    if args.phantoms:
        cache = HERE / "cache"
        tag = "" if args.phantom_none_every == 4 else f"-none{args.phantom_none_every}"
        def load_set(name, seeds):
            f = cache / f"phantoms-{name}-{len(seeds)}x{args.phantom_slices}x{args.phantom_size}{tag}.npz"
            if pack is not None:  # the pack's subset of this set's series; never the generator
                d = pack.phantoms(f.stem)
                say(f"phantoms {f.stem} from the pack: {len(d['severity'])} of {len(seeds)} series")
                return d
            if f.exists():
                z = np.load(f, allow_pickle=True)
                return {k: (z[k].tolist() if k in ("severity", "seeds", "gt_involvement") else z[k]) for k in z.files}
            from models.train import phantoms
            d = phantoms.build_set(args.phantom_bin, args.phantom_cache, seeds, args.phantom_slices, args.phantom_size,
                                  args.phantom_none_every)
            np.savez(f, **d)
            return d
        t0 = time.time()
        ph_tr = load_set("train", list(range(1000, 1000 + args.phantom_train_series)))
        if args.phantom_long_series:
            # long series (120 slices at the seed's thickness) reach below the diaphragm: lung-free abdomen slices
            # the 40-slice chest series almost never contain
            n_slices = args.phantom_slices
            args.phantom_slices = 120
            long = load_set("long", list(range(2000, 2000 + args.phantom_long_series)))
            args.phantom_slices = n_slices
            off = int(ph_tr["series"].max()) + 1
            for k in ("ct", "labels"):
                ph_tr[k] = np.concatenate([ph_tr[k], long[k]])
            ph_tr["series"] = np.concatenate([ph_tr["series"], long["series"] + off])
        ph_va = load_set("val", list(range(9000, 9000 + args.phantom_val_series)))
        say(f"phantoms: train {len(ph_tr['ct'])} slices, val {len(ph_va['ct'])} slices ({time.time() - t0:.0f} s)")

    neg_tr = neg_va = None
    if args.negatives > 0:
        if pack is not None:
            neg_tr, neg_va = pack.negatives("train"), pack.negatives("val")
        else:
            from models.train import data_negatives  # pydicom: not needed (nor installed) where a pack is used
            neg_tr, neg_va = data_negatives.load("train"), data_negatives.load("val")
        say(f"real negatives: train {len(neg_tr['ct'])} slices {neg_tr['names']}, "
            f"val {len(neg_va['ct'])} slices {neg_va['names']}")
        if args.negatives_min_lung_px > 0:
            keep = (neg_tr["labels"] == 1).reshape(len(neg_tr["labels"]), -1).sum(1) >= args.negatives_min_lung_px
            for k in ("ct", "labels", "hu", "series"):
                if k in neg_tr:
                    neg_tr[k] = neg_tr[k][keep]
            say(f"real negatives with at least {args.negatives_min_lung_px} lung pixels: {int(keep.sum())} of "
                f"{len(keep)} training slices kept")
        # the options that relabel or re-render the negatives from their HU: one at a time, and only --aerated-below-hu
        # with --context
        from_hu = [o for o, on in (("--aerated-below-hu", args.aerated_below_hu is not None),
                                   ("--insert-lesions", args.insert_lesions > 0),
                                   ("--border-band-px", args.border_band_px > 0)) if on]
        if len(from_hu) > 1 or (from_hu and "hu" not in neg_tr) or (
                args.context and from_hu and from_hu != ["--aerated-below-hu"]):
            raise SystemExit(f"{' and '.join(from_hu)}: one at a time, on the negatives' HU (data_negatives.load, not "
                             "a device pack); --insert-lesions and --border-band-px with 2D input only")
        if args.border_band_px > 0:
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * args.border_band_px + 1,) * 2)
            rim = np.stack([cv2.dilate((lab == 1).astype(np.uint8), disc) > 0 for lab in neg_tr["labels"]])
            rim &= (neg_tr["labels"] == 0) & (neg_tr["hu"] > -500)
            neg_tr["labels"] = np.where(rim, BORDER, neg_tr["labels"]).astype(np.uint8)
            say(f"border rim of {args.border_band_px} px: {int(rim.sum())} pixels of the training negatives are "
                "'background or lung'")
        if args.aerated_below_hu is not None:
            for d in (neg_tr, neg_va):
                d["aerated"] = d["hu"] < args.aerated_below_hu
                d["labels"] = np.where((d["labels"] == 1) & d["aerated"], AERATED, d["labels"]).astype(np.uint8)
                del d["hu"]
            say(f"aerated lung below {args.aerated_below_hu} HU: "
                f"{100.0 * (neg_tr['labels'] == AERATED).sum() / max((neg_tr['labels'] >= 1).sum(), 1):.1f} % "
                "of the training negatives' lung pixels")
    real_ctx = None  # with --context: neighbour lookup of covid19-ct-seg-256 (the other sets keep theirs as "ctx")
    if args.context:
        t0 = time.time()
        group = np.zeros(len(ct), np.int64)
        for k, p in enumerate(sp["patients"]):
            group[p["first"]:p["last"] + 1] = k
        real_ctx = Context(ct, group)
        for d in (ph_tr, ph_va, neg_tr, neg_va):
            if d is not None:
                d["ctx"] = Context(d["ct"], d["series"])
        say(f"2.5D input: neighbour runs real {real_ctx.n_runs} (thin-slice {int(real_ctx.thin.sum())} slices), "
            + ", ".join(f"{n} {d['ctx'].n_runs} ({int(d['ctx'].thin.sum())})" for n, d in
                        (("phantoms", ph_tr), ("negatives", neg_tr)) if d is not None)
            + f" ({time.time() - t0:.0f} s)")

    def draw(set_ct: np.ndarray, ctx: Context | None, i: int) -> np.ndarray:
        """One training slice: H x W, or with --context H x W x 3 (neighbour step drawn; one time in ten the slice
        alone, as at a series end or for a single slice; above and below swapped half the time)."""
        if ctx is None:
            return set_ct[i]
        st = ctx.stack(set_ct, i, 0 if rng.random() < 0.1 else ctx.draw_step(i, rng))
        return st[..., ::-1] if rng.random() < 0.5 else st

    neg_groups = None  # per lesion-free training series, its slice indices (--negatives-series-balance)
    if neg_tr is not None and args.negatives_series_balance:
        neg_groups = [np.flatnonzero(neg_tr["series"] == k) for k in range(len(neg_tr["names"]))]
        neg_groups = [g for g in neg_groups if len(g)]
        neg_group_p = np.sqrt([len(g) for g in neg_groups])
        neg_group_p /= neg_group_p.sum()
    hard_real = None  # real lesion-free training slices with the most false lesion pixels at the last mining
    hard_real_pos = None  # real training slices with the most missed lesion pixels at the last mining

    ph_les_idx = ph_free_idx = None
    if ph_tr is not None:
        has_les = (ph_tr["labels"] == 2).reshape(len(ph_tr["labels"]), -1).any(1)
        ph_les_idx, ph_free_idx = np.flatnonzero(has_les), np.flatnonzero(~has_les)
        say(f"phantom train slices: {len(ph_les_idx)} with lesion, {len(ph_free_idx)} lesion-free")

    chans = [int(c) for c in args.chans.split(",")] if args.chans else None
    in_ch = 1 + 2 * args.context
    model = UNet(args.width, args.levels, chans=chans, bottom=args.bottom, refine_kernel=args.refine_kernel,
                 in_ch=in_ch)
    if args.init:
        state = torch.load(args.init, map_location="cpu")
        if state["stem.0.weight"].shape[1] != in_ch:  # a 2D checkpoint: the same function, neighbours read zero
            context_from(model, state, inflate=args.context_init == "inflate")
            say(f"{args.init}: " + ("its stem shared equally by the slices (inflated)" if args.context_init == "inflate"
                                    else "its stem reads the centre channel, the neighbour channels start at zero"))
        elif all(state[k].shape == v.shape for k, v in model.state_dict().items()):
            model.load_state_dict(state)
        else:  # a narrower checkpoint of the same family: same function, wider layers (model.widen_from)
            widen_from(model, state)
            say(f"widened {args.init} into the new architecture")
    model = model.to(device, memory_format=torch.channels_last)
    say(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + (", bf16 autocast" if args.amp and device.type == "cuda" else ""))
    say(f"model: width {args.width} levels {args.levels} chans {chans} bottom {args.bottom} "
        f"refine {args.refine_kernel} params {count_params(model)}")
    # the architecture, for exporting a checkpoint before the run has written summary.json
    (args.run / "arch.json").write_text(json.dumps(dict(width=args.width, levels=args.levels, chans=chans,
                                                        bottom=args.bottom, refine_kernel=args.refine_kernel,
                                                        in_ch=in_ch)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = None
    if args.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    judged = model if ema is None else ema.module  # the weights validated, kept and exported
    steps_per_epoch = args.samples_per_epoch // args.batch
    total = steps_per_epoch * args.epochs
    budget = None if args.minutes is None else 60.0 * args.minutes
    t_begin = time.time()

    def progress(step: int) -> float:
        """Fraction of training done: by wall-clock time with --minutes, else by steps."""
        if budget is not None:
            return min(1.0, (time.time() - t_begin) / budget)
        return min(1.0, step / total)

    step_no = [0]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress(s))))

    best, best_score, history = None, -1.0, []
    hard_idx = None  # lesion-free phantom slices with the most false lesion pixels at the last mining
    hard_pos = None  # lesion phantom slices with the most missed lesion pixels at the last mining
    t_start = time.time()
    for ep in range(args.epochs):
        if args.hard_negatives > 0 and ph_free_idx is not None and ep % 5 == 0:
            probe = rng.choice(ph_free_idx, size=min(800, len(ph_free_idx)), replace=False)
            fp = (predict(judged, set_inputs(ph_tr, probe)) == 2).reshape(len(probe), -1).sum(1)
            shows = fp > 0
            hard_idx = probe[shows][np.argsort(-fp[shows])][:200] if shows.any() else None
            say(f"hard negatives: {int(shows.sum())} of {len(probe)} probed lesion-free slices show lesion "
                f"({int(fp.sum())} pixels)")
        if args.hard_positives > 0 and ph_les_idx is not None and ep % 5 == 0:
            probe = rng.choice(ph_les_idx, size=min(800, len(ph_les_idx)), replace=False)
            miss = ((predict(judged, set_inputs(ph_tr, probe)) != 2) & (ph_tr["labels"][probe] == 2)).reshape(
                len(probe), -1).sum(1)
            hard_pos = probe[np.argsort(-miss)][:200]
            say(f"hard positives: {int((miss > 0).sum())} of {len(probe)} probed lesion slices miss lesion "
                f"({int(miss.sum())} pixels; the 200 worst {int(np.sort(miss)[::-1][:200].sum())})")
        if args.hard_real_negatives > 0 and neg_tr is not None and ep % 3 == 0:
            fp = counted_lesion(predict(judged, set_inputs(neg_tr)), neg_tr).reshape(len(neg_tr["ct"]), -1).sum(1)
            shows = fp > 0
            hard_real = np.flatnonzero(shows)[np.argsort(-fp[shows])][:150] if shows.any() else None
            say(f"hard real negatives: {int(shows.sum())} of {len(fp)} real lesion-free slices show lesion "
                f"({int(fp.sum())} pixels)")
        if args.hard_real_positives > 0 and ep % 3 == 0:
            miss = ((predict(judged, inputs(ct, real_ctx, tr_idx)) != 2) & (lab[tr_idx] == 2)).reshape(
                len(tr_idx), -1).sum(1)
            hard_real_pos = tr_idx[np.argsort(-miss)][:200]
            say(f"hard real positives: {int((miss > 0).sum())} of {len(tr_idx)} real training slices miss lesion "
                f"({int(miss.sum())} pixels; the 200 worst {int(np.sort(miss)[::-1][:200].sum())})")
        model.train()
        if args.freeze_bn:
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        t0 = time.time()
        losses = []
        if budget is not None and time.time() - t_begin >= budget:
            say(f"time budget of {args.minutes} min used up after {ep} epochs")
            break
        for _ in range(steps_per_epoch):
            if budget is not None and losses and time.time() - t_begin >= budget:
                break
            step_no[0] += 1
            crop = args.crop if progress(step_no[0]) < args.full_after else 0
            xs, ys = [], []
            for _ in range(args.batch):
                u = rng.random()
                if neg_tr is not None and u < args.negatives:
                    pool = hard_real if hard_real is not None and rng.random() < args.hard_real_negatives else None
                    if pool is None and neg_groups is not None:
                        pool = neg_groups[rng.choice(len(neg_groups), p=neg_group_p)]
                    i = int(pool[rng.integers(len(pool))]) if pool is not None else int(rng.integers(len(neg_tr["ct"])))
                    img, l = draw(neg_tr["ct"], neg_tr.get("ctx"), i), neg_tr["labels"][i]
                    v = rng.random()
                    if v < 1.5 * args.insert_lesions:  # rendered from HU, with lesions two times in three
                        hu = neg_tr["hu"][i].astype(np.float32)
                        les = np.zeros(hu.shape, bool)
                        if v < args.insert_lesions:
                            hu, les = lesion_insert.insert(hu, l == 1, rng)
                        img = hu_to_u8(hu)
                        l = np.where(les, 2, l).astype(np.uint8)
                elif ph_tr is not None and (u - args.negatives) / (1 - args.negatives) < args.phantom_fraction:
                    if args.phantom_lesion_free_share is None:
                        i = int(rng.integers(len(ph_tr["ct"])))
                    else:
                        pool = ph_free_idx if rng.random() < args.phantom_lesion_free_share else ph_les_idx
                        if pool is ph_free_idx and hard_idx is not None and rng.random() < args.hard_negatives:
                            pool = hard_idx
                        elif pool is ph_les_idx and hard_pos is not None and rng.random() < args.hard_positives:
                            pool = hard_pos
                        i = int(pool[rng.integers(len(pool))])
                    img, l = draw(ph_tr["ct"], ph_tr.get("ctx"), i), ph_tr["labels"][i]
                else:
                    g = tr_idx if real_groups is None else real_groups[rng.integers(len(real_groups))]
                    if hard_real_pos is not None and rng.random() < args.hard_real_positives:
                        g = hard_real_pos
                    i = int(g[rng.integers(len(g))])
                    img, l = draw(ct, real_ctx, i), lab[i]
                a, b = augment(img.astype(np.float32) / 255.0, l, rng, args.elastic)
                if crop and crop < 256:
                    oy, ox = rng.integers(0, 256 - crop + 1, 2)
                    a, b = a[oy:oy + crop, ox:ox + crop], b[oy:oy + crop, ox:ox + crop]
                xs.append(a)
                ys.append(b)
            x = torch.from_numpy(np.stack(xs))
            x = (x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)).to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device, non_blocking=True)
            with autocast(device):
                logits = model(x)
            logits = logits.float()  # the losses in float32 (a no-op without autocast)
            loss = dice_ce_loss(logits, y)
            if args.fp_pixel_weight != 1.0 or args.fn_pixel_weight != 1.0:
                loss = loss + error_weighted_ce(logits, y, args.fp_pixel_weight, args.fn_pixel_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
        r = eval_real(judged, ct, lab, va_idx, per_patient, real_ctx)
        rec = dict(epoch=ep + 1, loss=round(float(np.mean(losses)), 4), secs=round(time.time() - t0, 1),
                   lr=round(sched.get_last_lr()[0], 6), crop=crop,
                   real_lung=r["global"]["lung_dice"], real_lesion=r["global"]["lesion_dice"])
        score = r["global"]["lesion_dice"] + r["global"]["lung_dice"]
        if ph_va is not None:
            p = eval_phantoms(judged, ph_va)
            rec.update(ph_lesion=p["global_lesion_dice"], ph_inv_err=p["max_involvement_error_points"],
                       ph_fp=p["false_positive_series"], ph_spec=p["slice_specificity"], ph_iou=p["mean_iou"])
            score += (p["global_lesion_dice"] - 0.02 * p["max_involvement_error_points"]
                      - args.fp_penalty * p["false_positive_series"] + args.iou_weight * p["mean_iou"])
        if neg_va is not None:
            n = eval_negatives(judged, neg_va)
            rec["neg"] = n
            score += args.neg_weight * (np.mean([v["slice_specificity"] for v in n.values()])
                                        - np.mean([v["involvement"] for v in n.values()]))
        rec["score"] = score
        history.append(rec)
        say(json.dumps(rec))
        state = cpu_state(judged)  # CPU tensors whatever the device: export.py, from_onnx.py, --init load them
        torch.save(state, args.run / "last.pt")  # the latest epoch, for a look beside the best
        torch.save(state, args.run / f"epoch{ep + 1:03d}.pt")
        if score > best_score:
            best_score = score
            best = {k: v.clone() for k, v in state.items()}
            torch.save(best, args.run / "best.pt")
    train_secs = time.time() - t_start
    if best is None:
        say("no epoch finished within the time budget: no checkpoint, nothing to export")
        sys.exit(1)
    model.load_state_dict(best)
    r = eval_real(model, ct, lab, va_idx, per_patient, real_ctx)
    p = eval_phantoms(model, ph_va) if ph_va is not None else None
    model = model.to("cpu", memory_format=torch.contiguous_format)
    if args.out is None:
        args.out = args.run / "lungsentry-unet.onnx"
    export_onnx(model, args.out)
    summary = dict(width=args.width, levels=args.levels, chans=chans, bottom=args.bottom,
                   refine_kernel=args.refine_kernel, in_ch=in_ch, params=count_params(model), epochs=len(history),
                   batch=args.batch, lr=args.lr, seed=args.seed, phantoms=bool(args.phantoms),
                   phantom_fraction=args.phantom_fraction if args.phantoms else 0.0,
                   samples_per_epoch=args.samples_per_epoch, crop=args.crop, full_after=args.full_after,
                   minutes=args.minutes, init=str(args.init) if args.init else None,
                   phantom_none_every=args.phantom_none_every,
                   phantom_lesion_free_share=args.phantom_lesion_free_share,
                   phantom_long_series=args.phantom_long_series, train_seconds=round(train_secs),
                   threads=args.threads, ema=args.ema, hard_negatives=args.hard_negatives,
                   hard_positives=args.hard_positives, elastic=args.elastic,
                   real_source_balance=args.real_source_balance, negatives=args.negatives,
                   hard_real_negatives=args.hard_real_negatives, neg_weight=args.neg_weight,
                   negatives_series_balance=args.negatives_series_balance,
                   fp_pixel_weight=args.fp_pixel_weight, fn_pixel_weight=args.fn_pixel_weight,
                   freeze_bn=args.freeze_bn, hard_real_positives=args.hard_real_positives,
                   device=str(device), amp=bool(args.amp and device.type == "cuda"),
                   pack=str(args.pack) if args.pack else None,
                   best_epoch=int(np.argmax([h["score"] for h in history]) + 1),
                   real_val=r, phantom_val=p, history=history)
    (args.run / "summary.json").write_text(json.dumps(summary, indent=1))
    say(json.dumps(dict(real=r["global"], phantom=None if p is None else
                        {k: v for k, v in p.items() if k != "series"})))
    say(f"exported {args.out}; summary {args.run / 'summary.json'}")


if __name__ == "__main__":
    main()
