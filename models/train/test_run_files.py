"""The run files (runs/*.toml) against the command lines they replaced, and the --config rules.

    python3 -m unittest models.train.test_run_files      # from the repository root; scripts/test runs it

Each run of README.md was recorded as a `train.py` command line until issue 23; those command lines are kept
here, as README.md had them (`$COMMON` and `$PH` expanded), and each run file must resolve to exactly the options
that its command line parsed to. Standard library only, except the last tests, which run train.py itself
(PyTorch) and are skipped where PyTorch is not installed.
"""
from __future__ import annotations

import importlib.util
import io
import json
import shlex
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr
from pathlib import Path

from models.train.options import HERE, as_json, build_parser, parse_args, read_run_file

ROOT = HERE.parents[1]
RUNS = HERE / "runs"

# README.md's shell variables, as it defined them.
COMMON_V3 = ("--phantoms --phantom-cache /work/phantom-cache-v2 --phantom-train-series 72 --phantom-val-series 12 "
             "--phantom-none-every 3 --phantom-lesion-free-share 0.4 --phantom-fraction 0.6 --fp-penalty 0.3 "
             "--epochs 200")
PH = ("--phantoms --phantom-train-series 40 --phantom-long-series 12 --phantom-val-series 12 "
      "--phantom-none-every 3 --phantom-lesion-free-share 0.4 --fp-penalty 0.3")
COMMON_N7 = ("--init models/train/runs/n6/epoch007.pt --hard-real-positives 0.4 --hard-real-negatives 0.5 " + PH +
             " --iou-weight 1.0 --hard-negatives 0.3 --hard-positives 0.3 --fp-pixel-weight 5 --fn-pixel-weight 3 "
             "--lr 1.5e-4 --ema 0.99 --threads 1 --minutes 30 --epochs 300 --samples-per-epoch 480")
N3 = ("--init models/train/runs/n2/epoch009.pt --negatives 0.45 --hard-real-negatives 0.5 " + PH +
      " --phantom-fraction 0.3 --fp-pixel-weight 5 --fn-pixel-weight 3 --lr 3e-4 --ema 0.99 --threads 1 --minutes 60 "
      "--epochs 300 --samples-per-epoch 480 --run models/train/runs/n3")
N8 = COMMON_N7 + " --negatives 0.4 --phantom-fraction 0.5 --run models/train/runs/n8"

