"""A small 2D U-Net: 1x256x256 normalised CT -> 3x256x256 logits (background, lung, lesion).

A stride-2 stem halves the resolution first (CPU latency), four encoder levels (widths w, 2w, 4w, 8w at
1/2 .. 1/16), a decoder with skip connections, and a full-resolution refinement that sees the raw input
again so edges stay sharp. Only Conv, BatchNorm (folded at export), ReLU, MaxPool, ConvTranspose and
Concat: operators every ONNX runtime (onnxruntime, tract) supports.
"""
from __future__ import annotations

import torch
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, width: int = 12, levels: int = 4, classes: int = 3):
        super().__init__()
        self.width, self.levels = width, levels
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        chans = [w * 2**i for i in range(levels)]
        self.enc = nn.ModuleList()
        cin = w
        for c in chans:
            self.enc.append(block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.bottom = block(chans[-1], chans[-1] * 2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = chans[-1] * 2
        for c in reversed(chans):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.dec.append(block(2 * c, c))
            cin = c
        # back to full resolution, refined with the input itself
        self.up_full = nn.ConvTranspose2d(w, w, 2, stride=2)
        self.refine = nn.Sequential(
            nn.Conv2d(w + 1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = []
        for i, e in enumerate(self.enc):
            h = e(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottom(h)
        for up, dec, s in zip(self.up, self.dec, reversed(skips)):
            h = dec(torch.cat([up(h), s], 1))
        h = self.up_full(h)
        h = self.refine(torch.cat([h, x], 1))
        return self.head(h)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
