"""What a disk write takes from an offloaded step: host copy bandwidth, pinned
host<->GPU bandwidth and the host AdamW loop, alone and while a niced ``dd`` writes
to ``--dir`` (buffered, then ``oflag=direct``), as an async checkpoint's writer does.

An offloaded step moves grads and params over PCIe (pinned copies) and runs AdamW on
the host; during an async save each of its steps was slower (bench/README.md, issue
15). If the pinned copies slow down while the writer runs but the host copy does not,
the cost is in the path the disk's DMA shares with the GPU's (the VM's virtio disk,
the IOMMU); if the host copy slows, it is guest memory traffic.

Usage::

    python3 bench/write_contention.py --dir /tmp/wc --gb 24 --out $OUT/write_contention.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def probes(mib: int, cuda: bool) -> dict:
    """Each probe: a callable doing one round and the bytes it moves."""
    n = mib << 18  # fp32 elements in `mib` MiB
    src, dst = torch.randn(n), torch.empty(n)
    out = {"host_copy": (lambda: dst.copy_(src), 2 * n * 4)}
    if cuda:
        pinned = torch.randn(n).pin_memory()
        dev = torch.empty(n, device="cuda")

        def h2d():
            dev.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        def d2h():
            pinned.copy_(dev, non_blocking=True)
            torch.cuda.synchronize()

        out |= {"h2d_pinned": (h2d, n * 4), "d2h_pinned": (d2h, n * 4)}
    if host_adamw.available():
        p, g, m = (torch.randn(n) for _ in range(3))
        v = torch.rand(n)
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)
        out["host_adamw"] = (lambda: host_adamw.adamw_([p], [g], [m], [v], **hyper), 7 * n * 4)
    for fn, _ in out.values():
        fn()  # pages touched, kernels built
    return out


def measure(probe: dict, seconds: float, stop=None) -> dict[str, list[float]]:
    """GB/s of each probe, round robin for `seconds` (or until `stop()` is true)."""
    rates: dict[str, list[float]] = {k: [] for k in probe}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop and stop()):
        for name, (fn, nbytes) in probe.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/write-contention")
    ap.add_argument("--gb", type=float, default=16, help="each write's size")
    ap.add_argument("--mib", type=int, default=1024, help="each probe's buffer")
    ap.add_argument("--alone-s", type=float, default=8.0)
    ap.add_argument("--modes", default="buffered,direct")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    probe = probes(args.mib, cuda)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    target = os.path.join(args.dir, "junk")
    count = int(args.gb * 1024 / 8)
    rows: dict[str, dict] = {}

    def summarize(label: str, rates: dict[str, list[float]], extra: dict | None = None):
        row = {k: statistics.median(v) if v else None for k, v in rates.items()}
        row["rounds"] = min(len(v) for v in rates.values())
        rows[label] = row | (extra or {})
        print(f"{label:10s} " + "  ".join(f"{k} {v:7.2f} GB/s" for k, v in row.items()
                                          if k in rates and v is not None), flush=True)  # fmt: skip

    summarize("alone", measure(probe, args.alone_s))
    for mode in args.modes.split(","):
        flags = ["oflag=direct"] if mode == "direct" else ["conv=fdatasync"]
        cmd = ["nice", "-n", "10", "dd", "if=/dev/zero", f"of={target}", "bs=8M",
               f"count={count}", *flags]  # fmt: skip
        t0 = time.perf_counter()
        dd = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # writing
        rates = measure(probe, 3600, stop=lambda dd=dd: dd.poll() is not None)
        err = dd.communicate()[1]
        wall = time.perf_counter() - t0
        summarize(mode, rates, {"write_s": wall, "write_gbps": args.gb * 2**30 / wall / 1e9,
                                "dd": err.strip().splitlines()[-1:]})  # fmt: skip
        os.remove(target)
        subprocess.run(["sync"], check=False)
        summarize(f"after_{mode}", measure(probe, args.alone_s / 2))
    shutil.rmtree(args.dir, ignore_errors=True)
    ratios = {
        mode: {k: rows[mode][k] / rows["alone"][k] for k in probe if rows[mode][k]}
        for mode in args.modes.split(",")
    }
    for mode, r in ratios.items():
        print(f"{mode:10s} vs alone " + "  ".join(f"{k} x{x:.3f}" for k, x in r.items()))
    result = {
        "bench": "write_contention",
        **provenance(torch.device("cuda" if cuda else "cpu")),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "probe_mib": args.mib,
        "write_gb": args.gb,
        "gbps": rows,
        "vs_alone": ratios,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
