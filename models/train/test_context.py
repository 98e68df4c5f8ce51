"""context.py (the 2.5D input's neighbour slices) and UNet's neighbour channels, on synthetic series.

    python3 -m unittest models.train.test_context      # scripts/test runs it through test_run_files

Needs numpy (skipped without it); the model test needs PyTorch (skipped without it). No LUNGSENTRY_DATA.
"""
from __future__ import annotations

import importlib.util
import unittest

HAVE_NP = importlib.util.find_spec("numpy") is not None
HAVE_TORCH = HAVE_NP and importlib.util.find_spec("torch") is not None


def smooth_series(rng, n: int, drift: float):
    """n slices of a smooth random image drifting by `drift` of fresh noise per slice (small drift: thin slices)."""
    import numpy as np
    base = rng.random((64, 64))
    out = []
    for _ in range(n):
        base = (1 - drift) * base + drift * rng.random((64, 64))
        out.append(base.copy())
    x = np.array(out)
    return (255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)


@unittest.skipUnless(HAVE_NP, "context.py needs numpy")
class Neighbours(unittest.TestCase):
    def setUp(self):
        import numpy as np
        from models.train.context import Context
        rng = np.random.default_rng(7)
        self.thin = smooth_series(rng, 12, 0.05)    # consecutive correlation well above 0.9
        self.thick = smooth_series(rng, 6, 0.3)     # correlated (0.72-0.87), below 0.9
        gap = smooth_series(rng, 8, 0.05)
        gap[4:] = smooth_series(rng, 4, 0.05)      # an unrelated block: a gap as covid19-ct-seg-256 has them
        self.ct = np.concatenate([self.thin, self.thick, gap])
        self.group = np.repeat([0, 1, 2], [12, 6, 8])
        self.ctx = Context(self.ct, self.group)

    def test_runs_stop_at_series_and_gaps(self):
        c = self.ctx
        self.assertEqual(c.n_runs, 4)
        self.assertEqual((int(c.lo[11]), int(c.hi[11])), (0, 11))
        self.assertEqual((int(c.lo[12]), int(c.hi[12])), (12, 17))
        self.assertEqual((int(c.lo[18]), int(c.hi[18])), (18, 21))
        self.assertEqual((int(c.lo[22]), int(c.hi[25])), (22, 25))

    def test_thin_series_step_further(self):
        c = self.ctx
        self.assertTrue(c.thin[:12].all())
        self.assertFalse(c.thin[12:18].any())
        self.assertEqual(c.neighbours(5, c.eval_step(5)), (3, 7))
        self.assertEqual(c.neighbours(14, c.eval_step(14)), (13, 15))

    def test_ends_and_gaps_repeat_the_slice(self):
        c = self.ctx
        self.assertEqual(c.neighbours(0, 2), (0, 2))
        self.assertEqual(c.neighbours(17, 1), (16, 17))   # the thick series' last slice: nothing below
        self.assertEqual(c.neighbours(21, 2), (19, 21))   # before the gap
        self.assertEqual(c.neighbours(22, 2), (22, 24))   # after it

    def test_inputs_and_stack_agree(self):
        import numpy as np
        c = self.ctx
        idx = np.array([0, 5, 17, 22])
        x = c.inputs(self.ct, idx)
        self.assertEqual(x.shape, (4, 3, 64, 64))
        for j, i in enumerate(idx):
            np.testing.assert_array_equal(x[j], np.moveaxis(c.stack(self.ct, int(i), c.eval_step(int(i))), -1, 0))
            np.testing.assert_array_equal(x[j, 1], self.ct[i])

    def test_draw_step_is_one_on_thick_series(self):
        import numpy as np
        rng = np.random.default_rng(1)
        self.assertEqual({self.ctx.draw_step(14, rng) for _ in range(50)}, {1})
        self.assertEqual({self.ctx.draw_step(5, rng) for _ in range(200)}, {1, 2, 3})


@unittest.skipUnless(HAVE_TORCH, "the model needs PyTorch")
class NeighbourChannels(unittest.TestCase):
    def test_a_2d_checkpoint_loaded_with_context_computes_the_same(self):
        import torch
        from models.train.model import UNet, context_from
        torch.manual_seed(0)
        flat, ctx = UNet(8, 4), UNet(8, 4, in_ch=3)
        context_from(ctx, flat.state_dict())
        flat.eval()
        ctx.eval()
        x = torch.rand(2, 1, 64, 64)
        x3 = torch.cat([torch.rand(2, 1, 64, 64), x, torch.rand(2, 1, 64, 64)], 1)
        self.assertLess(float((flat(x) - ctx(x3)).abs().max()), 1e-6)
        # inflated: the same function on three copies of the slice, and every channel read
        inflated = UNet(8, 4, in_ch=3)
        context_from(inflated, flat.state_dict(), inflate=True)
        inflated.eval()
        same = float((flat(x) - inflated(torch.cat([x, x, x], 1))).abs().max())
        other = float((flat(x) - inflated(x3)).abs().max())
        self.assertLess(same, 1e-6)
        self.assertGreater(other, 100 * same + 1e-5)
        # and the neighbours are read once their weights are not zero
        with torch.no_grad():
            ctx.stem[0].weight[:, 0] += 0.1
        self.assertGreater(float((flat(x) - ctx(x3)).abs().max()), 1e-3)


if __name__ == "__main__":
    unittest.main()
