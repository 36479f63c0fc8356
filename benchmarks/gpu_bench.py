"""A short GPU benchmark, part of `make gpu-check`: every op's cases (ResFormerMTL
shapes at 224 px, batch 8, and SwinUNETR's 3-D window), forward and forward +
backward, on the providers reference, torch.compile(reference), cuda and triton
(medmtl's ops under that backend), float32 and bfloat16, in one process.

    python benchmarks/gpu_bench.py --out gpu-check-results [--rounds 20] [--ops window_attention,...]

Each provider's calls are timed with CUDA events after warm-up (compilation
included in warm-up), rounds interleaved across providers; the median per
provider and its ratio to the reference go to OUT/gpu_bench.md and
OUT/gpu_bench.json. A provider that fails records its error instead. Not a
test: nothing asserts a timing. Without a GPU it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

B = 8


def _cases():
    """{op: [(name, make_args() -> (args for the op), reference fn, medmtl fn)]}."""
    import medmtl.ops as ops
    from medmtl.ops import reference as ref

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)

    def pool(shapes, sizes):
        def make(dtype):
            xs = [randn(*s, dtype=dtype) for s in shapes]
            sc = [randn(s[1], dtype=dtype).abs() + 0.5 for s in shapes]
            sh = [randn(s[1], dtype=dtype, scale=0.1) for s in shapes]
            return xs, sc, sh
        return (make, lambda xs, sc, sh: ref.multiscale_pool(xs, sizes, "avg", sc, sh, "relu"),
                lambda xs, sc, sh: ops.multiscale_pool(xs, sizes, "avg", sc, sh, "relu"))

    def conv(cin, cout, hw, dilations, combine):
        def make(dtype):
            n = len(dilations)
            return (randn(B, cin, *hw, dtype=dtype), randn(n, cout, cin, 3, 3, dtype=dtype, scale=(9 * cin) ** -0.5),
                    randn(cout * (n if combine == "concat" else 1), dtype=dtype))
        return (make, lambda x, w, b: ref.multi_dilation_conv(x, w, dilations, b, combine, True),
                lambda x, w, b: ops.multi_dilation_conv(x, w, dilations, b, combine, "relu"))

    def gate(c, hw):
        def make(dtype):
            return randn(B, c, *hw, dtype=dtype), randn(1, 2, 7, 7, dtype=dtype, scale=1 / 7)
        return make, lambda x, w: ref.spatial_attention(x, w), lambda x, w: ops.spatial_attention(x, w)

    def attention(spatial, heads, hd, window, shift, batch=B):
        def make(dtype):
            qkv = randn(batch, *spatial, 3, heads, hd, dtype=dtype)
            rows = math.prod(2 * w - 1 for w in window)
            return (*qkv.unbind(-3), randn(rows, heads, dtype=dtype, scale=0.02), randn(heads, hd, dtype=dtype),
                    randn(heads, hd, dtype=dtype))
        return (make, lambda q, k, v, t, pk, pv: ref.window_attention(q, k, v, window, shift, t, hd ** -0.5, pk, pv),
                lambda q, k, v, t, pk, pv: ops.window_attention(q, k, v, window, shift, t, hd ** -0.5, pk, pv))

    return {
        "multiscale_pool": [("head_C256x14+C512x7_s1", *pool([(B, 256, 14, 14), (B, 512, 7, 7)], (1,))),
                            ("pyramid_C512x28_s1236", *pool([(B, 512, 28, 28)], (1, 2, 3, 6)))],
        "multi_dilation_conv": [("dfe_sum_C64_56x56_d6-12-18", *conv(64, 64, (56, 56), [6, 12, 18], "sum")),
                                ("dfe_concat_C256_28x28_d0-6-12-18", *conv(256, 256, (28, 28), [0, 6, 12, 18],
                                                                          "concat"))],
        "spatial_attention": [("C64_112x112", *gate(64, (112, 112))), ("C256_28x28", *gate(256, (28, 28)))],
        "window_attention": [("stage1_C64_112x112_w14", *attention((112, 112), 2, 32, (14, 14), (7, 7))),
                             ("stage2_C128_56x56_w14", *attention((56, 56), 4, 32, (14, 14), (7, 7))),
                             ("swinunetr3d_C48_32^3_w7", *attention((32, 32, 32), 3, 16, (7, 7, 7), (3, 3, 3),
                                                                    batch=2))],
    }


def _providers(ref_fn, op_fn):
    import medmtl

    def under(backend):
        def run(*args):
            with medmtl.backend(backend):
                return op_fn(*args)
        return run

    return {"reference": ref_fn, "compile(reference)": torch.compile(ref_fn),
            "cuda": under("cuda"), "triton": under("triton")}


def _step(fn, args, backward):
    leaves = [a for a in _flat(args) if a.is_floating_point()]
    if backward:
        for a in leaves:
            a.requires_grad_(True)

    def run():
        out = fn(*args)
        if backward:
            torch.autograd.grad(out.float().square().mean(), leaves)
    return run


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        elif isinstance(a, torch.Tensor):
            yield a


def _time(calls: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds per provider, rounds interleaved, CUDA events."""
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check-results")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (the rest is listed as not measured)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no GPU (torch.cuda.is_available() is False): nothing measured")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows, failures = [], 0
    start = time.monotonic()
    # float32 forward of every case first: what the budget cuts is the least important.
    plan = [(op, case, getattr(torch, d), backward) for d in args.dtypes.split(",") for backward in (False, True)
            for op, cases in _cases().items() if not args.ops or op in args.ops.split(",") for case in cases]
    for op, (name, make, ref_fn, op_fn), dtype, backward in plan:
        row = dict(op=op, case=name, dtype=str(dtype).removeprefix("torch."), pass_="fwd+bwd" if backward else "fwd",
                   ms={}, errors={})
        rows.append(row)
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            row["errors"] = {p: "not measured: out of time" for p in ("reference", "compile(reference)", "cuda",
                                                                      "triton")}
            continue
        torch.manual_seed(0)
        calls = {}
        for provider, fn in _providers(ref_fn, op_fn).items():
            try:
                step = _step(fn, make(dtype), backward)
                with torch.set_grad_enabled(backward):
                    for _ in range(3):
                        step()
                torch.cuda.synchronize()
                calls[provider] = step
            except Exception as e:  # recorded, not fatal: the report says which
                row["errors"][provider] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                failures += 1
                traceback.print_exc(limit=2)
        with torch.set_grad_enabled(backward):
            row["ms"] = _time(calls, args.rounds) if calls else {}
        print(op, name, row["dtype"], row["pass_"], {k: round(v, 3) for k, v in row["ms"].items()},
              row["errors"] or "", flush=True)
    (out / "gpu_bench.json").write_text(json.dumps(rows, indent=1))
    providers = ["reference", "compile(reference)", "cuda", "triton"]
    lines = [f"# GPU benchmark ({torch.cuda.get_device_name()}), median ms (x reference)", "",
             "| op | case | dtype | pass | " + " | ".join(providers) + " | fastest |",
             "|" + "---|" * (len(providers) + 5)]
    for row in rows:
        base = row["ms"].get("reference")
        cells = []
        for p in providers:
            if p in row["ms"]:
                ratio = f" ({base / row['ms'][p]:.2f}x)" if base else ""
                cells.append(f"{row['ms'][p]:.3f}{ratio}")
            else:
                cells.append("failed: " + row["errors"].get(p, "?").replace("|", "/"))
        fastest = min(row["ms"], key=row["ms"].get) if row["ms"] else "-"
        lines.append(f"| {row['op']} | {row['case']} | {row['dtype']} | {row['pass_']} | " + " | ".join(cells)
                     + f" | {fastest} |")
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
