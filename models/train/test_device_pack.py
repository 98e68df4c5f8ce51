"""device_pack.py on a tiny synthetic data set: encode / decode, what `Pack` gives train.py, the phantom subsets;
and the --device / --amp / --pack options.

    python3 -m unittest models.train.test_device_pack     # also run by models.train.test_run_files (scripts/test)

Needs numpy and OpenCV (skipped without them), not PyTorch, not LUNGSENTRY_DATA.
"""
from __future__ import annotations

import importlib.util
import io
import tempfile
import unittest
from contextlib import redirect_stderr
from pathlib import Path

from models.train.options import parse_args

HAVE_CV = importlib.util.find_spec("cv2") is not None and importlib.util.find_spec("numpy") is not None


def ct_like(n: int, seed: int = 0):
    """u8 N x 256 x 256 slices with what the CT slices have: smooth anatomy-like structure plus fine noise."""
    import numpy as np
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    out = []
    for k in range(n):
        body = ((xx - 128) / 110.0) ** 2 + ((yy - 128) / 90.0) ** 2 < 1
        lung = (((np.abs(xx - 128) - 50) / 35.0) ** 2 + ((yy - 120 - 3 * k) / 60.0) ** 2) < 1
        img = np.where(body, 150.0, 10.0) - 100.0 * lung + rng.normal(0, 6, (256, 256))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def labels_like(ct):
    import numpy as np
    lab = (ct < 90).astype(np.uint8) * (ct > 20)
    lab[:, 100:120, 60:90] = 2 * lab[:, 100:120, 60:90]
    return lab.astype(np.uint8)


