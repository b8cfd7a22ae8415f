"""FP6 weights at prefill sizes: W6A8 (``fpx_a8``) and W6A16 (``fpx_linear``) vs cuBLAS bf16.

The four linears of a Llama-3.1-8B layer (qkv 6144x4096, o 4096x4096, gate_up
28672x4096, down 4096x14336) at M = 128 .. 4096 rows, bf16 activations:

- cuBLAS bf16 ``x @ w.t()`` (the peer);
- ``fpx_linear`` e3m2 as the kernel table runs it (W6A16; tuned on first use);
- ``fpx_a8_linear_scaled_mm`` e3m2 (W6A8: weight to e4m3 + rows to e4m3 + FP8 GEMM),
  and its parts alone (the weight kernel, the rows kernel, ``_scaled_mm``);
- FP8 W8A8 (``fp8`` format: e4m3 weights stored, no rebuild) for reference.

First, on the GPU: the compiled kernels give the references' exact bytes, and each
product's relative error (||y - ref|| / ||ref||, fp64) against the bf16 product of the
dequantized fp6 weight. Timings are ``triton.testing.do_bench`` medians (L2 flushed).
Prints a table last; JSON to ``$OUT/fpx_a8.json`` or ``bench/results/``.

Usage::

    python bench/fpx_a8.py [--ms 128,512,2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)
from _source import import_kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
fpx, fpx_a8, intq, kernel_tools = import_kernels("fpx", "fpx_a8", "intq", "_triton")
bucket = kernel_tools.bucket

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def timings(bench, graph, x, w, p, p8, w8, s8) -> dict:
    """Milliseconds of each variant at these activations: eager (host launch time shows
    where it exceeds the kernels') and, ``*_graph``, the kernels alone (CUDA graph)."""
    xq, sx = fpx_a8.rows_fp8(x)
    fns = {
        "cublas_bf16": lambda: x @ w.t(),
        "w6a16": lambda: fpx.fpx_linear(x, p),
        "w6a8": lambda: fpx_a8.fpx_a8_linear_scaled_mm(x, p),  # tuned on first use
        "w8a8_fp8": lambda: intq.fp8_linear(x, p8),
    }
    t = {name: bench(fn) for name, fn in fns.items()}
    t.update({f"{name}_graph": graph(fn) for name, fn in fns.items()})
    for i, cfg in enumerate(fpx_a8.CANDIDATES):
        t[f"w6a8_cfg{i}_graph"] = graph(
            lambda c=cfg: fpx_a8.fpx_a8_linear_scaled_mm(x, p, config=c)
        )
    t["w6a8_weight_kernel_graph"] = graph(lambda: fpx_a8.weight_fp8(p))
    t["w6a8_rows_kernel_graph"] = graph(lambda: fpx_a8.rows_fp8(x))
    t["fp8_gemm_alone_graph"] = graph(
        lambda: torch._scaled_mm(
            xq, w8.t(), scale_a=sx[:, None], scale_b=s8[None, :], out_dtype=torch.bfloat16
        )
    )
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="128,256,512,1024,2048,4096")
    args = ap.parse_args()
    import triton.testing

    dev = torch.device("cuda")
    ms = [int(m) for m in args.ms.split(",")]
    bench = lambda fn: triton.testing.do_bench(fn, warmup=20, rep=100)  # noqa: E731
    graph = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100)  # noqa: E731
    rows, checks = [], []
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
        p = fpx.pack(w, "e3m2")
        p8 = intq.pack_fp8(w)
        w6 = fpx.unpack(p).to(torch.bfloat16)
        w8_ref, _ = fpx_a8.weight_fp8_reference(p)
        w8, s8 = fpx_a8.weight_fp8(p)
        x = torch.randn(512, k, device=dev, generator=gen, dtype=torch.bfloat16)
        xq, sx = fpx_a8.rows_fp8(x)
        xq_ref, sx_ref = intq.rowwise_fp8(x)
        ref = x @ w6.t()
        a8_ref = fpx_a8.fpx_a8_linear_reference(x, p)
        checks.append(
            {
                "shape": name,
                "weight_bytes_exact": same_bytes(w8, w8_ref),
                "rows_bytes_exact": same_bytes(xq, xq_ref) and bool(torch.equal(sx, sx_ref)),
                "rel_err_w6a8_vs_w6a16": rel(fpx_a8.fpx_a8_linear_scaled_mm(x, p), ref),
                "rel_err_w6a8_vs_reference": rel(fpx_a8.fpx_a8_linear_scaled_mm(x, p), a8_ref),
                "rel_err_w6a8_candidates_vs_reference": max(
                    rel(fpx_a8.fpx_a8_linear_scaled_mm(x, p, config=c), a8_ref)
                    for c in fpx_a8.CANDIDATES
                ),
                "rel_err_w6a16_dispatch": rel(fpx.fpx_linear(x, p), ref),
                "rel_err_w8a8_vs_bf16_w": rel(intq.fp8_linear(x, p8), x @ w.t()),
                "rel_err_w6a16_vs_bf16_w": rel(ref, x @ w.t()),
            }
        )
        print(json.dumps(checks[-1]), flush=True)
        for m in ms:
            x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
            xq, sx = fpx_a8.rows_fp8(x)
            t = timings(bench, graph, x, w, p, p8, w8, s8)
            row = {"shape": name, "N": n, "K": k, "M": m, "ms": t}
            row["w6a8_config"] = next(
                c for key, c in fpx_a8.tuned().items() if key[:4] == ("e3m2", n, k, bucket(m))
            )
            row["vs_cublas_graph"] = {
                v: t["cublas_bf16_graph"] / t[f"{v}_graph"] for v in ("w6a16", "w6a8", "w8a8_fp8")
            }
            row["tflops_w6a8_graph"] = 2 * m * n * k / t["w6a8_graph"] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
    layer = []
    for m in ms:
        tot = {v: sum(r["ms"][v] for r in rows if r["M"] == m) for v in rows[0]["ms"]}
        ratios = {
            f"{v}_vs_cublas{g}": tot["cublas_bf16" + g] / tot[v + g]
            for v in ("w6a16", "w6a8", "w8a8_fp8")
            for g in ("", "_graph")
        }
        layer.append({"M": m, "ms": tot, **ratios})
    result = {"bench": "fpx_a8", **provenance(dev), "checks": checks, "rows": rows, "layer": layer}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("fpx_a8.json" if os.environ.get("OUT") else "fpx_a8-nvidia-h200.json")
    path.write_text(json.dumps(result, indent=1))
    print(
        "\nOne Llama-8B layer's four linears, bf16 x: kernels (CUDA graph) ms, ratio = cuBLAS / it"
    )
    print(f"{'M':>6} {'cuBLAS':>8} {'W6A16':>8} {'x':>6} {'W6A8':>8} {'x':>6} {'W8A8':>8} {'x':>6}"
          f" {'W6A8 eager x':>13}")  # fmt: skip
    for r in layer:
        t = r["ms"]
        print(
            f"{r['M']:>6} {t['cublas_bf16_graph']:>8.3f} {t['w6a16_graph']:>8.3f}"
            f" {r['w6a16_vs_cublas_graph']:>6.2f} {t['w6a8_graph']:>8.3f}"
            f" {r['w6a8_vs_cublas_graph']:>6.2f} {t['w8a8_fp8_graph']:>8.3f}"
            f" {r['w8a8_fp8_vs_cublas_graph']:>6.2f} {r['w6a8_vs_cublas']:>13.2f}"
        )
    print(f"wrote {path}")
    ok = all(
        c["weight_bytes_exact"]
        and c["rows_bytes_exact"]
        and c["rel_err_w6a8_candidates_vs_reference"] < 0.01
        for c in checks
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