# The arguments of `python models/train/train.py ...` of each run, by run file name.
RECORDED = {
    "scratch": "--epochs 20 --phantoms",
    "v2": "--phantoms --phantom-cache /work/phantom-cache-v2 --phantom-train-series 36 --phantom-val-series 12 "
          "--phantom-none-every 3 --phantom-lesion-free-share 0.5 --phantom-fraction 0.5 "
          "--init models/train/runs/ph1/best.pt --lr 1e-3 --minutes 40 --epochs 100 --samples-per-epoch 480 "
          "--full-after 0.7 --fp-penalty 0.3 --run models/train/runs/v2 --out /tmp/v2-train.onnx",
    "v3": COMMON_V3 + " --init models/train/runs/v2/best.pt --lr 1e-3 --minutes 88 --samples-per-epoch 960 "
                      "--full-after 0.5 --run models/train/runs/v3",
    "v4": COMMON_V3 + " --phantom-long-series 24 --init models/train/runs/v3/best.pt --lr 8e-4 --minutes 75 "
                      "--samples-per-epoch 960 --full-after 0.4 --run models/train/runs/v4",
    "v5": COMMON_V3 + " --phantom-long-series 24 --threads 1 --init models/train/runs/v4/best.pt --lr 5e-4 "
                      "--minutes 50 --samples-per-epoch 1920 --full-after 0.3 --run models/train/runs/v5",
    "v6": COMMON_V3 + " --phantom-long-series 24 --threads 1 --init models/train/runs/v5/best.pt --lr 5e-4 "
                      "--samples-per-epoch 960 --run models/train/runs/v6",
    "v7": COMMON_V3 + " --phantom-long-series 24 --threads 1 --init models/train/runs/v6/best.pt --lr 3e-4 "
                      "--minutes 110 --samples-per-epoch 960 --full-after 0.3 --run models/train/runs/v7 "
                      "--out /tmp/v7-train.onnx",
    "v8": COMMON_V3 + " --phantom-long-series 24 --threads 1 --init models/train/runs/v7/best.pt --lr 3e-4 "
                      "--minutes 120 --samples-per-epoch 960 --full-after 0.3 --run models/train/runs/v8 "
                      "--out /tmp/v8-train.onnx",
    # README.md: "$COMMON with --epochs 400"
    "v9": COMMON_V3.replace("--epochs 200", "--epochs 400") +
          " --phantom-long-series 24 --threads 2 --init models/train/runs/v8/best.pt --lr 4e-4 --minutes 105 "
          "--samples-per-epoch 960 --full-after 0.3 --iou-weight 1.0 --run models/train/runs/v9 "
          "--out /tmp/v9-train.onnx",
    "v10": COMMON_V3 + " --width 8 --chans 8,16,48,96 --bottom 192 --init models/train/runs/v9/best.pt --lr 4e-4 "
                       "--minutes 72 --samples-per-epoch 960 --full-after 0.3 --iou-weight 1.0 --threads 2 "
                       "--run models/train/runs/v10 --out /tmp/v10-train.onnx",
    "v12": COMMON_V3 + " --phantom-fraction 0.5 --width 8 --chans 8,16,48,96 --bottom 192 "
                       "--init models/train/runs/from-v0.5.0/best.pt --lr 4e-4 --minutes 85 --samples-per-epoch 960 "
                       "--full-after 0.3 --iou-weight 1.0 --ema 0.998 --threads 2 --run models/train/runs/v12 "
                       "--out /tmp/v12-train.onnx",
    "v13": COMMON_V3 + " --init models/train/runs/from-v0.5.0/best.pt --lr 3e-4 --minutes 36 --samples-per-epoch 960 "
                       "--full-after 0.3 --iou-weight 1.0 --ema 0.998 --hard-negatives 0.5 --threads 2 "
                       "--run models/train/runs/v13 --out /tmp/v13-train.onnx",
    "v14": COMMON_V3 + " --phantom-fraction 0.4 --width 16 --init /tmp/v050/best.pt --lr 3e-4 --minutes 100 "
                       "--samples-per-epoch 960 --full-after 0.3 --iou-weight 1.0 --ema 0.998 --hard-negatives 0.3 "
                       "--threads 2 --run models/train/runs/v14 --out /tmp/v14-train.onnx",
    "v15": "--init /tmp/v050/best.pt --lr 3e-4 --minutes 18 --samples-per-epoch 960 --ema 0.998 --threads 2 "
           "--epochs 400 --run models/train/runs/v15 --out /tmp/v15-train.onnx",
    "v16": COMMON_V3 + " --phantom-fraction 0.5 --init /tmp/v050/best.pt --lr 3e-4 --minutes 100 "
                       "--samples-per-epoch 960 --full-after 0.3 --iou-weight 1.0 --ema 0.998 --hard-negatives 0.3 "
                       "--hard-positives 0.5 --real-source-balance --threads 2 --run models/train/runs/v16 "
                       "--out /tmp/v16-train.onnx",
    "v17": "--init /tmp/v050/best.pt --lr 3e-4 --minutes 20 --samples-per-epoch 960 --ema 0.998 --threads 2 "
           "--epochs 400 --elastic 0.7 --run models/train/runs/v17 --out /tmp/v17-train.onnx",
    "n1": "--init models/train/runs/from-v0.5.0/best.pt --negatives 0.3 --hard-real-negatives 0.5 --lr 2e-4 "
          "--ema 0.99 --threads 1 --minutes 45 --epochs 200 --samples-per-epoch 480 --run models/train/runs/n1",
    "n2": "--init models/train/runs/n1/epoch012.pt --negatives 0.35 --hard-real-negatives 0.5 " + PH +
          " --phantom-fraction 0.35 --lr 3e-4 --ema 0.99 --threads 1 --minutes 60 --epochs 300 "
          "--samples-per-epoch 480 --run models/train/runs/n2",
    "n3": N3,
    "n6": "--init models/train/runs/n3/epoch029.pt --hard-real-positives 0.4 --negatives 0.4 "
          "--hard-real-negatives 0.5 " + PH + " --phantom-fraction 0.3 --fp-pixel-weight 5 --fn-pixel-weight 3 "
          "--lr 2e-4 --ema 0.99 --threads 1 --minutes 38 --epochs 300 --samples-per-epoch 480 "
          "--run models/train/runs/n6",
    "n7": COMMON_N7 + " --negatives 0.3 --phantom-fraction 0.6 --run models/train/runs/n7",
    "n8": N8,
    # n4, n5 and n9 had no command line in README.md, only what they changed: n3's / n8's command plus that.
    "n4": N3 + " --init models/train/runs/from-v0.5.0/best.pt --freeze-bn --run models/train/runs/n4",
    "n5": N3 + " --init models/train/runs/n3/epoch022.pt --real-source-balance --fn-pixel-weight 6 --lr 2e-4 "
               "--run models/train/runs/n5",
    "n9": N8 + " --init models/train/runs/n8/epoch001.pt --phantom-fraction 0.7 --hard-positives 0.6 "
               "--fn-pixel-weight 5 --lr 1e-4 --run models/train/runs/n9",
}


