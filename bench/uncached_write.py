"""What a checkpoint write costs the rest of the host: buffered writes vs ``O_DIRECT``.

``fs.save`` writes its data files buffered by default (DCP's way) or, with
``SaveIO(direct=True)``, with ``O_DIRECT`` through a small aligned buffer
([Note: uncached writes] in fscale/_checkpoint/uncached.py). This writes the same bytes
(a host tensor, in the 8 MiB-to-64 MiB pieces a ``torch.save`` of a large tensor
hands over) both ways, in turn, while another thread measures the host's copy
bandwidth (a memory-bound loop, like the host optimizer of an offloaded state), and
reports per way: the write's seconds and GB/s (fsynced), the CPU seconds of the
writing thread, and the probe's GB/s during the write against its GB/s alone.
``dd oflag=direct`` of the same size is the drive's peer.

Usage::

    python3 bench/uncached_write.py --gb 2 --dir /tmp/uncached-bench --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402

from fscale._checkpoint.uncached import UncachedFile  # noqa: E402


class Probe(threading.Thread):
    """Copies ``mb`` MB arrays back and forth until stopped; GB/s (read + written) per
    window is ``rates`` (torch's copy drops the GIL: the writer thread runs alongside)."""

    def __init__(self, mb: int):
        super().__init__(daemon=True)
        self.a = torch.ones(mb << 18)  # fp32: mb MB
        self.b = torch.empty_like(self.a)
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (end time, GB/s)

    def run(self) -> None:
        torch.set_num_threads(1)
        nbytes = 2 * self.a.nbytes
        while not self.stop.is_set():
            t0 = time.perf_counter()
            self.b.copy_(self.a)
            t1 = time.perf_counter()
            self.samples.append((t1, nbytes / (t1 - t0) / 1e9))

    def rate(self, start: float, end: float) -> float:
        inside = [r for t, r in self.samples if start <= t <= end]
        return statistics.median(inside) if inside else float("nan")


def write(path: str, data: torch.Tensor, piece: int, direct: bool) -> tuple[float, float]:
    """(wall s, thread CPU s) to write ``data`` to ``path`` in ``piece``-byte writes and
    fsync it."""
    view = memoryview(data.numpy()).cast("B")
    t0, c0 = time.perf_counter(), time.thread_time()
    if direct:
        with UncachedFile.open(path) as f:
            for at in range(0, len(view), piece):
                f.write(view[at : at + piece])
            f.sync()
    else:
        with open(path, "wb") as f:
            for at in range(0, len(view), piece):
                f.write(view[at : at + piece])
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0, time.thread_time() - c0


def dd(path: str, nbytes: int) -> float:
    count = max(1, nbytes >> 26)
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=64M", f"count={count}", "oflag=direct",
         "conv=fsync", "status=none"],
        check=True,
    )  # fmt: skip
    return (count << 26) / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--piece-mb", type=int, default=32)
    p.add_argument("--probe-mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/uncached-bench")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    data = torch.randn(int(args.gb * (1 << 30)) // 4)
    probe = Probe(args.probe_mb)
    probe.start()
    time.sleep(2.0)
    t = time.perf_counter()
    alone = probe.rate(t - 2.0, t)
    runs = []
    for r in range(args.rounds):
        for way in ("buffered", "direct"):
            path = os.path.join(args.dir, f"{way}-{r}")
            start = time.perf_counter()
            wall, cpu = write(path, data, args.piece_mb << 20, way == "direct")
            during = probe.rate(start, start + wall)
            os.unlink(path)
            os.sync()
            time.sleep(1.0)  # the probe alone again between writes
            runs.append({"way": way, "round": r, "write_s": wall, "cpu_s": cpu,
                         "GBps": data.nbytes / wall / 1e9, "probe_GBps": during})  # fmt: skip
            print(f"{way:9s} round {r}: {runs[-1]['GBps']:.3f} GB/s, writer CPU {cpu:.2f} s, "
                  f"probe {during:.2f} GB/s (alone {alone:.2f})")  # fmt: skip
    probe.stop.set()
    probe.join()
    peer = dd(os.path.join(args.dir, "dd"), data.nbytes)
    shutil.rmtree(args.dir, ignore_errors=True)
    table = {}
    for way in ("buffered", "direct"):
        mine = [x for x in runs if x["way"] == way]
        table[way] = {k: statistics.median(x[k] for x in mine) for k in
                      ("write_s", "cpu_s", "GBps", "probe_GBps")}  # fmt: skip
    result = {
        "bench": "uncached_write",
        **provenance(torch.device("cpu")),
        "bytes": data.nbytes,
        "piece_bytes": args.piece_mb << 20,
        "probe_GBps_alone": alone,
        "dd_direct_GBps": peer,
        "medians": table,
        "runs": runs,
    }
    print(f"\n{'way':9s} {'GB/s':>7s} {'of dd':>6s} {'writer CPU s':>12s} {'probe GB/s':>10s}")
    for way, m in table.items():
        print(f"{way:9s} {m['GBps']:7.3f} {m['GBps'] / peer:6.2f} {m['cpu_s']:12.2f} "
              f"{m['probe_GBps']:10.2f}")  # fmt: skip
    print(f"probe alone {alone:.2f} GB/s; dd oflag=direct {peer:.3f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
