"""A small 2D U-Net: 1x256x256 normalised CT -> 3x256x256 logits (background, lung, lesion).

With `in_ch` 3 (train.py `--context`, issue 26's 2.5D input) the input is [slice above | slice | slice below], the
neighbours as channels; the refinement still sees the centre slice only.

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
    """`chans` (per-level widths) and `bottom` default to w, 2w, 4w, 8w and 16w; `refine_kernel` 1 makes the
    full-resolution refinement a 1x1 convolution (cheap on CPU where the deeper levels are widened instead)."""

    def __init__(self, width: int = 12, levels: int = 4, classes: int = 3, chans: list[int] | None = None,
                 bottom: int | None = None, refine_kernel: int = 3, in_ch: int = 1):
        super().__init__()
        assert in_ch % 2 == 1, "in_ch: the slice and as many neighbours on each side"
        self.width, self.levels, self.in_ch = width, levels, in_ch
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        chans = list(chans) if chans else [w * 2**i for i in range(levels)]
        assert len(chans) == levels and chans[0] == w, "chans: one width per level, the first equal to width"
        self.enc = nn.ModuleList()
        cin = w
        for c in chans:
            self.enc.append(block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        bottom = bottom or chans[-1] * 2
        self.bottom = block(chans[-1], bottom)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = bottom
        for c in reversed(chans):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.dec.append(block(2 * c, c))
            cin = c
        # back to full resolution, refined with the input itself
        self.up_full = nn.ConvTranspose2d(w, w, 2, stride=2)
        k = refine_kernel
        self.refine = nn.Sequential(
            nn.Conv2d(w + 1, w, k, padding=k // 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
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
        c = self.in_ch // 2
        h = self.refine(torch.cat([h, x[:, c:c + 1]], 1))
        return self.head(h)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def from_summary(summ: dict) -> UNet:
    """The architecture a run's summary.json describes."""
    return UNet(summ["width"], summ["levels"], chans=summ.get("chans"), bottom=summ.get("bottom"),
                refine_kernel=summ.get("refine_kernel", 3), in_ch=summ.get("in_ch", 1))


def context_from(model: UNet, old: dict, inflate: bool = False) -> None:
    """Loads a one-channel (2D) checkpoint of the same architecture into a model with neighbour channels. By default
    it computes the same function: the stem's weights read the centre channel, the neighbours' weights are zero.
    With `inflate` the stem's weights are shared equally by all channels (as I3D inflates 2D filters): the model
    starts on the mean of the slices, so every channel is in use from the first step."""
    state = dict(old)
    w = state["stem.0.weight"]
    t = torch.zeros_like(model.state_dict()["stem.0.weight"])
    if inflate:
        t[:] = w / model.in_ch
    else:
        t[:, model.in_ch // 2] = w[:, 0]
    state["stem.0.weight"] = t
    model.load_state_dict(state)


def widen_from(model: UNet, old: dict) -> None:
    """Loads a narrower checkpoint of the same family into `model` so it computes the same function (Net2Wider with
    zero outgoing weights): old channels keep their weights, new output channels keep the fresh initialisation,
    and every weight that reads a new channel is zero, so the new channels change nothing until trained. The
    decoder's first convolution reads [upsampled | skip] and the refinement [upsampled | input]; both parts are
    mapped. A 3x3 refinement going to 1x1
    keeps its centre tap (an approximation; fine-tuning takes it from there)."""
    new = model.state_dict()
    with torch.no_grad():
        for name, t in new.items():
            o = old[name]
            if o.shape == t.shape:
                t.copy_(o)
                continue
            if t.dim() == 1:  # BatchNorm / bias: old leading entries, new ones as initialised
                t[: o.shape[0]].copy_(o)
                continue
            if o.shape[2:] != t.shape[2:]:  # refine 3x3 -> 1x1: the centre tap
                c = o.shape[2] // 2
                o = o[:, :, c:c + 1, c:c + 1]
            transposed = name.startswith("up.") or name.startswith("up_full.")
            if transposed:  # ConvTranspose2d weight: (in, out, k, k); new inputs read nothing
                t[o.shape[0]:].zero_()
                t[: o.shape[0], : o.shape[1]].copy_(o)
                continue
            # Conv2d weight (out, in, k, k)
            parts = name.split(".")
            if name == "refine.0.weight" and t.shape[1] != o.shape[1]:  # reads [upsampled | input image]
                ow = o.shape[1] - 1
                t.zero_()
                t[: o.shape[0], :ow].copy_(o[:, :ow])
                t[: o.shape[0], -1:].copy_(o[:, ow:])
                continue
            if parts[0] == "dec" and parts[2] == "0":  # dec.<level>.0.weight: reads [upsampled | skip]
                oh, th = o.shape[1] // 2, t.shape[1] // 2
                t[:, :].zero_()
                t[: o.shape[0], :oh].copy_(o[:, :oh])
                t[: o.shape[0], th:th + oh].copy_(o[:, oh:])
                # new output rows read old and new inputs: random on the old inputs, as initialised
                fresh = torch.empty_like(t[o.shape[0]:])
                nn.init.kaiming_uniform_(fresh, a=5 ** 0.5)
                t[o.shape[0]:] = fresh
                t[o.shape[0]:, oh:th].zero_()
                t[o.shape[0]:, th + oh:].zero_()
                continue
            t[:, o.shape[1]:].zero_()
            t[: o.shape[0], : o.shape[1]].copy_(o)
    model.load_state_dict(new)