def resolved(argv: list[str]) -> dict:
    """train.py's resolved options for this command line, without the --config file's own name."""
    d = json.loads(as_json(parse_args(argv)))
    d.pop("config")
    return d


class RunFiles(unittest.TestCase):
    def test_every_recorded_run_has_its_run_file(self):
        files = {p.stem for p in RUNS.glob("*.toml")}
        self.assertEqual(sorted(set(RECORDED) - files), [])

    def test_each_run_file_resolves_to_its_command_line(self):
        for name, command in RECORDED.items():
            with self.subTest(run=name):
                self.assertEqual(resolved(["--config", str(RUNS / f"{name}.toml")]), resolved(shlex.split(command)))

    def test_every_run_file_is_valid_and_says_something(self):
        defaults = resolved([])
        for path in sorted(RUNS.glob("*.toml")):
            with self.subTest(run=path.stem):
                self.assertNotEqual(resolved(["--config", str(path)]), defaults)

    def test_run_files_hold_only_what_differs_from_the_defaults(self):
        import tomllib
        defaults = resolved([])
        for path in sorted(RUNS.glob("*.toml")):
            table = tomllib.loads(path.read_text())
            for key in table:
                dest = key.replace("-", "_")
                with self.subTest(run=path.stem, key=key):
                    self.assertNotEqual(resolved(["--config", str(path)])[dest], defaults[dest])


