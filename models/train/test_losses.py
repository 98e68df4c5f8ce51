"""train.py's losses with the partial labels AERATED (--aerated-below-hu) and BORDER (--border-band-px), on random
logits.

    python3 -m unittest models.train.test_losses      # scripts/test runs it through test_run_files

Needs PyTorch (skipped without it). No LUNGSENTRY_DATA.
"""
from __future__ import annotations

import importlib.util
import unittest

HAVE_TORCH = importlib.util.find_spec("numpy") is not None and importlib.util.find_spec("torch") is not None


@unittest.skipUnless(HAVE_TORCH, "the losses need PyTorch")
class AeratedLabel(unittest.TestCase):
    def setUp(self):
        import torch
        g = torch.Generator().manual_seed(7)
        self.logits = torch.randn(2, 3, 8, 8, generator=g) * 3
        self.y = torch.randint(0, 3, (2, 8, 8), generator=g)

    def test_plain_labels_are_the_usual_cross_entropy(self):
        import torch.nn.functional as F
        from models.train.train import pixel_ce
        ref = F.cross_entropy(self.logits, self.y, reduction="none")
        self.assertLess(float((pixel_ce(self.logits, self.y) - ref).abs().max()), 1e-5)

    def test_aerated_pixels_accept_lung_or_lesion(self):
        from models.train.train import AERATED, pixel_ce
        y = self.y.clone()
        y[:, :4] = AERATED
        p = self.logits.softmax(1)
        want = -(p[:, 1] + p[:, 2]).log()
        got = pixel_ce(self.logits, y)
        self.assertLess(float((got[:, :4] - want[:, :4]).abs().max()), 1e-5)
        # lesion there costs nothing more than lung: moving mass from lung to lesion leaves the loss unchanged
        swapped = self.logits.clone()
        swapped[:, [1, 2]] = self.logits[:, [2, 1]]
        self.assertLess(float((pixel_ce(swapped, y)[:, :4] - got[:, :4]).abs().max()), 1e-5)
        # but background there is still wrong
        bg = self.logits.clone()
        bg[:, 0] += 10
        self.assertTrue(bool((pixel_ce(bg, y)[:, :4] > got[:, :4]).all()))

    def test_lesion_called_on_aerated_lung_is_no_false_lesion(self):
        import torch
        from models.train.train import AERATED, dice_ce_loss, error_weighted_ce
        y = torch.ones(1, 8, 8, dtype=torch.long)  # a lesion-free slice, all lung
        y[0, 0, 0] = 2  # one lesion pixel so the lesion Dice has a target
        lesion_everywhere = torch.zeros(1, 3, 8, 8)
        lesion_everywhere[:, 2] = 8.0
        aer = y.clone()
        aer[y == 1] = AERATED
        # as plain lung the called lesion is penalised; as aerated lung far less (only the lesion Dice's target pixel
        # and the lung term remain)
        self.assertGreater(float(dice_ce_loss(lesion_everywhere, y)), 5 * float(dice_ce_loss(lesion_everywhere, aer)))
        self.assertGreater(float(error_weighted_ce(lesion_everywhere, y, 5.0, 3.0)),
                           100 * float(error_weighted_ce(lesion_everywhere, aer, 5.0, 3.0)))


@unittest.skipUnless(HAVE_TORCH, "the losses need PyTorch")
class BorderLabel(unittest.TestCase):
    def test_the_rim_accepts_background_or_lung_but_not_lesion(self):
        import torch
        from models.train.train import BORDER, pixel_ce
        g = torch.Generator().manual_seed(11)
        logits = torch.randn(1, 3, 4, 4, generator=g) * 3
        y = torch.full((1, 4, 4), BORDER, dtype=torch.long)
        p = logits.softmax(1)
        self.assertLess(float((pixel_ce(logits, y) - -(p[:, 0] + p[:, 1]).log()).abs().max()), 1e-5)
        swapped = logits.clone()
        swapped[:, [0, 1]] = logits[:, [1, 0]]
        self.assertLess(float((pixel_ce(swapped, y) - pixel_ce(logits, y)).abs().max()), 1e-5)
        lesion = logits.clone()
        lesion[:, 2] += 10
        self.assertTrue(bool((pixel_ce(lesion, y) > pixel_ce(logits, y)).all()))

    def test_the_rim_is_out_of_the_lung_dice(self):
        import torch
        from models.train.train import BORDER, dice_ce_loss
        y = torch.zeros(1, 8, 8, dtype=torch.long)
        y[0, 2:6, 2:6] = 1
        y[0, 1, 2:6] = BORDER
        right = torch.full((1, 3, 8, 8), -8.0)
        right[:, 0] = 8.0
        right[:, 0, 2:6, 2:6], right[:, 1, 2:6, 2:6] = -8.0, 8.0
        rim_as_lung = right.clone()
        rim_as_lung[:, 0, 1, 2:6], rim_as_lung[:, 1, 1, 2:6] = -8.0, 8.0
        self.assertLess(abs(float(dice_ce_loss(right, y)) - float(dice_ce_loss(rim_as_lung, y))), 1e-3)


if __name__ == "__main__":
    unittest.main()
