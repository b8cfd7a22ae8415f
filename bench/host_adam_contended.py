"""Host AdamW beside other work on the same cores: the loop's dynamic schedule against
the static split it had, and torch's fused AdamW (the peer), alone and beside a
competitor process at nice 10 (as an async save's writers run, ``SaveIO.background_nice``).

[Note: blocks handed out as threads come free] in ``fscale/kernels/host_adamw.py``:
with a static split the update waits for its slowest thread, and a thread that
shares its core with a writer is slow. Competitors:

- ``writer``: buffered 8 MiB writes to a file under ``--dir`` (page-cache copies in
  the writer, write-out by the kernel's flusher), as an async checkpoint's writer;
- ``copy``: a one-thread memory copy loop (bandwidth, no I/O);
- ``spin``: a busy loop (CPU only);
- paced at ``--rate-gbps`` under ``SCHED_IDLE`` (a save keeping up with its disk), one
  pass each: ``read`` (a 4 GiB source read, as a checksum), ``smallwrite`` (buffered
  writes of one cached 8 MiB buffer, as ``dd``), ``bigwrite`` (buffered writes of the
  4 GiB source), ``directwrite`` (``O_DIRECT`` writes of it: no page-cache copy),
  ``directbounce`` (each MiB copied into one reused aligned buffer, then ``O_DIRECT``);

each name may end in a count of such processes (``writer4``); a name given twice pools
its rounds (the medians are over all of them).

Every variant runs the same tensors with all intra-op threads, in place (offload's
step) and into second buffers (the step after an async save); rounds alternate the
variants; medians print, then each variant's time beside a competitor over its time
alone.

Usage::

    python3 bench/host_adam_contended.py --m 64 --dir /tmp/adam-contended --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402

from fscale.kernels import host_adamw  # noqa: E402
from fscale.kernels._cbuild import build  # noqa: E402

COMPETITORS = {
    "writer": (
        "import os, sys\nos.nice(10)\nblock = bytearray(8 << 20)\n"
        "f = open(sys.argv[1], 'wb', buffering=0)\nwhile True:\n"
        "    for _ in range(int(sys.argv[2])):\n        f.write(block)\n    f.seek(0)\n"
    ),
    "copy": (
        "import os, torch\nos.nice(10)\ntorch.set_num_threads(1)\n"
        "a, b = torch.empty(1 << 26), torch.empty(1 << 26)\nwhile True:\n    b.copy_(a)\n"
    ),
    "spin": "import os\nos.nice(10)\nwhile True:\n    pass\n",
}
# Paced competitors (--rate-gbps, as a save that keeps up with its disk): which of a
# save's passes over memory slow the update. Each runs under SCHED_IDLE, as the
# writer threads do (SaveIO.background_idle). argv: file, file MiB, bytes/s.
_PACED = (
    "import mmap, os, sys, time\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "path, size, rate = sys.argv[1], int(sys.argv[2]) << 20, float(sys.argv[3])\n"
    "piece = 8 << 20\n"
    "src = mmap.mmap(-1, {src_bytes})  # page-aligned, as offload's pinned buffers\n"
    "for i in range(0, len(src), 4096):\n    src[i] = 1\n"
    "{setup}"
    "bounce = mmap.mmap(-1, 1 << 20)  # directbounce's aligned buffer\n"
    "t0, done, at = time.perf_counter(), 0, 0\n"
    "while True:\n"
    "    view = memoryview(src)[done % len(src):][:piece]\n"
    "{body}"
    "    done += piece\n"
    "    lag = done / rate - (time.perf_counter() - t0)\n"
    "    if lag > 0:\n        time.sleep(lag)\n"
)
_WRITE = "    os.pwrite(f, view, at)\n    at = (at + piece) % size\n"


def _writer(src_bytes: str, direct: bool = False) -> dict:
    """A paced competitor writing ``src_bytes`` of source in turn to its file."""
    flags = "os.O_WRONLY | os.O_CREAT" + (" | os.O_DIRECT" if direct else "")
    return dict(src_bytes=src_bytes, setup=f"f = os.open(path, {flags}, 0o600)\n", body=_WRITE)


PACED = {
    # the source read alone (a checksum's pass, no write)
    "read": dict(
        src_bytes="4 << 30",
        setup="import numpy as np\n",
        body="    np.frombuffer(view, np.uint64).sum()\n",
    ),
    # dd-like: page-cache copies from one cached buffer (no source read from DRAM)
    "smallwrite": _writer("8 << 20"),
    # a save's buffered write: the source read from DRAM, a page-cache copy, write-out
    "bigwrite": _writer("4 << 30"),
    # O_DIRECT from the aligned source: the device reads it, no page-cache copy
    "directwrite": _writer("4 << 30", direct=True),
    # UncachedFile's way: each MiB copied into one small reused aligned buffer (in the
    # writer's caches, the device reads it there), then written O_DIRECT
    "directbounce": {
        **_writer("4 << 30", direct=True),
        "body": "    for k in range(0, piece, 1 << 20):\n"
        "        bounce[:] = view[k : k + (1 << 20)]\n"
        "        os.pwrite(f, bounce, at)\n        at = (at + (1 << 20)) % size\n",
    },
}
for _name, _parts in PACED.items():
    COMPETITORS[_name] = _PACED.format(**_parts)


def adam_state(million: float) -> tuple:
    """``(n, (params, grads, exp_avgs, exp_avg_sqs), hyper)`` for ``million`` * 1e6 host
    params, after checking that the C loop is built."""
    if not host_adamw.available():
        raise SystemExit("host_adamw: the C loop is not built (no C compiler?)")
    n = int(million * 1e6)
    p, g, m = (torch.randn(n) for _ in range(3))
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)
    return n, (p, g, m, torch.rand(n)), hyper


def static_loop():
    """The loop as it was before 2026-12-06: the same source, a static split."""
    source = host_adamw._SOURCE.replace("schedule(dynamic, chunk)", "schedule(static)")
    if source == host_adamw._SOURCE:
        raise SystemExit("host_adamw's pragma changed: update this bench")
    return build("host_adamw_static", source, host_adamw._SIGS, ("-fopenmp",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=float, default=64, help="million params")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/adam-contended", help="the writer's file")
    ap.add_argument("--file-mib", type=int, default=512, help="the writer rewinds here")
    ap.add_argument("--competitors", default="none,writer,copy,spin")
    ap.add_argument(
        "--rate-gbps", type=float, default=2.4, help="paced competitors' GB/s, all together"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, (p, g, m, v), hyper = adam_state(args.m)
    second = [torch.empty(n) for _ in range(3)]  # where a step after a save writes
    k, small = host_adamw.coefficients(**hyper)
    threads = torch.get_num_threads()
    old = static_loop()
    in_place = [t.data_ptr() for t in (p, g, m, v, p, m, v)]
    elsewhere = [t.data_ptr() for t in (p, g, m, v, *second)]
    state_steps = [torch.tensor(3.0)]

    # In place (offload's step), and elsewhere (the step after an async save writes the
    # second buffers, [Note: AdamW on the host, in place or elsewhere]).
    variants = {
        "dynamic": lambda: host_adamw.adamw_([p], [g], [m], [v], **hyper),
        "static": lambda: old.adamw(*in_place, n, *k, int(small), threads),
        "dynamic_elsewhere": lambda: host_adamw.adamw_(
            [p], [g], [m], [v], **hyper, out=([second[0]], [second[1]], [second[2]])
        ),
        "static_elsewhere": lambda: old.adamw(*elsewhere, n, *k, int(small), threads),
        "torch_fused": lambda: torch._fused_adamw_(
            [p],
            [g],
            [m],
            [v],
            [],
            state_steps,
            amsgrad=False,
            maximize=False,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.01,
            eps=1e-8,
        ),  # fmt: skip
    }
    for fn in variants.values():
        fn()  # built, pages touched

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, list[float]]] = {}  # a competitor named twice pools its times
    for name in args.competitors.split(","):
        kind, count = re.fullmatch(r"([a-z]+)(\d*)", name).groups()
        count = int(count or 1)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    COMPETITORS[kind],
                    os.path.join(args.dir, f"junk{i}"),
                    *(
                        (str(args.file_mib), str(args.rate_gbps * 1e9 / count))
                        if kind in PACED
                        else (str(max(1, args.file_mib // 8)),)
                    ),
                ]
            )  # fmt: skip
            for i in range(count if kind != "none" else 0)
        ]
        time.sleep(1.0)  # running, their buffers touched
        try:
            times = samples.setdefault(name, {v_: [] for v_ in variants})
            for _ in range(args.rounds):
                for v_, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    times[v_].append(time.perf_counter() - t0)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        line = "  ".join(f"{v_} {statistics.median(ts) * 1e3:8.1f} ms" for v_, ts in times.items())
        print(f"{name:8s} {line}", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    rows = {
        c: {v_: statistics.median(ts) * 1e3 for v_, ts in by_variant.items()}
        for c, by_variant in samples.items()
    }

    slowdown = {
        c: {v_: rows[c][v_] / rows["none"][v_] for v_ in variants} for c in rows if "none" in rows
    }
    for c, r in slowdown.items():
        print(f"{c:8s} " + "  ".join(f"{v_} x{x:.3f}" for v_, x in r.items()))
    result = {
        "bench": "host_adam_contended",
        **provenance(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "threads": threads,
        "params": n,
        "rounds": args.rounds,
        "rate_gbps": args.rate_gbps,
        "median_ms": rows,
        "vs_alone": slowdown,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
