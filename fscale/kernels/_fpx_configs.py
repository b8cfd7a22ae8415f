"""Launch parameters of the FPx linear: the untuned defaults and what tuning times.

``fpx_triton`` times ``candidate_configs(M)`` on the first CUDA call per (format,
N, K, M bucket) and keeps the fastest; under the interpreter ``default_config`` and
``DEQUANT_MIN_M`` decide. A config is one of

- a Triton launch: ``bm``, ``bn`` (tile), ``waves`` (programs per SM, reached by
  splitting K) or ``split`` (programs along K), ``num_warps``, ``num_stages`` and
  optionally ``kdot`` (rows of K per dot, [Note: K per dot]);
- ``{"dequant": True, "pieces": n}``: dequantize to x's dtype and call cuBLAS, in n
  slices ([Note: pipelined dequantize + cuBLAS]);
- ``{"gluon": True, "split", "stages", "warps"}``: the Hopper kernel in ``fpx_gluon``.

Which rows are candidates, and why, comes from sweeps on an H200 (fscale/kernels/
README.md, "FPx launch tuning"); bench/results/fpx_linear-*.json records the winners.
"""

from __future__ import annotations

import torch

from fscale.kernels import fpx as _fpx
from fscale.kernels._triton import sm_count

#: M at and above which, without tuning, the weight is dequantized to x's dtype and
#: cuBLAS does the product (compute-bound there: the extra traffic is amortized).
DEQUANT_MIN_M = 256
#: Slices the dequantize + cuBLAS path pipelines by default ([Note: pipelined
#: dequantize + cuBLAS]).
DEQUANT_PIECES = 4


def default_config(m: int, n: int, k: int, fmt: str, device: torch.device) -> dict:
    """Launch parameters for an [m, k] x [k, n] product when nothing was tuned.

    bm covers all of a small M (each weight is rebuilt once per M tile); ``waves`` asks
    for about that many programs per SM, reached by splitting K. From 33 rows: 64-row
    tiles in one wave, the fastest there ([Note: K per dot]; 128-row tiles of 64
    channels overflow shared memory with 128 rows of K per dot).
    """
    if m > 32:
        return {"bm": 64, "bn": 128, "waves": 1, "num_warps": 4, "num_stages": 3}
    return {"bm": 16 if m <= 16 else 32, "bn": 128, "waves": 8, "num_warps": 4, "num_stages": 3}


def kdot_for(bm: int) -> int:
    """Rows of K per dot ([Note: K per dot]) unless a config says: 128 for tiles of 64
    rows or more (warpgroup MMAs, whose B operand goes through shared memory), else 16."""
    return 128 if bm >= 64 else 16


def programs_along_k(cfg: dict, m: int, n: int, k: int, fmt: str, device: torch.device) -> int:
    """The split of a Triton launch: ``cfg["split"]``, or enough programs along K for
    ``cfg["waves"]`` programs per SM; never more than the K chunks, never an empty one."""
    chunks = k // _fpx.layout(fmt)["k_chunk"]
    if "split" in cfg:
        split = cfg["split"]
    else:
        tiles = -(-n // cfg["bn"]) * -(-m // cfg["bm"])
        split = -(-int(cfg.get("waves", 4) * sm_count(device)) // tiles)
    split = max(1, min(chunks, split))
    per = -(-chunks // split)
    return -(-chunks // per)  # no empty programs


def candidate_configs(m: int, gluon: bool = False) -> list[dict]:
    """What tuning times for an M; ``gluon`` adds launches of the Hopper kernel in
    ``fpx_gluon`` (fp6/fp5 on sm_90), first."""
    extra = gluon_configs(m) if gluon else []
    return extra + _triton_configs(m)


def gluon_configs(m: int) -> list[dict]:
    """Launches of ``fpx_gluon`` worth timing: split-K in one kernel up to M=16, two
    warpgroups sharing an x tile from M=32; none above 256 rows (dequantize + cuBLAS)."""
    if m > 256:
        return []
    if m <= 16:
        # Six stages at splits 4 and 8: the 4096-deep layers of an 8B model at M = 1,
        # whose programs get 4-8 chunks each, with the weights in HBM
        # (bench/results/fpx_gluon_sweep-8b-decode-m1-nvidia-h200.json).
        rows = [(s, 4, 4) for s in (1, 2, 4, 8)] + [(4, 6, 4), (8, 6, 4)]
    else:
        rows = [(1, 4, 4), (2, 4, 4), (2, 6, 4), (1, 4, 8), (2, 4, 8)]
    return [dict(gluon=True, split=s, stages=st, warps=w) for s, st, w in rows]


def _triton_configs(m: int) -> list[dict]:
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        rows = [
            (bm, 128, 8, 4, 3), (bm, 128, 4, 4, 4), (bm, 64, 8, 4, 4),
            # bn=64 with fewer waves or warps: 4096-wide layers (a 7B model's).
            (bm, 64, 4, 4, 2), (bm, 64, 2, 4, 3), (bm, 64, 1, 2, 3),
            # One wave of 2-warp programs over 128 channels: the fewest instructions
            # per weight (large layers, 28672 x 8192).
            (bm, 128, 1, 2, 4),
            # 2-warp, 2-stage programs in 4-8 waves: M=1 on 12288/11008 x 4096.
            (bm, 64, 8, 2, 2), (bm, 64, 4, 2, 2),
        ]  # fmt: skip
        if m > 16:
            # Above 16 rows one or two waves, and 16-row tiles (each weight rebuilt
            # per M tile) beside one 32-row tile.
            rows += [(bm, 128, 1, 4, 3), (bm, 128, 2, 4, 3), (16, 64, 1, 2, 3), (16, 64, 2, 4, 3)]
            # 64-row tiles, one wave ([Note: K per dot]).
            rows += [(64, 128, 1, 4, 3), (64, 64, 1, 4, 3)]
        return [
            dict(bm=b, bn=bn, waves=wv, num_warps=nw, num_stages=ns) for b, bn, wv, nw, ns in rows
        ]
    if m <= 128:
        return [
            dict(bm=64, bn=128, waves=1, num_warps=4, num_stages=3),
            dict(bm=64, bn=64, waves=1, num_warps=4, num_stages=3),
            dict(bm=128, bn=128, waves=1, num_warps=8, num_stages=3),
            dict(dequant=True, pieces=1),
            dict(dequant=True, pieces=4),
        ]
    return [
        dict(bm=128, bn=128, waves=1, num_warps=8, num_stages=3),
        *(dict(dequant=True, pieces=n) for n in (1, 2, 4, 8)),
    ]
