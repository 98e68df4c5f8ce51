#!/usr/bin/env python3
"""The same operations as kernels/window.cu and kernels/decode.cu written as ordinary PyTorch (unfused) on the GPU,
timed with CUDA events: the baseline `scripts/gpu-check` compares our kernels with. Not bit-exact (PyTorch's
bilinear is float, the CLAHE residual redistribution is omitted); it does the same memory traffic and arithmetic.

    python3 scripts/gpu_torch_baseline.py --slices 300 --out torch.json
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        json.dump({"error": "PyTorch is not installed here"}, open(a.out, "w"))
        print("PyTorch is not installed here; no baseline")
        return 0
    if not torch.cuda.is_available():
        json.dump({"error": "no CUDA device for PyTorch"}, open(a.out, "w"))
        print("no CUDA device for PyTorch")
        return 0
    dev = torch.device("cuda")
    n, s, m = a.slices, a.size, a.input
    g = torch.Generator(device=dev).manual_seed(1)
    raw = torch.randint(0, 4095, (n, s, s), device=dev, dtype=torch.int16, generator=g)
    slope = torch.ones(n, 1, 1, device=dev)
    intercept = torch.full((n, 1, 1), -1024.0, device=dev)
    tiles, clip_limit = 8, 7.0
    th = s // tiles
    clip = max(int(clip_limit * th * th / 256), 1)
    # Per pixel: the two tile rows/cols and weights (OpenCV's CLAHE interpolation).
    pos = (torch.arange(s, device=dev, dtype=torch.float32) / th) - 0.5
    t1 = pos.floor()
    w = pos - t1
    t1i = t1.long().clamp(min=0)
    t2i = (t1.long() + 1).clamp(max=tiles - 1)
    nidx = torch.arange(n, device=dev)[:, None, None]

    def window(clahe=True):
        hu = raw.float() * slope + intercept
        hu = hu.clamp(-1024.0, 3071.0)
        lo = hu.amin(dim=(1, 2), keepdim=True)
        hi = hu.amax(dim=(1, 2), keepdim=True)
        u8 = torch.floor((hu - lo) / (hi - lo).clamp(min=1e-6) * 255 + 0.5).clamp(0, 255).long()
        if clahe:
            t = u8.view(n, tiles, th, tiles, th).permute(0, 1, 3, 2, 4).reshape(n * tiles * tiles, th * th)
            hist = torch.zeros(n * tiles * tiles, 256, device=dev).scatter_add_(1, t, torch.ones_like(t, dtype=torch.float32))
            excess = (hist - clip).clamp(min=0).sum(1, keepdim=True)
            hist = hist.clamp(max=clip) + torch.floor(excess / 256)
            lut = (hist.cumsum(1) * (255.0 / (th * th))).round().clamp(0, 255).view(n, tiles, tiles, 256)
            a = lut[nidx, t1i[None, :, None], t1i[None, None, :], u8]
            b = lut[nidx, t1i[None, :, None], t2i[None, None, :], u8]
            c = lut[nidx, t2i[None, :, None], t1i[None, None, :], u8]
            d = lut[nidx, t2i[None, :, None], t2i[None, None, :], u8]
            wx, wy = w[None, None, :], w[None, :, None]
            img = ((a * (1 - wx) + b * wx) * (1 - wy) + (c * (1 - wx) + d * wx) * wy).round()
        else:
            img = u8.float()
        x = F.interpolate(img.unsqueeze(1), size=(m, m), mode="bilinear", align_corners=False)
        return (x / 255.0).half()

    scores16 = torch.randn(n, 3, m, m, device=dev, generator=g).half()

    def decode(scores):
        up = F.interpolate(scores.float(), size=(s, s), mode="bilinear", align_corners=False)
        lab = up.argmax(1)
        lung = lab >= 1
        lesion = lab == 2
        counts = torch.stack([lung.sum((1, 2)), lesion.sum((1, 2))], 1)
        return lung, lesion, counts

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.repeats):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        times.sort()
        return times[len(times) // 2]

    res = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "slices": n,
        "size": s,
        "input": m,
        "window_with_clahe_ms": timed(lambda: window(True)),
        "window_without_clahe_ms": timed(lambda: window(False)),
        "decode_fp16_ms": timed(lambda: decode(scores16)),
    }
    json.dump(res, open(a.out, "w"), indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
