"""Float32 accuracy of the cpu backend's Winograd F(4x4, 3x3) tiles against a direct
(oneDNN) convolution, both measured against a float64 direct convolution, as the
largest |error| relative to max|y|, over channel counts and map sizes.

    python benchmarks/winograd_accuracy.py [--seeds 3]

The numbers are quoted in csrc/cpu/winograd_conv3x3.h and docs/layers.md, and
tests/test_winograd_cpu.py takes its float32 tolerance from them.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import medmtl
from medmtl.ops import multi_dilation_conv

# (batch, Cin, Cout, H, W, dilation): the DFE levels of ResFormerMTL at 224x224
# (the concat fuse 256 -> 64 on 56x56 among them) and wider/narrower channels.
CASES = [
    (2, 64, 64, 112, 112, 1),
    (2, 128, 128, 56, 56, 1),
    (2, 256, 64, 56, 56, 1),
    (2, 512, 128, 28, 28, 1),
    (2, 1024, 256, 28, 28, 1),
    (1, 64, 64, 112, 112, 6),
]


def relative_errors(batch, cin, cout, h, w, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(1, cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
    exact = F.conv2d(x.double(), weight[0].double(), padding=d, dilation=d)
    scale = exact.abs().max().item()
    with torch.no_grad(), medmtl.backend("cpu"):
        tiles = multi_dilation_conv(x, weight, [d], None, "sum")
    direct = F.conv2d(x, weight[0], padding=d, dilation=d)
    return ((tiles.double() - exact).abs().max().item() / scale,
            (direct.double() - exact).abs().max().item() / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| B | Cin -> Cout | H x W | d | Winograd / max|y| | direct / max|y| | ratio |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for case in CASES:
        errs = [relative_errors(*case, seed) for seed in range(args.seeds)]
        wino = max(e[0] for e in errs)
        direct = max(e[1] for e in errs)
        worst = max(worst, wino)
        b, cin, cout, h, w, d = case
        print(f"| {b} | {cin} -> {cout} | {h} x {w} | {d} | {wino:.2e} | {direct:.2e} | {wino / direct:.0f}x |")
    print(f"worst Winograd float32 error / max|y|: {worst:.2e}")


if __name__ == "__main__":
    main()