@unittest.skipUnless(HAVE_CV, "device_pack.py needs numpy and OpenCV")
class PackRoundTrip(unittest.TestCase):
    def test_ct_decodes_to_its_shape_with_bounded_error_and_lossless_is_exact(self):
        import numpy as np
        from models.train.device_pack import LOSSLESS, decode_ct, encode_ct
        ct = ct_like(5)
        blob, offsets = encode_ct(ct, 40, workers=2)
        back = decode_ct(blob, offsets, (256, 256), workers=2)
        self.assertEqual((back.shape, back.dtype), (ct.shape, np.uint8))
        mae = float(np.abs(back.astype(int) - ct).mean())
        self.assertLess(mae, 8.0)
        self.assertGreater(mae, 0.0)  # quality 40 is lossy: the test would not see a mixed-up quality otherwise
        self.assertLess(blob.nbytes, ct.nbytes / 2)
        q = np.array([LOSSLESS, 40, LOSSLESS, 40, 40])
        back = decode_ct(*encode_ct(ct, q, workers=2), (256, 256), workers=2)
        np.testing.assert_array_equal(back[q == LOSSLESS], ct[q == LOSSLESS])

    def test_a_pack_gives_what_the_loaders_give(self):
        import numpy as np
        from models.train.device_pack import Pack, pack_part, subset_series, write_pack
        real_ct, neg_ct, ph_ct = ct_like(6, 1), ct_like(4, 2), ct_like(8, 3)
        real_lab, neg_lab, ph_lab = labels_like(real_ct), labels_like(neg_ct), labels_like(ph_ct)
        ph = dict(ct=ph_ct, labels=ph_lab, series=np.repeat(np.arange(4), 2),
                  severity=["none", "mild", "moderate", "none"], seeds=[1000, 1001, 1002, 1003],
                  gt_involvement=[0.0, 1.5, 7.25, 0.0])
        sub = subset_series(ph, 2)  # series 0 and 2, renumbered 0 and 1
        parts, meta = {}, {}
        parts["real"], meta["real"] = pack_part("real", real_ct, real_lab, np.array([40, 40, 101, 101, 40, 40]))
        parts["neg-val"], meta["neg-val"] = pack_part("neg-val", neg_ct, neg_lab, 70, dict(
            series=np.array([0, 0, 1, 1]), names=np.array(["luna", "pancreas"])))
        name = "phantoms-train-4x2x512-none3"
        parts[name], meta[name] = pack_part(name, sub["ct"], sub["labels"], 40, dict(
            series=sub["series"], severity=np.array(sub["severity"]), seeds=np.array(sub["seeds"]),
            gt_involvement=np.array(sub["gt_involvement"])))
        self.assertEqual(meta["real"]["ct_mean_abs_error_by_quality"][101], 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pack.npz"
            size = write_pack(path, parts, dict(parts=meta))
            self.assertEqual(size, path.stat().st_size)
            pack = Pack(path)
            self.assertEqual(pack.parts, sorted(["real", "neg-val", name]))
            self.assertEqual(pack.meta["parts"]["real"]["slices"], 6)
            ct, lab = pack.real()
            self.assertEqual(ct.shape, real_ct.shape)
            np.testing.assert_array_equal(lab, real_lab)
            np.testing.assert_array_equal(ct[2:4], real_ct[2:4])  # the lossless slices
            self.assertLess(float(np.abs(ct.astype(int) - real_ct).mean()), 8.0)
            neg = pack.negatives("val")
            self.assertEqual(neg["names"], ["luna", "pancreas"])
            np.testing.assert_array_equal(neg["series"], [0, 0, 1, 1])
            np.testing.assert_array_equal(neg["labels"], neg_lab)
            d = pack.phantoms(name)
            self.assertEqual((d["severity"], d["seeds"], d["gt_involvement"]),
                             (["none", "moderate"], [1000, 1002], [0.0, 7.25]))
            np.testing.assert_array_equal(d["series"], [0, 0, 1, 1])
            np.testing.assert_array_equal(d["labels"], ph_lab[[0, 1, 4, 5]])
            self.assertEqual(d["ct"].shape, (4, 256, 256))
            with self.assertRaisesRegex(KeyError, "no part `neg-train`"):
                pack.negatives("train")

    def test_a_subset_keeping_one_severity_is_refused(self):
        import numpy as np
        from models.train.device_pack import subset_series
        # phantoms.severity_for(k, 3) for k = 0..11 (a lesion-free series every third)
        sev = ["none", "mild", "moderate", "none", "severe", "mild", "none", "moderate", "severe", "none", "mild",
               "moderate"]
        d = dict(ct=np.zeros((12, 2, 2), np.uint8), labels=np.zeros((12, 2, 2), np.uint8), series=np.arange(12),
                 severity=sev, seeds=list(range(12)), gt_involvement=[0.0] * 12)
        with self.assertRaisesRegex(ValueError, "keeps only \\['none'\\]"):
            subset_series(d, 3)
        self.assertEqual(subset_series(d, 4)["seeds"], [0, 4, 8])


class DeviceOptions(unittest.TestCase):
    def test_device_amp_and_pack_parse(self):
        args = parse_args([])
        self.assertEqual((args.device, args.amp, args.pack), ("cpu", False, None))
        args = parse_args(["--device", "cuda", "--amp", "--pack", "models/train/cache/device-pack.npz"])
        self.assertEqual((args.device, args.amp, args.pack),
                         ("cuda", True, Path("models/train/cache/device-pack.npz")))
        self.assertEqual(parse_args(["--device", "auto"]).device, "auto")
        with redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
            parse_args(["--device", "gpu"])
        self.assertIn("invalid choice: 'gpu'", err.getvalue())

    def test_device_and_pack_are_no_run_file_keys(self):
        for text in ('device = "cuda"\n', 'pack = "x.npz"\n'):
            with self.subTest(text=text), tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
                f.write(text)
                f.flush()
                with redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
                    parse_args(["--config", f.name])
                self.assertIn("is not an option", err.getvalue())
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write("amp = true\n")
            f.flush()
            self.assertTrue(parse_args(["--config", f.name]).amp)


if __name__ == "__main__":
    unittest.main()
