"""CPU seconds and wall time of a synchronous ``fs.save`` of offloaded host state.

An offloaded model's masters and moments live in host buffers (views into 1 GiB
arenas), and an async save's writer threads take their CPU and memory bandwidth from
the host optimizer beside them. This saves an ``offload(step, "cpu")`` stack of wide
linears (as ``bench/snapshot_step.py`` builds it) with, in turn:

- ``clone``: each buffer view cloned into fresh memory before ``torch.save`` (what
  ``_host`` did, as DCP's loop does, before 2026-12-05);
- ``view``: written through a slice of its storage (``_host`` now), torch's CRC;
- ``view_zlib_after``: the same with ``SaveIO(torch_crc=False)``: the record's CRC
  left to zlib-ng, summed over the whole record after its write ([Note: the CRC torch
  already took]; what that setting did before 2026-12-05);
- ``view_zlib``: ``SaveIO(torch_crc=False)`` now: each MiB summed just before it is
  written ([Note: summing while the bytes are in cache]).

Rounds alternate the variants; the process's CPU seconds (user + system), the wall
time of each save and a memory-bound probe's GB/s during it (``uncached_write.Probe``:
a copy loop on another thread, like the host optimizer an async save runs beside)
are printed, the medians last.

Usage::

    python3 bench/save_cpu.py --params 1e8 --dir /root/save-cpu --out bench/results/save-cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402
from snapshot_step import build, timed  # noqa: E402
from uncached_write import Probe  # noqa: E402

import fscale as fs  # noqa: E402
from fscale._checkpoint import checksummed, writer  # noqa: E402

VARIANTS = ("clone", "view", "view_zlib_after", "view_zlib")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cloning(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _summing_after(create_stream):
    """``create_stream`` with ``inline`` dropped: records summed after their write."""

    def create(self, path, mode, *, direct=False, inline=False):
        return create_stream(self, path, mode, direct=direct)

    return create


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1e8)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/fscale-save-cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--probe-mb", type=int, default=0, help="the probe's arrays (0: no probe; "
                   "with one, CPU-s include its thread's)")  # fmt: skip
    args = p.parse_args(argv)
    torch.manual_seed(0)
    step, params, state, batch, n = build(args.params, args.width)
    params, state, _ = timed(step, params, state, batch)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    viewing = writer._host
    fs_class = checksummed.ChecksummingFileSystem
    inline = fs_class.create_stream
    probe = Probe(args.probe_mb or 1)
    if args.probe_mb:
        probe.start()
        time.sleep(2.0)
    t = time.perf_counter()
    alone = probe.rate(t - 2.0, t)
    runs = []
    for r in range(args.rounds):
        for variant in VARIANTS:
            writer._host = _cloning if variant == "clone" else viewing
            after = variant == "view_zlib_after"
            fs_class.create_stream = _summing_after(inline) if after else inline
            io = fs.checkpoint.SaveIO(torch_crc=not variant.startswith("view_zlib"))
            where = root / f"{variant}-{r}"
            c0, t0 = _cpu_s(), time.perf_counter()
            fs.save(where, params, state, io=io)
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            during = probe.rate(t0, t0 + wall)
            shutil.rmtree(where)
            runs.append({"round": r, "variant": variant, "wall_s": wall, "cpu_s": cpu,
                         "probe_GBps": during})  # fmt: skip
            print(f"round {r} {variant:15s} {wall:.2f} s wall, {cpu:.2f} CPU-s, "
                  f"probe {during:.2f} GB/s", flush=True)  # fmt: skip
            if args.probe_mb:
                time.sleep(1.0)  # the probe alone again between saves
    probe.stop.set()
    if args.probe_mb:
        probe.join()
    writer._host, fs_class.create_stream = viewing, inline
    host_bytes = state["offload"].host_bytes
    state["offload"].close()
    summary = {
        v: {
            k: statistics.median(x[k] for x in runs if x["variant"] == v)
            for k in ("wall_s", "cpu_s", "probe_GBps")
        }
        for v in VARIANTS
    }
    print(f"\n{host_bytes / 1e9:.2f} GB of host state; medians of {args.rounds} rounds "
          f"(probe alone {alone:.2f} GB/s):")  # fmt: skip
    for v, s in summary.items():
        print(f"{v:15s} {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} CPU-s, "
              f"probe {s['probe_GBps']:.2f} GB/s")  # fmt: skip
    result = {
        "bench": "save_cpu",
        **provenance(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "params": n,
        "host_state_bytes": host_bytes,
        "probe_GBps_alone": alone,
        "runs": runs,
        "summary": summary,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
