"""A Python-bound training loop beside an async save's writer threads: the record
loop in C (one GIL release per record) against the same pieces looped in Python.

[Note: one GIL release per record] in ``fscale/_checkpoint/crc_write.py``. The
"step" is what an offloaded step's host side looks like to the GIL: a few thousand
small torch ops (Python dispatch, GIL held) and a memory-bound op on every thread.
Writer threads run as ``fs.save(..., async_save=True)`` runs them (nice +10 and
``SCHED_IDLE``), each saving records through fscale's summing stream
(``SaveIO(torch_crc=False)``: zlib-ng CRCs a MiB at a time) to ``--dir`` in a loop.
Rounds alternate: no writers, the C loop, the Python loop (``FSCALE_CRC_WRITE=0``), and
the C loop's writers in another process (no GIL shared: what is left is the machine's).
Printed per variant: steps done, median and p90 step time, and the writers' GB/s.

Usage::

    python3 bench/gil_handoffs.py --seconds 10 --rounds 3 --out bench/results/gil-handoffs-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402

from fscale._checkpoint.checksummed import ChecksummingFileSystem  # noqa: E402
from fscale._checkpoint.writer import _lower_priority, _save_without_crc  # noqa: E402


def write_records(root: Path, i: int, record: torch.Tensor, stop, written: list) -> None:
    """One writer thread, as an async save runs it: lowered priority, records saved
    through fscale's summing stream (CRCs taken inline) until ``stop`` is set."""
    _lower_priority(10, idle=True)
    fs_ = ChecksummingFileSystem()
    n = 0
    while not stop.is_set():
        with fs_.create_stream(root / f"w{i}", "wb", inline=True) as stream:
            _save_without_crc(record, stream)
        n += record.nbytes
    written.append(n)


def writers_elsewhere(root: str, writers: int, record_mib: int, seconds: float, conn) -> None:
    """The same writer threads in a process of their own (no GIL shared with the step
    loop): they run ``seconds``, then the bytes they wrote go back through ``conn``."""
    record = torch.randint(0, 255, (record_mib << 20,), dtype=torch.uint8)
    stop, written = threading.Event(), []
    threads = [
        threading.Thread(target=write_records, args=(Path(root), i, record, stop, written))
        for i in range(writers)
    ]
    for t in threads:
        t.start()
    conn.recv()  # the step loop is done
    stop.set()
    for t in threads:
        t.join()
    conn.send(sum(written))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/gil-handoffs")
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--record-mib", type=int, default=256)
    ap.add_argument("--big-m", type=float, default=20, help="million floats per big op")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    small = [torch.zeros(1) for _ in range(64)]
    big = [torch.randn(int(args.big_m * 1e6)) for _ in range(3)]

    def step():
        for _ in range(40):
            for t in small:
                t.add_(1)
        big[0].mul_(0.9).add_(big[1], alpha=0.1)
        big[2].addcmul_(big[1], big[1], value=0.01)

    record = torch.randint(0, 255, (args.record_mib << 20,), dtype=torch.uint8)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)

    def run(variant: str) -> dict:
        if variant == "python_loop":
            os.environ["FSCALE_CRC_WRITE"] = "0"
        stop, written = threading.Event(), []
        in_process = variant in ("c_loop", "python_loop")
        threads = [
            threading.Thread(target=write_records, args=(root, i, record, stop, written))
            for i in range(args.writers if in_process else 0)
        ]
        for t in threads:
            t.start()
        child = None
        if variant == "other_process":
            here, there = multiprocessing.Pipe()
            child = multiprocessing.get_context("spawn").Process(
                target=writers_elsewhere,
                args=(str(root), args.writers, args.record_mib, args.seconds, there),
            )
            child.start()
            time.sleep(3.0)  # started (spawned, torch imported) and writing
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            s = time.perf_counter()
            step()
            times.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        if child is not None:
            here.send(None)
            written.append(here.recv())
            child.join()
        os.environ.pop("FSCALE_CRC_WRITE", None)
        times.sort()
        return {
            "steps_per_s": len(times) / wall,
            "median_ms": statistics.median(times) * 1e3,
            "p90_ms": times[int(0.9 * len(times))] * 1e3,
            "writer_gbps": sum(written) / wall / 1e9,
        }

    for _ in range(3):
        step()
    variants = ("alone", "c_loop", "python_loop", "other_process")
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            r = run(v)
            samples[v].append(r)
            print(f"{v:12s} " + "  ".join(f"{k} {x:8.2f}" for k, x in r.items()), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    medians = {
        v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in samples.items()
    }
    print("medians:")
    for v, r in medians.items():
        vs = r["steps_per_s"] / medians["alone"]["steps_per_s"]
        print(f"{v:12s} " + "  ".join(f"{k} {x:8.2f}" for k, x in r.items()) + f"  x{vs:.3f}")
    result = {
        "bench": "gil_handoffs",
        **provenance(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "writers": args.writers,
        "record_mib": args.record_mib,
        "rounds": samples,
        "medians": medians,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
