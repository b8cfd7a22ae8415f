"""Sweep the Hopper FPx kernel's launch (split, stages, warps) at small M on chosen
shapes, each weight in enough copies that the timed chain of products reads them from
HBM, not L2 (the engine's case: a decode step streams every weight once).

Usage (one H200)::

    python bench/fpx_gluon_sweep.py --shapes 6144x4096,4096x4096 --m 1

Every launch is also repeated (``--repeats``) and its outputs compared bit for bit
with its first: ``differing`` is the most outputs any repeat changed (0 for a
deterministic kernel; [Note: refilling a slot the MMA read] in fpx_gluon.py).

Prints the best launches per shape and writes ``$OUT/fpx_gluon_sweep.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from fscale.kernels import fpx, fpx_gluon

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def launch(row: dict) -> tuple:
    return row["split"], row["stages"], row["warps"]


def time_launch(row: dict, x, packs, cfg, repeats: int = 0) -> dict:
    """``row`` with the launch's error against the reference, the most outputs any of
    ``repeats`` more launches changed, and its time per product over a chain of
    ``packs`` (HBM-resident weights), or the error that refused it."""
    from triton.testing import do_bench_cudagraph

    p = packs[0]
    try:
        ref = fpx.fpx_linear_reference(x, p).float()
        y = fpx_gluon.fpx_linear_gluon(x, p, **cfg).float()
        row["rel_err"] = ((y - ref).norm() / ref.norm()).item()
        again = (fpx_gluon.fpx_linear_gluon(x, p, **cfg).float() for _ in range(repeats))
        row["differing"] = max((int((z != y).sum()) for z in again), default=0)

        def chain():
            for q in packs:
                fpx_gluon.fpx_linear_gluon(x, q, **cfg)

        ms = do_bench_cudagraph(chain, rep=20, return_mode="median")
        row["us"] = ms * 1e3 / len(packs)
        row["TBps"] = p.nbytes / (row["us"] * 1e-6) / 1e12
    except Exception as e:  # a launch the compiler or the limits refuse
        row["error"] = repr(e)[:160]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--fmt", default="e3m2")
    ap.add_argument("--splits", default="2,3,4,6,8,12,16")
    ap.add_argument("--stages", default="2,3,4,6")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--x-dtypes", default="bf16", help="x dtypes, e.g. bf16,fp16")
    ap.add_argument("--l2-bytes", type=float, default=200e6, help="bytes of weights per chain")
    ap.add_argument("--repeats", type=int, default=6, help="launches compared with the first")
    args = ap.parse_args()
    rows, t0 = [], time.time()
    out = Path(os.environ.get("OUT", ".")) / "fpx_gluon_sweep.json"
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda") * 0.02
        p = fpx.pack(w, args.fmt)
        copies = max(1, int(args.l2_bytes // p.nbytes))
        packs = [p] + [fpx.pack(w, args.fmt) for _ in range(copies - 1)]
        del w
        xs = {
            name: torch.randn(args.m, k, device="cuda").to(DTYPES[name])
            for name in args.x_dtypes.split(",")
        }
        for (x_name, x), warps, stages, split in itertools.product(
            xs.items(),
            (int(v) for v in args.warps.split(",")),
            (int(v) for v in args.stages.split(",")),
            (int(v) for v in args.splits.split(",")),
        ):
            cfg = dict(split=split, stages=stages, warps=warps)
            row = dict(N=n, K=k, M=args.m, x=x_name, **cfg, copies=copies)
            rows.append(time_launch(row, x, packs, cfg, args.repeats))
            out.write_text(json.dumps({"rows": rows, "wall_s": time.time() - t0}, indent=1))
        for x_name in xs:
            good = sorted(
                (r for r in rows if (r["N"], r["K"], r["x"]) == (n, k, x_name)),
                key=lambda r: r.get("us", float("inf")),
            )
            base = next((r for r in good if launch(r) == (4, 4, 4) and "us" in r), None)
            print(f"{n}x{k} M={args.m} x {x_name} ({copies} copies): split4/st4/w4 "
                  f"{base and round(base['us'], 2)} us", flush=True)  # fmt: skip
            for r in (r for r in good[:5] if "us" in r):
                cfg = f"split {r['split']} stages {r['stages']} warps {r['warps']}"
                err = f"err {r['rel_err']:.1e} differing {r['differing']}"
                print(f"   {r['us']:7.2f} us {r['TBps']:.2f} TB/s {cfg} {err}", flush=True)
        packs = p = None  # free before the next shape's copies
    bad = [r for r in rows if r.get("differing")]
    print(f"{len(bad)} of {len(rows)} launches gave other bits on a repeat", flush=True)
    for r in bad:
        print(f"   {r['N']}x{r['K']} split {r['split']} stages {r['stages']} warps "
              f"{r['warps']}: {r['differing']} outputs", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
