"""Where the Gluon FPx kernel's launch-dependent outputs come from: variants of the
kernel side by side on launches that showed them (``bench/fpx_gluon_sweep.py``).

Each variant is the kernel's source with one change (``VARIANTS``), loaded as its own
module. Every launch gets a workspace filled with NaN, and for split-K launches its
partials are kept, so a launch's outputs can be told apart:

- ``y_differs``: launches (of ``--repeats``) whose outputs differ from the first's;
- ``ws_differs``: launches whose partials differ (the main loop computed another
  partial: a race before the epilogue);
- ``y_not_sum``: launches whose outputs are not the in-order sum of their own partials
  (the epilogue read a partial before it was visible);
- ``bad_tiles``: (part, 64-channel tile) blocks whose partial differs between launches.

Usage::

    python3 bench/fpx_gluon_race.py --variants base,overlap,waitbefore,nobarrier --repeats 12
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from fscale.kernels import fpx

SOURCE = Path(__file__).resolve().parents[1] / "fscale" / "kernels" / "fpx_gluon.py"
# name -> [(old, new)] applied to the kernel's source (each `old` must occur).
VARIANTS = {
    "base": [],
    # the order before 2026-12-06: each chunk's MMA left in flight across the next
    # chunk's rebuild ([Note: an MMA reads its A registers until it retires])
    "overlap": [
        (
            "    acc = gl.zeros([CH, BNT], gl.float32, layout=mma)\n",
            "    acc = gl.zeros([CH, BNT], gl.float32, layout=mma)\n"
            "    a_prev = gl.zeros([CH, KC], x_dtype, layout=a_layout)\n",
        ),
        (
            "            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))\n",
            "            acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))\n"
            "            a_prev = a\n",
        ),
        (
            "        async_copy.commit_group()\n    async_copy.wait_group(0)\n",
            "        async_copy.commit_group()\n"
            "    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))\n"
            "    async_copy.wait_group(0)\n",
        ),
    ],
    # the previous MMA retired just before this one issues (after this chunk's
    # rebuild: ptxas may place the rebuild's writes before that wait)
    "waitbefore": [
        (
            "            xt = x_s.index(slot * HALVES + hf).permute((1, 0))\n",
            "            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))\n"
            "            xt = x_s.index(slot * HALVES + hf).permute((1, 0))\n",
        ),
        (
            "            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))\n"
            "        # [Note: r",
            "            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))\n"
            "        # [Note: r",
        ),
    ],
    # without the refill barrier: with each MMA retired in its own iteration, the next
    # iteration's top barrier already follows every warp's wait (a candidate to time)
    "nobarrier": [
        (
            "        # waited (no time measurable at M = 1 on an H100).\n        _barrier()\n",
            "        # waited (no time measurable at M = 1 on an H100).\n",
        )
    ],
    # no programmatic dependent launch (patched at load: the module's `pdl`)
    "nopdl": [],
}


def load_variant(name: str, tmp: Path):
    source = SOURCE.read_text()
    for old, new in VARIANTS[name]:
        if old not in source:
            raise SystemExit(f"variant {name}: {old!r} not in the kernel source")
        source = source.replace(old, new)
    path = tmp / f"fpx_gluon_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"fpx_gluon_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if name == "nopdl":
        mod.pdl = lambda device: False
    return mod


def launches(mod, x, p, cfg: dict, repeats: int) -> list[tuple]:
    """(y, partials or None) of 1 + ``repeats`` launches, each workspace NaN-filled."""
    kept = []
    real = mod.split_workspace

    def nan_workspace(mode, y, grid, shape=None):
        ws, counters = real(mode, y, grid, shape)
        if mode == 2:
            ws.fill_(float("nan"))
            kept.append(ws)
        return ws, counters

    mod.split_workspace = nan_workspace
    try:
        out = []
        for _ in range(1 + repeats):
            kept.clear()
            y = mod.fpx_linear_gluon(x, p, **cfg)
            out.append((y.clone(), kept[0].clone() if kept else None))
        return out
    finally:
        mod.split_workspace = real


def product_us(mod, x, packs, cfg: dict) -> float:
    """Microseconds per product over a graph of products of HBM-resident weights."""
    from triton.testing import do_bench_cudagraph

    def chain():
        for q in packs:
            mod.fpx_linear_gluon(x, q, **cfg)

    return do_bench_cudagraph(chain, rep=20, return_mode="median") * 1e3 / len(packs)


def in_order_sum(ws: torch.Tensor, dtype) -> torch.Tensor:
    total = ws[0].clone()
    for part in ws[1:]:
        total = total + part
    return total.to(dtype)


def diagnose(runs: list[tuple], warps: int) -> dict:
    y0, ws0 = runs[0]
    row = {
        "y_differs": sum(int(not torch.equal(y, y0)) for y, _ in runs[1:]),
        "max_outputs_differing": max(int((y != y0).sum()) for y, _ in runs),
        "nan_outputs": max(int(y.isnan().sum()) for y, _ in runs),
    }
    if ws0 is not None:
        row["ws_differs"] = sum(int(not torch.equal(ws, ws0)) for _, ws in runs[1:])
        row["y_not_sum"] = sum(int(not torch.equal(in_order_sum(ws, y.dtype), y)) for y, ws in runs)
        row["ws_nan"] = max(int(ws.isnan().sum()) for _, ws in runs)
        # the (part, tile) blocks whose partial moved: a tile is 16 * warps channels
        tiles = set()
        for _, ws in runs[1:]:
            diff = (ws != ws0).any(dim=1)  # [parts, N]
            for part, ch in diff.nonzero().tolist():
                tiles.add((part, ch // 2 // (8 * warps)))
        row["bad_tiles"] = sorted(tiles)[:24]
        row["n_bad_tiles"] = len(tiles)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--configs",
        default="28672x4096:8:2:4:4,28672x4096:8:4:4:4,28672x4096:8:2:3:4,"
        "6144x4096:1:4:4:4,28672x4096:1:2:4:4,28672x4096:1:1:4:4,28672x4096:8:2:3:8",
        help="NxK:M:split:stages:warps, comma-separated",
    )
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--fmt", default="e3m2")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "fpx_gluon_variants"
    tmp.mkdir(parents=True, exist_ok=True)
    mods = {v: load_variant(v, tmp) for v in args.variants.split(",")}
    rows, t0 = [], time.time()
    out = Path(os.environ.get("OUT", ".")) / "fpx_gluon_race.json"
    torch.manual_seed(0)
    packs = {}
    for spec in args.configs.split(","):
        shape, m, split, stages, warps = spec.split(":")
        n, k = (int(v) for v in shape.split("x"))
        if shape not in packs:  # copies enough to stream from HBM when timed
            w = torch.randn(n, k, device="cuda") * 0.02
            p = fpx.pack(w, args.fmt)
            packs[shape] = [p] + [fpx.pack(w, args.fmt) for _ in range(int(2e8 // p.nbytes))]
        p = packs[shape][0]
        x = torch.randn(int(m), k, device="cuda").to(torch.bfloat16)
        cfg = dict(split=int(split), stages=int(stages), warps=int(warps))
        for name, mod in mods.items():
            runs = launches(mod, x, p, cfg, args.repeats)
            row = {"variant": name, "N": n, "K": k, "M": int(m), **cfg}
            row |= diagnose(runs, int(warps))
            row["us"] = product_us(mod, x, packs[shape], cfg)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps({"rows": rows, "wall_s": time.time() - t0}, indent=1))
    print(f"{'variant':10s} {'config':24s} y_differs ws_differs y_not_sum tiles    time")
    for r in rows:
        c = f"{r['N']}x{r['K']} m{r['M']} s{r['split']} st{r['stages']} w{r['warps']}"
        counts = [r.get(k, "-") for k in ("ws_differs", "y_not_sum", "n_bad_tiles")]
        print(f"{r['variant']:10s} {c:24s} {r['y_differs']:9d} {counts[0]!s:>10} "
              f"{counts[1]!s:>9} {counts[2]!s:>5} {r['us']:7.2f} us")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
