"""Batch-1 decode linears: fscale's ``gemv`` (Triton) vs cuBLAS ``F.linear``.

The projections of a Llama-3.1-8B layer (qkv 6144x4096, o 4096x4096, gate_up
28672x4096, down 4096x14336) and its head (128256x4096), bf16, one row. Each variant
runs 32 distinct weights per shape (a model's 32 layers, so no weight stays in L2)
inside one CUDA graph, as the engine's decode graphs run them; time = median of 20
replays / 32. For the Triton kernel every launch configuration of a grid is timed
(the best and the five best are recorded; ``gemv._config`` holds the choices), and
its default choice (``gemv._config``; down too since the engine-graph sweep). Then the whole
chain of 32 layers' products + head: cuBLAS vs ``gemv_triton``. Correctness first:
the kernel against fp32 ``F.linear``.

(A first version took up to 8 rows in one program; cuBLAS's tensor-core kernels beat
it at 2+ rows, 0.38-0.89x, so the kernel takes one row.)

Usage::

    python bench/gemv.py                 # on a CUDA machine: table last, JSON to $OUT
    TRITON_INTERPRET=1 python bench/gemv.py --smoke    # tiny sizes on CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _provenance import provenance  # noqa: E402

from fscale.kernels import gemv  # noqa: E402

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "head": (128256, 4096),
}
CONFIGS = list(itertools.product([2, 4, 8, 16], [128, 256, 512], [4, 8], [1, 2, 3]))


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn`` (``fn`` run twice first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2]


def products(linear, x, ws, **kw):
    """``x`` through every weight of ``ws`` (a model's layers), for one graph."""
    return lambda: [linear(x, w, **kw) for w in ws]


def check(dev, dtype) -> float:
    """Worst relative error of the kernel vs fp32 F.linear over odd shapes."""
    worst = 0.0
    for M, N, K, bias in [(1, 37, 200, False), (1, 64, 256, True), (1, 130, 4096, True)]:
        x = torch.randn(M, K, device=dev).to(dtype)
        w = torch.randn(N, K, device=dev).to(dtype)
        b = torch.randn(N, device=dev).to(dtype) if bias else None
        y = gemv.gemv_triton(x, w, b).float()
        r = F.linear(x.float(), w.float(), None if b is None else b.float())
        worst = max(worst, ((y - r).norm() / r.norm()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if args.smoke:
        x = torch.randn(1, 64)
        w = torch.randn(48, 64)
        y = gemv.gemv_triton(x, w)
        print("smoke max err", (y - F.linear(x, w)).abs().max().item())
        return
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rows_out, err = [], check(dev, dt)
    print(f"check: worst relative error vs fp32 F.linear {err:.2e}", flush=True)
    L = args.layers
    weights = {
        n: [torch.randn(s, device=dev, dtype=dt) * 0.02 for _ in range(L if n != "head" else 1)]
        for n, s in SHAPES.items()
    }
    M = 1
    for name, (N, K) in SHAPES.items():
        ws = weights[name] * (1 if name != "head" else 4)
        x = torch.randn(M, K, device=dev, dtype=dt)
        gb = sum(w.numel() * 2 for w in ws) / 1e9
        t_cublas = graph_time(products(F.linear, x, ws)) / len(ws)
        timed = []
        for c in CONFIGS:
            try:
                t = graph_time(products(gemv.gemv_launch, x, ws, config=c), 7)
            except Exception as e:  # noqa: BLE001  (a config that does not compile)
                print(f"  {name} M={M} {c}: {type(e).__name__}", flush=True)
                continue
            timed.append((t / len(ws), c))
        timed.sort()
        t_default = graph_time(products(gemv.gemv_triton, x, ws)) / len(ws)
        row = {
            "shape": name,
            "N": N,
            "K": K,
            "M": M,
            "cublas_us": t_cublas * 1e6,
            "triton_best_us": timed[0][0] * 1e6,
            "triton_best_config": timed[0][1],
            "triton_default_us": t_default * 1e6,
            "cublas_TBs": gb / len(ws) / t_cublas / 1e3,
            "triton_best_TBs": gb / len(ws) / timed[0][0] / 1e3,
            "top5": [(t * 1e6, c) for t, c in timed[:5]],
        }
        rows_out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top5"}), flush=True)

    # The decode chain at M = 1: every layer's four products, then the head.
    x1 = torch.randn(1, 28672, device=dev, dtype=dt)

    def chain(linear):
        def run():
            h = x1[:, :4096]
            for i in range(L):
                q = linear(h, weights["qkv"][i])
                o = linear(q[:, :4096], weights["o"][i])
                gu = linear(o, weights["gate_up"][i])
                h = linear(gu[:, :14336], weights["down"][i])
            return linear(h, weights["head"][0])

        return run

    nbytes = sum(w.numel() * 2 for n, ws in weights.items() for w in ws)
    t_c = graph_time(chain(F.linear))
    t_f = graph_time(chain(gemv.gemv_triton))
    summary = {
        "chain_weight_GB": nbytes / 1e9,
        "chain_cublas_ms": t_c * 1e3,
        "chain_fscale_ms": t_f * 1e3,
        "chain_cublas_TBs": nbytes / t_c / 1e12,
        "chain_fscale_TBs": nbytes / t_f / 1e12,
        "speedup": t_c / t_f,
        "check_rel_err": err,
    }
    print("\n| shape | M | cuBLAS us | Triton best us (config) | default us | best/cuBLAS |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(
            f"| {r['shape']} | {r['M']} | {r['cublas_us']:.1f} | {r['triton_best_us']:.1f} "
            f"{tuple(r['triton_best_config'])} | {r['triton_default_us']:.1f} | "
            f"{r['cublas_us'] / r['triton_best_us']:.2f}x |"
        )
    print(json.dumps(summary))
    result = {"bench": "gemv", **provenance(dev), "rows": rows_out, "summary": summary}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
