"""Weight-only linear (fp6/fp5/fp4 FPx, int8/int4 g128; Triton) against cuBLAS fp16 ``x @ w.t()``.

One run does everything, in this order:
  1. correctness: ``fpx_linear`` (the dispatch choice, and each path forced: fused
     kernel, dequantize + cuBLAS) against the reference ``x @ unpack(p).to(x.dtype).t()``
     on fresh random weights and activations per case, rel err = ||a - b|| / ||b|| in
     fp64, for every format at each (N, K), fp16 and bf16 activations, with bias;
  2. timings (``triton.testing.do_bench`` median; it flushes L2 between repeats) for
     (N, K) in (8192, 8192), (28672, 8192), (8192, 28672) and M in 1, 8, 32, 128, 512,
     2048: cuBLAS fp16, then per format ``fpx_linear`` / ``int_linear`` as dispatch
     runs it (the first call per shape and M bucket tunes the launch among the
     module's ``candidate_configs``: the choice is recorded) and, with ``--sweep``,
     more launch configurations. Each is timed eagerly (``do_bench``: host launch time
     shows where it exceeds the kernels') and replayed from a CUDA graph
     (``do_bench_cudagraph``: the kernels alone, as a serving engine runs them).
Weight bytes: fp16 2 B, fpx (1+E+M)/8 B per weight + 4 B per output channel, int8/int4
1/0.5 B per weight + 4 B per 128-weight group.

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
from pathlib import Path

import torch
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)
from _source import import_kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


fpx, fpx_triton, intq, kernel_tools = import_kernels("fpx", "fpx_triton", "intq", "_triton")
triton = fpx_triton.triton

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]
MS = [1, 8, 32, 128, 512, 2048]
FMTS = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}
INTS = {"int8": 8, "int4": 4}  # group-wise, group 128, symmetric


def timer(device, graph: bool = False):
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if graph:
            return lambda fn: do_bench_cudagraph(fn, rep=50, return_mode="median")
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
                    for path in ("dispatch", "fused", "dequant", "dequant4"):
                        if path == "dispatch":
                            got = fpx.fpx_linear(x, p, bias)
                        elif path == "fused":
                            got = fpx_triton.fpx_linear_triton(
                                x, p, bias, config=fpx_triton.default_config(m, n, k, fmt, device)
                            )
                        else:
                            pieces = 4 if path == "dequant4" else 1
                            cfg = {"dequant": True, "pieces": pieces}
                            got = fpx_triton.fpx_linear_triton(x, p, bias, config=cfg)
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
        for name, bits in INTS.items():
            w = torch.randn(n, k, device=device, generator=gen)
            p = intq.pack_int(w, bits=bits, group_size=128)
            dense = intq.unpack_int(p)
            for m in ms:
                x = torch.randn(m, k, device=device, generator=gen).half()
                got = intq.int_linear(x, p)
                rows.append(
                    dict(
                        fmt=name, N=n, K=k, M=m, dtype="float16", path="dispatch",
                        rel_err_fp32=rel_err(got, x.float() @ dense.t()),
                        finite=bool(torch.isfinite(got).all()),
                    )
                )  # fmt: skip
            del p, dense, w
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; CPU interpreter ok")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--shapes", help="NxK[,NxK...]: only these weight shapes")
    parser.add_argument("--ms", help="M[,M...]: only these token counts (checks too)")
    parser.add_argument("--formats", help="only these of fp6,fp5,fp4,int8,int4")
    parser.add_argument(
        "--bf16", action="store_true", help="time with bf16 x (and cuBLAS bf16), as serving runs"
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the results file's rows of other shapes"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shapes, ms, check_shapes, check_ms = [(256, 512)], [1, 8, 128], [(128, 256)], [1, 5]
    else:
        if device.type != "cuda":
            sys.exit("fpx_linear.py needs a CUDA device (or --smoke under TRITON_INTERPRET=1).")
        shapes, ms, check_shapes, check_ms = SHAPES, MS, SHAPES, [1, 32, 512]
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
            check_shapes = shapes
        if args.ms:
            ms = check_ms = [int(m) for m in args.ms.split(",")]
    if args.formats:
        keep = set(args.formats.split(","))
        if not keep <= {*FMTS, *INTS}:
            parser.error(f"--formats: choose from {', '.join([*FMTS, *INTS])}")
        for table in (FMTS, INTS):
            for nm in [nm for nm in table if nm not in keep]:
                del table[nm]
    bench = timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    t0 = time.time()

    correctness = check(device, check_shapes, FMTS, check_ms)
    worst = max(r.get("rel_err_fp32", 0.0) for r in correctness)
    ok = all(r.get("finite", True) and r.get("exact", True) for r in correctness) and worst < 2e-2
    print(f"correctness: {len(correctness)} cases, worst rel err {worst:.2e}, ok={ok}", flush=True)
    extra = {"check_s": time.time() - t0}

    rows = kept_rows(name, shapes) if args.append else []
    if rows:  # where the kept rows came from
        old = json.loads(results_path(name).read_text())
        keys = ("date", "command", "correctness_ok", "correctness_worst_rel_err")
        extra["appended_to"] = {key: old.get(key) for key in keys}
    graph_bench = timer(device, graph=True) if device.type == "cuda" else bench
    gen = torch.Generator(device=device).manual_seed(7)
    names = [*FMTS, *INTS]
    x_dtype = torch.bfloat16 if args.bf16 else torch.float16
    extra["x_dtype"] = str(x_dtype)
    for n, k in shapes:
        w16 = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(x_dtype)
        packs = {nm: fpx.pack(w16.float(), fmt) for nm, fmt in FMTS.items()}
        packs.update(
            {nm: intq.pack_int(w16.float(), bits=b, group_size=128) for nm, b in INTS.items()}
        )
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen).to(x_dtype)
            t_cublas = bench(lambda: x @ w16.t())  # noqa: B023
            g_cublas = graph_bench(lambda: x @ w16.t())  # noqa: B023
            row = dict(N=n, K=k, M=m, cublas_ms=t_cublas, cublas_graph_ms=g_cublas)
            row["cublas_weight_GBps"] = 2 * n * k / t_cublas / 1e6
            for nm, p in packs.items():
                linear = intq.int_linear if nm in INTS else fpx.fpx_linear
                linear(x, p)  # the first call per shape and M bucket tunes the launch
                t_def = bench(lambda: linear(x, p))  # noqa: B023
                row[f"{nm}_ms"] = t_def
                row[f"{nm}_speedup"] = t_cublas / t_def
                row[f"{nm}_graph_ms"] = graph_bench(lambda: linear(x, p))  # noqa: B023
                row[f"{nm}_graph_speedup"] = g_cublas / row[f"{nm}_graph_ms"]
                row[f"{nm}_weight_GBps"] = p.nbytes / row[f"{nm}_graph_ms"] / 1e6
                m_bucket = kernel_tools.bucket(m)
                if nm in INTS:
                    key = (p.fmt, p.group_size, p.symmetric, n, k, m_bucket, str(x.device))
                    row[f"{nm}_config"] = intq._TUNED.get(key)
                    row[f"{nm}_candidates_ms"] = intq._TUNE_LOG.get(key)
                    continue
                key = (p.fmt, n, k, m_bucket, str(x.device))
                row[f"{nm}_config"] = fpx_triton.tuned().get(key)
                row[f"{nm}_candidates_ms"] = fpx_triton._TUNE_LOG.get(key)
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
            for nm in names:
                line += f"  {nm} {row[nm + '_speedup']:.2f}x/{row[nm + '_graph_speedup']:.2f}x"
            print(line, flush=True)
        packs = w16 = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(args, device, name, ok, worst, correctness, rows, t0, extra)  # partial, each shape

    write(args, device, name, ok, worst, correctness, rows, t0, extra)
    print_table(args, name, rows)
    print(f"correctness ok={ok} worst rel err {worst:.2e}; wall {time.time() - t0:.0f} s")


def results_path(name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return REPO / "bench" / "results" / f"fpx_linear-{slug}.json"


def kept_rows(name: str, shapes) -> list[dict]:
    """The results file's rows for weight shapes this run does not measure."""
    path = results_path(name)
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["results"] if (r["N"], r["K"]) not in shapes]


