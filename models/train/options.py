"""The options of one training run: train.py's command line, and the run files that stand for it.

A run file (`models/train/runs/<name>.toml`) holds what differs from the defaults below, one key per option, named
as the option without its dashes (`phantom-train-series = 40`, `phantoms = true`,
`init = "models/train/runs/v9/best.pt"`).
`train.py --config FILE` reads it; options given on the command line override the file, so
`train.py --config models/train/runs/n3.toml --minutes 5 --no-phantoms` is n3 for five minutes without phantoms.
Paths in a run file are taken as written, relative to the directory train.py runs in (the repository root in
README.md), as on the command line. A key that is no option, or a value of the wrong type, is an error naming the
file and the key. `--print-args` prints the resolved options as JSON and trains nothing.

Standard library only (no PyTorch), so run files can be checked where PyTorch is not installed
(test_run_files.py).
"""
from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent

# Options that say how to run train.py, not what to train: never keys of a run file (--device and --pack say
# where it runs and where its data comes from, so the same run file trains on this machine and on the device).
NOT_IN_RUN_FILES = {"config", "print-args", "help", "device", "pack"}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every option of train.py with its default; a run file may set any of them but --config and --print-args."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None,
                    help="run file (TOML, e.g. models/train/runs/v9.toml): these options' values for one run; "
                         "options on the command line override it")
    ap.add_argument("--print-args", action="store_true",
                    help="print the resolved options (defaults < --config file < command line) as JSON, train nothing")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--chans", default=None, help="per-level widths, e.g. 8,16,48,96 (default: width x 2^level)")
    ap.add_argument("--bottom", type=int, default=None, help="bottleneck width (default: twice the last level)")
    ap.add_argument("--refine-kernel", type=int, default=3, choices=[1, 3])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="LUNGSENTRY_DATA root (default: env or ../shared/data)")
    ap.add_argument("--phantoms", action=argparse.BooleanOptionalAction, default=False,
                    help="also train on / validate with lungsentry phantoms")
    ap.add_argument("--phantom-bin", default=str(MODELS.parent / "target" / "release" / "lungsentry"))
    ap.add_argument("--phantom-cache", type=Path, default=Path("/work/phantom-cache"))
    ap.add_argument("--phantom-train-series", type=int, default=40)
    ap.add_argument("--phantom-val-series", type=int, default=12)
    ap.add_argument("--phantom-slices", type=int, default=40)
    ap.add_argument("--phantom-size", type=int, default=512)
    ap.add_argument("--phantom-long-series", type=int, default=0,
                    help="extra 120-slice phantom series (seeds 2000..) whose lower slices are lung-free abdomen")
    ap.add_argument("--phantom-fraction", type=float, default=0.4, help="share of each batch drawn from phantoms")
    ap.add_argument("--phantom-none-every", type=int, default=4,
                    help="every n-th phantom series is lesion-free (severity none); 4 = v0.1.0 pattern")
    ap.add_argument("--phantom-lesion-free-share", type=float, default=None,
                    help="class-balanced phantom sampling: this share of phantom draws is a slice without lesion "
                         "(from none series or outside lesions), the rest a slice with lesion (default: uniform)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: cosine LR over wall-clock time, stop after this many minutes "
                         "(--epochs then only caps the number of epochs)")
    ap.add_argument("--full-after", type=float, default=1.0,
                    help="fraction of training (steps, or time with --minutes) after which inputs are full 256^2")
    ap.add_argument("--samples-per-epoch", type=int, default=800)
    ap.add_argument("--crop", type=int, default=160, help="train on random crops of this size (0: full 256)")
    ap.add_argument("--run", type=Path, default=None,
                    help="run folder: log, checkpoints, summary (default: a new models/train/runs/<timestamp>)")
    ap.add_argument("--out", type=Path, default=None,
                    help="ONNX of the best epoch (default: <run>/lungsentry-unet.onnx; the shipped model in models/ "
                         "changes only through export.py)")
    ap.add_argument("--fp-penalty", type=float, default=0.1,
                    help="checkpoint score penalty per false-positive lesion-free validation phantom series")
    ap.add_argument("--iou-weight", type=float, default=0.0,
                    help="checkpoint score weight of the validation phantoms' mean per-slice lesion IoU (paper convention)")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint (.pt)")
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of the lesion-free phantom draws taken from the lesion-free training slices the "
                         "model currently marks lesion on most (re-mined every 5 epochs on 800 of them; 0: off)")
    ap.add_argument("--hard-positives", type=float, default=0.0,
                    help="share of the lesion phantom draws taken from the lesion training slices where the model "
                         "currently misses the most lesion pixels (re-mined every 5 epochs on 800 of them; 0: off)")
    ap.add_argument("--real-source-balance", action=argparse.BooleanOptionalAction, default=False,
                    help="draw real training slices half from each source group of split.json (Coronacases-like, "
                         "Radiopaedia-like) instead of uniformly over slices")
    ap.add_argument("--elastic", type=float, default=0.0,
                    help="probability of a smooth elastic deformation per training sample (0: off)")
    ap.add_argument("--negatives", type=float, default=0.0,
                    help="share of each batch drawn from real lesion-free CT (data_negatives: LUNA16, ACRIN, LIDC "
                         "training series; labels lung / background); its validation series are scored every epoch")
    ap.add_argument("--negatives-series-balance", action=argparse.BooleanOptionalAction, default=False,
                    help="draw real-negative slices series first (a series with n slices in proportion to sqrt(n)), then "
                         "a slice in it, instead of uniformly over slices (the long LUNA16 series would otherwise "
                         "dominate the short series from other scanners)")
    ap.add_argument("--hard-real-negatives", type=float, default=0.0,
                    help="share of the real-negative draws taken from the real lesion-free training slices the model "
                         "currently marks most lesion on (re-mined every 3 epochs over all of them; 0: off)")
    ap.add_argument("--hard-real-positives", type=float, default=0.0,
                    help="share of the covid19-ct-seg-256 training draws taken from its training slices where the "
                         "model currently misses the most lesion pixels (re-mined every 3 epochs over all of them; "
                         "diffuse ground glass read as lung; 0: off)")
    ap.add_argument("--neg-weight", type=float, default=1.0,
                    help="checkpoint score weight of the real lesion-free validation series: + weight x mean slice "
                         "specificity - weight x mean involvement (percent) over them")
    ap.add_argument("--fp-pixel-weight", type=float, default=1.0,
                    help="extra cross-entropy term whose pixels called lesion that are not weigh this much "
                         "(error_weighted_ce; 1 with --fn-pixel-weight 1: off)")
    ap.add_argument("--fn-pixel-weight", type=float, default=1.0,
                    help="the same term's weight of lesion pixels not called lesion")
    ap.add_argument("--aerated-below-hu", type=float, default=None,
                    help="floor-aware negatives (needs the product's analysis.lesion_min_hu at the same HU): on the "
                         "real lesion-free series, lung pixels less dense than this are 'aerated lung', for which "
                         "lung and lesion are both right (loss -log(p_lung + p_lesion)); the product counts lesion "
                         "pixels there as lung anyway, so the negatives teach only what stays: dense false lesion "
                         "(vessels, partial volume, dependent density). Mining and the validation negatives count "
                         "lesion only at or above it. None: off")
    ap.add_argument("--insert-lesions", type=float, default=0.0,
                    help="share of the real-negative draws rendered from their HU with synthetic lesions inserted "
                         "(lesion_insert.py), through the product's normalisation; half as many again are rendered "
                         "from HU without lesions, so the rendering path says nothing about a lesion. 0: off")
    ap.add_argument("--border-band-px", type=int, default=0,
                    help="on the real lesion-free training series, the soft tissue (HU > -500) within this many pixels "
                         "(at 256) outside the classical lung mask is 'background or lung' (loss -log(p_bg + p_lung), "
                         "out of the lung Dice): the classical mask stops where the air does, so dense dependent lung "
                         "and the pleura are background in it, which teaches that dense lung at the chest wall is "
                         "outside the lung (the consolidations read as background). 0: off")
    ap.add_argument("--negatives-min-lung-px", type=int, default=0,
                    help="train only on the real lesion-free slices with at least this many classical lung pixels (at "
                         "256): abdomen slices out. The product's lung guard already clears slices without "
                         "air-density lung, and the bowel (dense with gas bubbles) they teach as background is what "
                         "the phantoms' crazy-paving consolidation looks like. 0: all slices")
    ap.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=False,
                    help="BatchNorm layers stay in eval mode while training: their running statistics (from --init) "
                         "are kept and batches are normalised with them, so a new mix of data in the batch does not "
                         "shift what the layers do on the old data")
    ap.add_argument("--context", type=int, default=0, choices=[0, 1],
                    help="1: 2.5D input, the slices above and below as two more channels (context.py); 0: 2D")
    ap.add_argument("--context-init", default="centre", choices=["centre", "inflate"],
                    help="a 2D --init into a --context model: its stem reads the centre slice only (the same function) "
                         "or all slices equally (inflate)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="exponential moving average of the weights (and BatchNorm statistics) with this decay per "
                         "step; the average is what is validated, kept as best and exported (0: off)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where the model trains: cpu, cuda, or auto (cuda where PyTorch sees a GPU, else cpu); "
                         "batches are drawn and augmented on the CPU either way, checkpoints are saved as CPU tensors")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                    help="bf16 autocast of the forward passes (training and evaluation) on cuda; ignored on cpu")
    ap.add_argument("--pack", type=Path, default=None,
                    help="read the real slices, the negatives and the phantoms from this device pack "
                         "(device_pack.py) instead of LUNGSENTRY_DATA, the phantom generator and the caches")
    return ap


