"""Regenerate the figures block of models/MODEL_CARD.md from models/validation.json (and split.json).

Everything between the markers `<!-- figures:begin -->` and `<!-- figures:end -->` is replaced.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent


def f(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def render(v: dict) -> str:
    m, r, lat, tr = v["model"], v["covid19_ct_seg_256_val"], v["cpu_latency"], v["training"]
    out = ["## Figures (generated from `models/validation.json` by `models/train/card.py`)", ""]
    out += [f"Model: `{m['file']}`, {m['bytes'] / 1e6:.2f} MB, {m['params']:,} parameters, width {m['width']}, "
            f"{m['levels']} levels, sha256 `{m['sha256']}`.", ""]
    tsec = tr.get("train_seconds")
    out += [f"Training: {tr.get('epochs', '?')} epochs × {tr.get('samples_per_epoch', '?')} samples "
            f"(batch {tr.get('batch', '?')}, random {tr.get('crop', '?')}² crops), best epoch "
            f"{tr.get('best_epoch', '?')}, phantoms {'yes' if tr.get('phantoms') else 'no'}, "
            f"{'%.0f min' % (tsec / 60) if tsec else 'partial run (best checkpoint so far)'} on 2 shared CPU cores "
            f"(PyTorch {tr.get('threads', 2)} threads, no GPU), seed {tr.get('seed', 1234)}.", ""]
    out += ["### covid19-ct-seg-256, patient-level validation split (onnxruntime on the shipped file)", "",
            "| patients | slices | lung Dice | lesion Dice |", "|---|---|---|---|"]
    g = r["global"]
    out.append(f"| all 4 (pooled) | {g['slices']} | {f(g['lung_dice'])} | {f(g['lesion_dice'])} |")
    for pid, p in r["per_patient"].items():
        out.append(f"| {pid} ({p['files']}) | {p['slices']} | {f(p['lung_dice'])} | {f(p['lesion_dice'])} |")
    out += ["", "Targets: lesion Dice ≥ 0.80, lung Dice ≥ 0.95 (global and per patient).", ""]
    ph = v.get("phantom_val")
    out += ["### Validation phantoms (`lungsentry phantom`, seeds 9000+, HU → minmax_clahe)", ""]
    if ph is None:
        out += ["Not measured for this model: the phantom generator was not available when it was trained.", ""]
    else:
        out += [f"{ph['series_count']} series, {ph['slices']} slices. Lesion Dice (pooled over lesion series) "
                f"{f(ph['lesion_dice_global'])}, lung Dice {f(ph['lung_dice_global'])}, max |involvement error| "
                f"{f(ph['max_involvement_error_points'], 2)} points, false-positive series (severity none, "
                f"predicted involvement ≥ {ph['fp_threshold_percent']} %): {ph['false_positive_series']} of "
                f"{ph['none_series']}.", "",
                "| seed | severity | lung Dice | lesion Dice | involvement true % | predicted % |",
                "|---|---|---|---|---|---|"]
        for s in ph["series"]:
            out.append(f"| {s['seed']} | {s['severity']} | {f(s['lung_dice'])} | {f(s['lesion_dice'])} | "
                       f"{s['involvement_true_percent']:.2f} | {s['involvement_pred_percent']:.2f} |")
        out += ["", "Targets: lesion Dice ≥ 0.90, involvement within 1 point, no false-positive series at 0.4 %.", ""]
    out += ["### CPU latency (onnxruntime, intra_op_num_threads = 2)", "",
            f"{lat['runtime']}, {lat['cpu']}; batch 1: {lat['batch1_ms_per_slice_median']} ms/slice (median, "
            f"min {lat['batch1_ms_per_slice_min']}); batch 8: {lat['batch8_ms_per_slice_median']} ms/slice (median, "
            f"min {lat['batch8_ms_per_slice_min']}). Measured on the shared 2-core build machine while other jobs "
            f"ran (1-minute load average {lat['load_avg_1min_at_measure']}), so these are pessimistic.", "",
            f"onnxruntime vs PyTorch: max abs logit difference {v['onnx_vs_pytorch']['max_abs_diff']:.2e}, argmax "
            f"agreement {v['onnx_vs_pytorch']['argmax_agreement']:.4f} on {v['onnx_vs_pytorch']['slices']} slices.", ""]
    return "\n".join(out)


def main() -> None:
    v = json.loads((MODELS / "validation.json").read_text())
    card = MODELS / "MODEL_CARD.md"
    text = card.read_text()
    a, b = "<!-- figures:begin -->", "<!-- figures:end -->"
    i, j = text.index(a) + len(a), text.index(b)
    card.write_text(text[:i] + "\n" + render(v) + "\n" + text[j:])
    print(f"updated {card}")


if __name__ == "__main__":
    main()
