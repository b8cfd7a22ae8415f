"""The step after an asynchronous save of offloaded state: copied snapshot vs kept buffers.

An ``offload(step, "cpu")`` with AdamW keeps its fp32 masters and moments in host
memory, and every step rewrites all of them. An asynchronous ``fs.save`` must write
the state of its call, so the first update after the call either waits for a copy of
what it overwrites (``SaveIO(snapshot="host")``: copy threads plus the update's own
``before_write``; [Note: lazy snapshot]) or writes the new state into a second buffer
while the save keeps the old one (``snapshot="second_buffer"``: [Note: keeping the
owner's buffers]). This times that step against plain steps, with the save's writer
held until the step is done, so that only the snapshot's cost shows (the write's own
traffic is ``bench/checkpoint.py``'s business). Rounds alternate the variants; the
first round of each allocates its copies or second buffers, later rounds reuse them.

The model is a stack of wide linears run on one row (little compute, many params),
so the host optimizer's memory traffic is most of a step, as in offload on a GPU.

Usage::

    python3 bench/snapshot_step.py --params 3e8 --out bench/results/snapshot-step-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402

import fscale as fs  # noqa: E402
from fscale import checkpoint  # noqa: E402

VARIANTS = ("host", "second_buffer")


def build(n_params: float, width: int):
    layers = max(1, round(n_params / (width * width)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    params, apply = fs.functional(model)

    def loss(p, batch):
        return apply(p, batch["x"]).square().mean()

    step = fs.offload(fs.train_step(loss, fs.optim.adamw(1e-4)), "cpu")
    params, state = step.init(params)
    batch = {"x": torch.randn(1, width)}
    return step, params, state, batch, layers * width * width


def timed(step, params, state, batch):
    t0 = time.perf_counter()
    params, state, _ = step(params, state, batch)
    return params, state, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=3e8)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--plain", type=int, default=3, help="plain steps timed before each save")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    step, params, state, batch, n = build(args.params, args.width)
    host_bytes = state["offload"].host_bytes
    print(f"{n / 1e6:.0f}M params, {host_bytes / 1e9:.2f} GB of host state", flush=True)
    for _ in range(2):
        params, state, _ = timed(step, params, state, batch)

    gate = threading.Event()
    write = checkpoint._write_closing

    def held(*a):  # the writer waits until the timed step is done
        gate.wait()
        return write(*a)

    checkpoint._write_closing = held
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in VARIANTS:
                plain = []
                for _ in range(args.plain):
                    params, state, dt = timed(step, params, state, batch)
                    plain.append(dt)
                gate.clear()
                t0 = time.perf_counter()
                io = fs.checkpoint.SaveIO(snapshot=variant)
                handle = fs.save(Path(tmp) / variant, params, state, async_save=True, io=io)
                call = time.perf_counter() - t0
                params, state, after = timed(step, params, state, batch)
                gate.set()
                handle.wait()
                base = statistics.median(plain)
                run = dict(round=r, variant=variant, call_s=call, step_after_s=after,
                           plain_median_s=base, excess_s=after - base)  # fmt: skip
                runs.append(run)
                print(
                    f"round {r} {variant:13s} call {call:.3f} s, step after {after:.3f} s "
                    f"(plain {base:.3f} s): +{after - base:.3f} s",
                    flush=True,
                )
    state["offload"].close()
    summary = {}
    for variant in VARIANTS:
        later = [x for x in runs if x["variant"] == variant and x["round"] > 0]
        first = next(x for x in runs if x["variant"] == variant and x["round"] == 0)
        summary[variant] = {
            "first_round_excess_s": first["excess_s"],
            "first_round_call_s": first["call_s"],
            "median_excess_s": statistics.median(x["excess_s"] for x in later) if later else None,
            "median_call_s": statistics.median(x["call_s"] for x in later) if later else None,
        }
    print(f"\n{'variant':14s} {'call s':>8s} {'excess s':>9s} (median of rounds 1..; round 0)")
    for variant, s in summary.items():
        print(
            f"{variant:14s} {s['median_call_s'] or 0:8.3f} {s['median_excess_s'] or 0:9.3f} "
            f"(round 0: call {s['first_round_call_s']:.3f}, +{s['first_round_excess_s']:.3f})"
        )
    result = {
        "bench": "snapshot_step",
        **provenance(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "params": n,
        "host_state_bytes": host_bytes,
        "runs": runs,
        "summary": summary,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