def write(args, device, name, ok, worst, correctness, rows, t0, extra) -> None:
    result = {
        "bench": "fpx_linear",
        **provenance(device),
        "formats": {**FMTS, **{k: f"int{b} g128 symmetric" for k, b in INTS.items()}},
        "timer": "triton.testing.do_bench median (L2 flushed), warmup 10 ms, rep 50 ms; "
        "*_graph_ms: do_bench_cudagraph median",
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
        results_path(name).write_text(text)


def print_table(args, name, rows) -> None:
    print(f"\n{name}  speedup = cuBLAS fp16 / format (dispatch default), CUDA graph replay")
    names = [*FMTS, *INTS]
    hdr = f"{'N':>6} {'K':>6} {'M':>5} {'cublas ms':>10}"
    for nm in names:
        hdr += f" {nm + ' x':>8}"
    hdr += "   (eager: " + ", ".join(names) + ")"
    print(hdr)
    for r in rows:
        line = f"{r['N']:>6} {r['K']:>6} {r['M']:>5} {r['cublas_graph_ms']:>10.4f}"
        for nm in names:
            line += f" {r[nm + '_graph_speedup']:>7.2f}x"
        line += "   (" + " ".join(f"{r[nm + '_speedup']:.2f}" for nm in names) + ")"
        print(line)


if __name__ == "__main__":
    main()
