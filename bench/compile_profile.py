"""Where a step's GPU time goes, per variant of ``bench/compile_units.py`` (issue 19 (a)).

Profiles ``--steps`` steps of each variant after its warm-up with ``torch.profiler`` and
prints the kernels by total CUDA time, grouped into GEMM, attention, optimizer, copy /
cast, Triton-fused (compiled) and other elementwise kernels, so two variants' profiles
can be read side by side; then where the GPU waits for the host within a step: the
wall time per step (timed as ``bench/compile_units.py`` does, a sync around each)
against the busy time (the union of kernel intervals), and the longest gaps between
kernels with the kernels on either side. JSON under ``--out``.

Usage::

    python bench/compile_profile.py --only "fscale compile_units" "torch.compile" --out $OUT/p.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from compile_units import MODELS, VARIANTS, _free, _sync  # noqa: E402

GROUPS = (
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "to_copy")),
    ("triton fused", ("triton_",)),
    ("reduction", ("reduce", "softmax", "norm", "nll", "cross_entropy", "log_softmax")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other elementwise"


def _busy_and_gaps(spans: list) -> tuple[float, list]:
    """The union of the kernel intervals (us) and the gaps between them, longest first:
    ``(gap us, kernel before, kernel after)``."""
    spans.sort()
    busy, gaps = 0.0, []
    end, last = None, ""
    for a, b, name in spans:
        if end is None or a > end:
            if end is not None:
                gaps.append((a - end, last, name))
            busy += b - a
            end, last = b, name
        elif b > end:
            busy += b - end
            end, last = b, name
    gaps.sort(key=lambda g: -g[0])
    return busy, gaps


def profile_variant(name, cfg, device, batch, steps, warmup, top) -> dict:
    _free(device)
    run = VARIANTS[name](cfg, device)
    for _ in range(warmup):
        run(batch)
    _sync(device)
    walls = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        run(batch)
        _sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            _sync(device)
            run(batch)
            _sync(device)
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += e.device_time_total / 1e3 / steps  # ms per step
            counts[e.name] += 1
            spans.append((e.time_range.start, e.time_range.end, e.name))
    groups: dict[str, float] = defaultdict(float)
    for k, ms in kernels.items():
        groups[group_of(k)] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    busy, gaps = _busy_and_gaps(spans)
    del run
    _free(device)
    return {
        "wall_ms": statistics.median(walls),
        "busy_ms": busy / 1e3 / steps,
        # Gaps inside a step (the longest: between steps the bench's sync idles the GPU).
        "gaps": [{"us": g, "after": a[:90], "before": b[:90]} for g, a, b in gaps[: 2 * top]],
        "total_ms": sum(kernels.values()),
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "launches_per_step": sum(counts.values()) / steps,
        "top": [{"kernel": k[:160], "ms": ms, "n": counts[k] / steps} for k, ms in ranked],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--only", nargs="*", default=["fscale eager", "fscale compile_units", "torch.compile"]
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    cfg = MODELS[args.model]()
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, cfg.seq_len)
    x = torch.randint(0, cfg.vocab_size, shape, generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, shape, generator=g).to(device)
    batch = {"x": x, "y": y}
    out = {}
    for name in args.only:
        out[name] = r = profile_variant(name, cfg, device, batch, args.steps, args.warmup, args.top)
        print(
            f"\n== {name}: wall {r['wall_ms']:.1f} ms/step, GPU busy {r['busy_ms']:.1f}, "
            f"{r['total_ms']:.1f} ms of kernels, {r['launches_per_step']:.0f} launches/step"
        )
        for gname, ms in r["groups_ms"].items():
            print(f"  {gname:18s} {ms:8.2f} ms")
        for k in r["top"]:
            print(f"  {k['ms']:8.2f} ms  x{k['n']:<5.0f} {k['kernel'][:110]}")
        print("  longest gaps (us; kernel before -> after):")
        for g in r["gaps"][: args.top]:
            print(f"  {g['us']:9.0f}  {g['after'][:50]} -> {g['before'][:50]}")
    if args.out:
        result = {"bench": "compile_profile", **provenance(device), "model": args.model,
                  "batch": args.batch, "variants": out}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