class ConfigRules(unittest.TestCase):
    def parse_error(self, argv: list[str]) -> str:
        """What argparse says when these arguments are refused (the test fails if they are accepted)."""
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit):
            parse_args(argv)
        return err.getvalue()

    def write(self, text: str) -> str:
        f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        f.write(text)
        f.close()
        self.addCleanup(Path(f.name).unlink)
        return f.name

    def test_command_line_overrides_the_run_file(self):
        n3 = resolved(["--config", str(RUNS / "n3.toml")])
        got = resolved(["--config", str(RUNS / "n3.toml"), "--minutes", "5", "--no-phantoms", "--init", "x.pt"])
        self.assertEqual((got["minutes"], got["phantoms"], got["init"]), (5.0, False, "x.pt"))
        self.assertEqual({k: v for k, v in got.items() if k not in ("minutes", "phantoms", "init")},
                         {k: v for k, v in n3.items() if k not in ("minutes", "phantoms", "init")})
        # the option may come before --config too
        self.assertEqual(resolved(["--minutes", "5", "--config", str(RUNS / "n3.toml")])["minutes"], 5.0)

    def test_values_convert_as_on_the_command_line(self):
        path = self.write('lr = 1e-3\nfp-pixel-weight = 5\nchans = "8,16,48,96"\ninit = "a/b.pt"\nphantoms = true\n')
        self.assertEqual(resolved(["--config", path]),
                         resolved(["--lr", "1e-3", "--fp-pixel-weight", "5", "--chans", "8,16,48,96",
                                   "--init", "a/b.pt", "--phantoms"]))

    def test_a_plain_store_true_option_is_a_boolean_key(self):
        ap = build_parser()
        ap.add_argument("--some-flag", action="store_true")
        self.assertEqual(read_run_file(ap, Path(self.write("some-flag = true\nphantoms = false\n"))),
                         {"some_flag": True, "phantoms": False})

    def test_unknown_key_is_refused_by_name(self):
        path = self.write("phantom-series = 40\n")
        self.assertIn("`phantom-series` is not an option", self.parse_error(["--config", path]))

    def test_dest_spelling_and_run_options_are_not_keys(self):
        for text in ("phantom_train_series = 40\n", 'config = "x.toml"\n', "print-args = true\n",
                     "no-phantoms = true\n"):
            with self.subTest(text=text):
                self.assertIn("is not an option", self.parse_error(["--config", self.write(text)]))

    def test_wrong_types_are_refused(self):
        for text, says in (("epochs = 2.5\n", "`epochs` = 2.5 is not a valid int"),
                           ('phantoms = "yes"\n', "`phantoms` is true or false"),
                           ("lr = true\n", "`lr` is a number or a string"),
                           ("refine-kernel = 2\n", "`refine-kernel` = 2 is not one of [1, 3]"),
                           ("minutes = [1, 2]\n", "`minutes` is a number or a string")):
            with self.subTest(text=text):
                self.assertIn(says, self.parse_error(["--config", self.write(text)]))

    def test_missing_or_broken_file_is_refused(self):
        missing = str(RUNS / "no-such-run.toml")
        self.assertIn(f"error: --config {missing}: ", self.parse_error(["--config", missing]))
        broken = self.write("lr = \n")
        self.assertIn(f"error: --config {broken}: Invalid value", self.parse_error(["--config", broken]))


@unittest.skipIf(importlib.util.find_spec("torch") is None, "train.py needs PyTorch")
class TrainPrintArgs(unittest.TestCase):
    """train.py --print-args, run both ways README.md and the scripts call it, from the repository root."""

    def print_args(self, *head: str) -> dict:
        out = subprocess.run([sys.executable, *head, "--config", "models/train/runs/v9.toml", "--print-args"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    def test_as_a_file_and_as_a_module_alike(self):
        as_file = self.print_args("models/train/train.py")
        self.assertEqual(as_file, self.print_args("-m", "models.train.train"))
        as_file.pop("config")
        self.assertEqual(as_file, resolved(shlex.split(RECORDED["v9"])))


# device_pack.py and the --device / --amp / --pack options: their tests run with these (scripts/test runs this module)
from models.train.test_device_pack import DeviceOptions, PackRoundTrip  # noqa: E402,F401
# context.py and the model's neighbour channels (--context, the 2.5D input)
from models.train.test_context import NeighbourChannels, Neighbours  # noqa: E402,F401
from models.train.test_losses import AeratedLabel, BorderLabel  # noqa: E402,F401
# ensemble.py (several exported models composed into one graph)
from models.train.test_ensemble import EnsembleTest  # noqa: E402,F401

if __name__ == "__main__":
    unittest.main()