def run_file_keys(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a run file may hold: each long option without its leading dashes, with the action behind it."""
    keys = {}
    for action in ap._actions:
        for opt in action.option_strings:
            key = opt[2:]
            if opt.startswith("--") and key not in NOT_IN_RUN_FILES and not (
                    isinstance(action, argparse.BooleanOptionalAction) and key.startswith("no-")):
                keys[key] = action
    return keys


def read_run_file(ap: argparse.ArgumentParser, path: Path) -> dict[str, object]:
    """The run file's values by argparse destination, converted as the command line would convert them."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        ap.error(f"--config {path}: {e}")
    keys = run_file_keys(ap)
    values = {}
    for key, value in table.items():
        action = keys.get(key)
        if action is None:
            ap.error(f"--config {path}: `{key}` is not an option of train.py (keys are the long options without "
                     f"their dashes, e.g. phantom-train-series)")
        if action.nargs == 0:  # a flag: --phantoms / --no-phantoms (or a plain store_true option)
            if not isinstance(value, bool) or action.const not in (None, True):
                ap.error(f"--config {path}: `{key}` is true or false, not {value!r}")
            values[action.dest] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            ap.error(f"--config {path}: `{key}` is a number or a string, not {value!r}")
        try:
            # through the text, as from the command line: epochs = 2.5 is an error, not 2
            converted = (action.type or str)(str(value))
        except (TypeError, ValueError):
            ap.error(f"--config {path}: `{key}` = {value!r} is not a valid {getattr(action.type, '__name__', 'value')}")
        if action.choices is not None and converted not in action.choices:
            ap.error(f"--config {path}: `{key}` = {value!r} is not one of {list(action.choices)}")
        values[action.dest] = converted
    return values


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """train.py's options: the defaults, overridden by the --config run file, overridden by the command line."""
    ap = build_parser(description)
    args = ap.parse_args(argv)
    if args.config is not None:
        ap.set_defaults(**read_run_file(ap, args.config))
        args = ap.parse_args(argv)
    return args


def as_json(args: argparse.Namespace) -> str:
    """The resolved options as JSON (paths as text), what --print-args prints."""
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k != "print_args"}
    return json.dumps(resolved, indent=1)
