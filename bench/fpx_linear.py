"""FPx weight-only linear (fp6/fp5/fp4, Triton) against cuBLAS fp16 ``x @ w.t()``.

One run does everything, in this order:
  1. correctness: ``fpx_linear`` (the dispatch choice, and each path forced: fused
     kernel, dequantize + cuBLAS) against the reference ``x @ unpack(p).to(x.dtype).t()``
     on fresh random weights and activations per case, rel err = ||a - b|| / ||b|| in
     fp64, for every format at each (N, K), fp16 and bf16 activations, with bias;
  2. timings (``triton.testing.do_bench`` median; it flushes L2 between repeats) for
     (N, K) in (8192, 8192), (28672, 8192), (8192, 28672) and M in 1, 8, 32, 128, 512,
     2048: cuBLAS fp16, then per format ``fpx_linear`` as dispatch runs it (its first
     call per shape and M bucket tunes the launch among ``candidate_configs``: the
     choice is recorded) and, with ``--sweep``, more launch configurations.
Weight bytes: fp16 2 B, fpx (1+E+M)/8 B per weight + 4 B per output channel.

Usage (on a CUDA machine)::

    python bench/fpx_linear.py [--sweep]             # prints a table last, writes JSON
    TRITON_INTERPRET=1 python bench/fpx_linear.py --smoke   # tiny sizes on CPU

Writes ``bench/results/fpx_linear-<device>.json`` and, when ``$OUT`` is set,
``$OUT/fpx_linear.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def _import_kernel_modules():
    # Only fscale.kernels.fpx(_triton) and fscale.hw.* are needed; fscale/__init__.py
    # imports the whole library (and optree, which the GPU image lacks), so register a
    # bare package object and let the submodules import from the source tree.
    if "fscale" not in sys.modules:
        pkg = types.ModuleType("fscale")
        pkg.__path__ = [str(REPO / "fscale")]
        sys.modules["fscale"] = pkg
    from fscale.kernels import fpx, fpx_triton

    return fpx, fpx_triton


fpx, fpx_triton = _import_kernel_modules()
triton = fpx_triton.triton

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]
MS = [1, 8, 32, 128, 512, 2048]
FMTS = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}


def timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sweep_configs(m: int) -> list[dict]:
    """Launch configurations tried per (format, shape, M) with --sweep."""
    if m <= 32:
        bm = 16 if m <= 16 else 32
        return [
            dict(bm=bm, bn=bn, waves=wv, num_warps=nw, num_stages=ns)
            for bn, wv, nw, ns in ((64, 8, 4, 3), (128, 8, 4, 5), (128, 16, 4, 3), (256, 8, 8, 4))
        ]
    if m <= 128:
        return [
            dict(bm=bm, bn=bn, waves=wv, num_warps=nw, num_stages=ns)
            for bm, bn, wv, nw, ns in ((128, 64, 4, 4, 2), (64, 128, 4, 4, 2), (128, 128, 2, 8, 3))
        ] + [dict(dequant=True)]
    return [
        dict(bm=bm, bn=bn, waves=wv, num_warps=nw, num_stages=ns)
        for bm, bn, wv, nw, ns in ((128, 128, 1, 8, 3), (128, 64, 1, 4, 3))
    ] + [dict(dequant=True)]


def check(device, shapes, fmts, ms) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for n, k in shapes:
        for name, fmt in fmts.items():
            w = torch.randn(n, k, device=device, generator=gen)
            p = fpx.pack(w, fmt)
            dense = fpx.unpack(p)
            for m in ms:
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
                    bias = torch.randn(n, device=device, generator=gen).to(dtype)
                    want = x.float() @ dense.t() + bias.float()
                    ref = fpx.fpx_linear_reference(x, p, bias)
                    for path in ("dispatch", "fused", "dequant"):
                        if path == "dispatch":
                            got = fpx.fpx_linear(x, p, bias)
                        elif path == "fused":
                            got = fpx_triton.fpx_linear_triton(
                                x, p, bias, config=fpx_triton.default_config(m, n, k, fmt, device)
                            )
                        else:
                            got = fpx_triton.fpx_linear_triton(x, p, bias, config={"dequant": True})
                        rows.append(
                            dict(
                                fmt=name, N=n, K=k, M=m, dtype=str(dtype).split(".")[-1],
                                path=path, rel_err_fp32=rel_err(got, want),
                                rel_err_reference=rel_err(got, ref),
                                finite=bool(torch.isfinite(got).all()),
                            )
                        )  # fmt: skip
            deq = fpx_triton.dequantize_triton(p, torch.float16)
            exact = bool(torch.equal(deq.float(), dense.half().float()))
            rows.append(dict(fmt=name, N=n, K=k, path="dequantize", exact=exact))
            del p, dense, w, deq
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; CPU interpreter ok")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shapes, ms, check_shapes, check_ms = [(256, 512)], [1, 8, 128], [(128, 256)], [1, 5]
    else:
        if device.type != "cuda":
            sys.exit("fpx_linear.py needs a CUDA device (or --smoke under TRITON_INTERPRET=1).")
        shapes, ms, check_shapes, check_ms = SHAPES, MS, SHAPES, [1, 32, 512]
    bench = timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    t0 = time.time()

    correctness = check(device, check_shapes, FMTS, check_ms)
    worst = max(r.get("rel_err_fp32", 0.0) for r in correctness)
    ok = all(r.get("finite", True) and r.get("exact", True) for r in correctness) and worst < 2e-2
    print(f"correctness: {len(correctness)} cases, worst rel err {worst:.2e}, ok={ok}", flush=True)
    extra = {"check_s": time.time() - t0}

    rows = []
    gen = torch.Generator(device=device).manual_seed(7)
    for n, k in shapes:
        w16 = (torch.randn(n, k, device=device, generator=gen) * 0.02).half()
        packs = {nm: fpx.pack(w16.float(), fmt) for nm, fmt in FMTS.items()}
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen).half()
            t_cublas = bench(lambda: x @ w16.t())  # noqa: B023
            row = dict(N=n, K=k, M=m, cublas_ms=t_cublas)
            row["cublas_weight_GBps"] = 2 * n * k / t_cublas / 1e6
            for nm, p in packs.items():
                fpx.fpx_linear(x, p)  # the first call tunes the launch (see fpx_triton._tune)
                t_def = bench(lambda: fpx.fpx_linear(x, p))  # noqa: B023
                key = (p.fmt, n, k, fpx_triton._bucket(m), str(x.device))
                row[f"{nm}_config"] = fpx_triton.tuned().get(key)
                row[f"{nm}_candidates_ms"] = fpx_triton._TUNE_LOG.get(key)
                row[f"{nm}_ms"] = t_def
                row[f"{nm}_speedup"] = t_cublas / t_def
                row[f"{nm}_weight_GBps"] = p.nbytes / t_def / 1e6
                if args.sweep:
                    trials = []
                    for cfg in sweep_configs(m):
                        try:
                            t = bench(lambda: fpx_triton.fpx_linear_triton(x, p, config=cfg))  # noqa: B023
                        except Exception as e:  # a config the compiler rejects (resources)
                            trials.append(dict(config=cfg, error=repr(e)[:200]))
                            continue
                        trials.append(dict(config=cfg, ms=t))
                    good = [tr for tr in trials if "ms" in tr]
                    best = min(good, key=lambda tr: tr["ms"])
                    row[f"{nm}_best_ms"] = best["ms"]
                    row[f"{nm}_best_speedup"] = t_cublas / best["ms"]
                    row[f"{nm}_best_config"] = best["config"]
                    row[f"{nm}_trials"] = trials
            rows.append(row)
            line = f"N={n} K={k} M={m}: cublas {t_cublas:.4f} ms"
            for nm in FMTS:
                line += f"  {nm} {row[nm + '_ms']:.4f} ({row[nm + '_speedup']:.2f}x"
                if args.sweep:
                    line += f", best {row[nm + '_best_speedup']:.2f}x {row[nm + '_best_config']}"
                line += ")"
            print(line, flush=True)
        packs = w16 = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(args, device, name, ok, worst, correctness, rows, t0, extra)  # partial, each shape

    write(args, device, name, ok, worst, correctness, rows, t0, extra)
    print_table(args, name, rows)
    print(f"correctness ok={ok} worst rel err {worst:.2e}; wall {time.time() - t0:.0f} s")


def write(args, device, name, ok, worst, correctness, rows, t0, extra) -> None:
    result = {
        "bench": "fpx_linear",
        **provenance(device),
        "formats": FMTS,
        "timer": "triton.testing.do_bench median (L2 flushed), warmup 10 ms, rep 50 ms",
        "dequant_min_m": fpx_triton.DEQUANT_MIN_M,
        "correctness_ok": ok,
        "correctness_worst_rel_err": worst,
        "correctness": correctness,
        "results": rows,
        "wall_s": time.time() - t0,
        **extra,
    }
    text = json.dumps(result, indent=1)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "fpx_linear.json").write_text(text)
    if not args.smoke:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        (REPO / "bench" / "results" / f"fpx_linear-{slug}.json").write_text(text)


def print_table(args, name, rows) -> None:
    print(f"\n{name}  speedup = cuBLAS fp16 ms / fpx ms (dispatch default)")
    hdr = f"{'N':>6} {'K':>6} {'M':>5} {'cublas ms':>10}"
    for nm in FMTS:
        hdr += f" {nm + ' ms':>9} {nm + ' x':>7}"
        if args.sweep:
            hdr += f" {'best x':>7}"
    print(hdr)
    for r in rows:
        line = f"{r['N']:>6} {r['K']:>6} {r['M']:>5} {r['cublas_ms']:>10.4f}"
        for nm in FMTS:
            line += f" {r[nm + '_ms']:>9.4f} {r[nm + '_speedup']:>6.2f}x"
            if args.sweep:
                line += f" {r[nm + '_best_speedup']:>6.2f}x"
        print(line)


if __name__ == "__main__":
    main()
