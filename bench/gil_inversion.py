"""Does a low-priority thread that holds the GIL slow a step whose parallel loop takes
every core? (A priority inversion an async save's writer threads could cause beside
offload's host AdamW.)

The "step" alternates the host AdamW C loop on all intra-op threads (the GIL released)
with a few small torch ops (the GIL held), as offload's update does per sub-group.
Beside it, a "hog" holds the GIL for ``--hold-us`` at a time in pure Python and lets
it go for ``--gap-us`` (a sleep, as a writer's syscall does), run as:

- ``thread_idle``: a thread of this process under ``SCHED_IDLE`` (as
  ``SaveIO(background_idle=True)`` runs writer threads): if it is preempted while
  holding the GIL when every core is busy, the step waits for it;
- ``thread``: a thread at normal priority (plain GIL contention);
- ``process_idle``: the same loop in another process under ``SCHED_IDLE`` (no GIL
  shared: the CPU alone).

Rounds alternate; the median step time per variant prints, then each over ``alone``.

Usage::

    python3 bench/gil_inversion.py --rounds 3 --out bench/results/gil-inversion-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from host_adam_contended import adam_state  # noqa: E402

from fscale.kernels import host_adamw  # noqa: E402


def hog(stop, idle: bool, hold_us: float, gap_us: float) -> None:
    """Hold the GIL ``hold_us`` (a Python loop), release it ``gap_us``, until ``stop``."""
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    hold, gap = hold_us * 1e-6, gap_us * 1e-6
    while not stop.is_set():
        end = time.perf_counter() + hold
        while time.perf_counter() < end:
            pass
        time.sleep(gap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=float, default=1.0, help="million params per AdamW call")
    ap.add_argument("--calls", type=int, default=8, help="AdamW calls per step")
    ap.add_argument("--small-ops", type=int, default=20, help="torch ops after each call")
    ap.add_argument("--hold-us", type=float, default=1000.0)
    ap.add_argument("--gap-us", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=40, help="steps timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _, (p, g, m, v), hyper = adam_state(args.m)

    def step() -> None:
        for _ in range(args.calls):
            host_adamw.adamw_([p], [g], [m], [v], **hyper)
            for _ in range(args.small_ops):
                torch.add(p[:4], 1)

    def timed() -> float:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def beside(kind: str) -> float:
        if kind == "alone":
            return timed()
        if kind == "process_idle":
            stop = multiprocessing.Event()
            other = multiprocessing.Process(
                target=hog, args=(stop, True, args.hold_us, args.gap_us)
            )
            other.start()
            time.sleep(0.3)  # running
            try:
                return timed()
            finally:
                stop.set()
                other.join()
        stop = threading.Event()
        thread = threading.Thread(
            target=hog, args=(stop, kind == "thread_idle", args.hold_us, args.gap_us)
        )
        thread.start()
        try:
            return timed()
        finally:
            stop.set()
            thread.join()

    step()  # built, pages touched
    kinds = ("alone", "thread_idle", "thread", "process_idle")
    rounds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            rounds[kind].append(beside(kind))
    medians = {k: statistics.median(ts) for k, ts in rounds.items()}
    for k in kinds:
        print(f"{k:13s} {medians[k]:7.2f} ms  x{medians[k] / medians['alone']:.3f}  {rounds[k]}")
    result = {
        "bench": "gil_inversion",
        **provenance(torch.device("cpu")),
        "command": "python3 " + " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "median_ms": medians,
        "vs_alone": {k: medians[k] / medians["alone"] for k in kinds},
        "rounds_ms": rounds,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
