"""Compressed communication on a real slow network: gloo ranks behind a rate-limited loopback.

The script makes a private network namespace whose loopback is shaped by ``tc`` (a
token bucket at ``--rates``, e.g. 1 and 10 Gbit/s), starts the ranks of a gloo world
inside it (``ip netns exec NS python bench/compress_link.py --rank R ...``), and
deletes the namespace when done, on error and on Ctrl-C. Per rate and world size it
measures:

- the raw socket throughput in the namespace (one TCP stream, ``--probe-mib``);
- a calibration of each collective (16 MiB through ``fscale.hw.comm``) against the
  cost model (``fscale/hw/cost.py``);
- per method, on a GPT of ``--layers`` x ``--d-model`` (>= 20M params, fp32): the step
  time (median after warm-up, max over ranks), the bytes per step that reached the
  wire (``comm.counting().wire``) and ``metrics["comm_bytes"]``, the step time with
  every collective replaced by a local stand-in (the compute alone; wall and CPU
  seconds), and the prediction: compute alone + the cost model's time for the measured
  wire bytes - the part of it that runs under compute (the compute-alone steps' comm
  calls and waits replayed on the link: ``cost.predict_overlap``, [Note: overlapped
  steps] in fscale/hw/cost.py; 0 where each collective is waited on as it is issued).

Methods: ``adam`` (plain data parallel), ``zero3`` (``shard_zero(step, 3)``), and when
their modules exist ``onebit_adam``, ``zero_one_adam``, ``onebit_lamb`` (over plain
data parallel, ``compress_comm(step, method(freeze_step=W))`` with W < ``--warmup``)
and ``zeropp`` (``compress_comm(shard_zero(step, 3), zeropp())``). A missing method is
skipped and said so. Speedups: the 1-bit methods against ``adam``, ``zeropp``
against ``zero3``.

Needs root and iproute2 (``ip``, ``tc``); ``apt-get install iproute2`` if missing.

Usage::

    sudo .venv/bin/python bench/compress_link.py                  # 1 and 10 Gbit/s, worlds 2, 4
    python bench/compress_link.py --rates 1gbit --worlds 2 --methods adam,onebit_adam
    python bench/compress_link.py --model tiny --steps 2 --warmup 2 --out /tmp/smoke.json

Writes ``bench/results/compress_link-cpu.json`` (``--out`` overrides) with the device,
date and command; the table is printed last.

[Note: warm-up and noise]
The 1-bit methods used to compile their CPU pack/unpack loops (torch.compile) at the
first compressed step, ``--freeze-step``; they are now C loops built once per machine
(~1 s, fscale/kernels/onebit_cpu.py), the compile their fallback. With the old defaults
(``--warmup 3``, freeze step 2) that compile (10-15 s) was the last untimed step, and
in one 8-step trace the two steps right after it ran ~0.3 s slower than later ones;
a compile subprocess of Inductor was seen at 80% of a core beside the ranks. A 2026-12-03
check on an idle box (load < 1) found no effect of running ``zero3`` first: 1-bit
Adam after ``adam,zero3`` in the same ranks ran at 0.67 s/step (2.87x), while two
isolated ``adam,onebit_adam`` runs gave 1.27 and 1.53 s/step (1.53x, 1.30x), its
compute-alone steps at 0.62-0.65 s in all three. What varied was the steps after the
compile, and /proc/stat showed 10-40% of the VM's CPU time stolen by the host
(``steal``) in stretches. So: ``--warmup 5`` (two compressed steps after the compiling
one, untimed), ``TORCHINDUCTOR_COMPILE_THREADS=1`` in the ranks (compile in-process,
no worker pool; a precaution, its effect was not measured apart), and each method's
``steal_share`` over its timed steps is recorded: a row with a high one measured a
machine that was not all ours. Methods still share the rank processes: no order
effect was found, so starting fresh ranks per method was not needed.

[Note: one shared link]
Every rank talks over the same loopback, so the token bucket is one medium that
carries the traffic of *all* ranks, not a NIC per rank: a ring all-reduce of S bytes in
a world of n puts n x 2(n-1)/n x S on it. The cost model is given ``Link(...,
shared=True)`` for that (see [Note: shared links] in fscale/hw/cost.py); ``fs.explain``
reports the per-rank-NIC case, which is what a cluster has.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `import fscale` from this checkout, installed or not

ALL_METHODS = ("adam", "zero3", "onebit_adam", "zero_one_adam", "onebit_lamb", "zeropp")
BASELINE = {"onebit_adam": "adam", "zero_one_adam": "adam", "onebit_lamb": "adam",
            "zeropp": "zero3"}  # fmt: skip
CALIBRATE_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")
MiB = 2**20


# ============================================================================ the parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1gbit,10gbit", help="tc rates, comma-separated")
    p.add_argument("--worlds", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--world4-rates", default="1gbit",
                   help="rates at which worlds > 2 run (default 1gbit: the 2-core box is "
                        "compute-bound for world 4 at 10gbit; 'all' for every rate)")  # fmt: skip
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--model", default="gpt21m", choices=("gpt21m", "tiny"))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps ([Note: warm-up and noise])")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="timed steps per method")
    p.add_argument("--local-steps", type=int, default=3, help="compute-alone steps")
    p.add_argument("--freeze-step", type=int, default=2, help="1-bit methods' warm-up")
    p.add_argument("--calibrate-mib", type=float, default=16.0)
    p.add_argument("--probe-mib", type=int, default=0, help="0: 1 s worth at the rate")
    p.add_argument("--latency-us", type=float, default=50.0, help="cost model, per hop")
    p.add_argument("--burst", default="512kb")
    p.add_argument("--timeout", type=int, default=420, help="seconds per world")
    p.add_argument("--out", default=None)
    # internal: one rank, or the socket probe, inside the namespace
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rate", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class Namespace:
    """A private network namespace with its loopback up and shaped by a token bucket."""

    def __init__(self, burst: str):
        self.name = f"fscale-link-{os.getpid()}"
        self.burst = burst
        self.made = False

    def __enter__(self):
        _run(["ip", "netns", "add", self.name])
        self.made = True
        _run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])
        return self

    def shape(self, rate: str) -> str:
        """Set the loopback's rate (``tc qdisc replace``); returns tc's own description."""
        # latency 100ms: how long a packet may wait in the bucket's queue before a drop.
        qdisc = ["tbf", "rate", rate, "burst", self.burst, "latency", "100ms"]
        _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", "lo", "root"]
             + qdisc)  # fmt: skip
        return _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "show", "dev", "lo"]).strip()

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, sys.executable, *args]

    def __exit__(self, *exc):
        if self.made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.made = False


def git_state() -> dict:
    """HEAD and the uncommitted files under fscale/: the methods may run from a work tree."""

    def git(*a):
        done = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "fscale")
    return {"head": git("rev-parse", "--short", "HEAD"),
            "uncommitted_fscale": dirty.splitlines() if dirty else []}  # fmt: skip


def check_host() -> None:
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        sys.exit(f"compress_link.py: {missing} not found; install iproute2 "
                 "(apt-get install -y iproute2).")  # fmt: skip
    if os.geteuid() != 0:
        sys.exit("compress_link.py: making a network namespace needs root; run it as root "
                 "(sudo .venv/bin/python bench/compress_link.py).")  # fmt: skip


def launch_world(ns: Namespace, args, world: int, rate: str, port: int) -> dict:
    """Start ``world`` ranks inside the namespace; rank 0's JSON result, or an error record."""
    tmp = tempfile.mkdtemp(prefix="fscale-link-")
    result = os.path.join(tmp, "rank0.json")
    passthrough = [a for a in sys.argv[1:]]
    procs = []
    logs = []
    try:
        for r in range(world):
            log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
            logs.append(log)
            cmd = ns.command(__file__, *passthrough, "--rank", str(r), "--world", str(world),
                             "--rate", rate, "--port", str(port), "--result", result)  # fmt: skip
            # Inductor compiles the 1-bit CPU loops in this process, not in a pool of
            # worker processes that would share the cores with the ranks: [Note: warm-up
            # and noise].
            env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            procs.append(subprocess.Popen(cmd, stdout=log if r else None, stderr=log, env=env))
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                time.sleep(2.0 if failed else 0)  # let the others report their error
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # no rank outlives its world, whatever happened
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes == [0] * world and os.path.exists(result):
        with open(result) as f:
            out = json.load(f)
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tails = []
    for r, log in enumerate(logs):
        log.seek(0)
        text = log.read()[-2000:]
        if text.strip():
            tails.append(f"rank {r}:\n{text}")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"ok": False, "error": f"exit codes {codes}\n" + "\n".join(tails)}


def probe(ns: Namespace, rate_bits: float, mib: int) -> dict:
    n = mib or max(64, int(rate_bits / 8 / MiB))  # about a second's worth
    out = _run(ns.command(__file__, "--probe", "--probe-mib", str(n)))
    return json.loads(out.strip().splitlines()[-1])


def parent(args) -> None:
    check_host()
    import torch
    from _provenance import provenance

    from fscale.hw import cost

    rates = _csv(args.rates)
    worlds = [int(w) for w in _csv(args.worlds)]
    big_rates = rates if args.world4_rates == "all" else _csv(args.world4_rates)
    out_path = Path(args.out) if args.out else REPO / "bench/results/compress_link-cpu.json"
    result = {
        "bench": "compress_link",
        **provenance(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "git": git_state(),
        "config": {k: v for k, v in vars(args).items() if v is not None},
        "socket_probe": {},
        "runs": [],
        "complete": False,
    }

    def write():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    def on_term(*_):
        raise KeyboardInterrupt  # unwind like Ctrl-C: the namespace is deleted either way

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # even where the shell started us ignoring it
    t0 = time.time()
    port = 29700
    with Namespace(args.burst) as ns:
        print(f"compress_link: namespace {ns.name}, rates {rates}, worlds {worlds}", flush=True)
        for rate in rates:
            qdisc = ns.shape(rate)
            bits = cost.parse_bandwidth(rate)
            result["socket_probe"][rate] = {"qdisc": qdisc, **probe(ns, bits, args.probe_mib)}
            print(f"  {rate}: {qdisc}; one TCP stream moves "
                  f"{result['socket_probe'][rate]['gbit_s']:.3f} Gbit/s", flush=True)  # fmt: skip
            write()
            for world in worlds:
                if world > 2 and rate not in big_rates:
                    continue
                port += 1
                t = time.time()
                run = launch_world(ns, args, world, rate, port)
                run.update(rate=rate, world=world, wall_s=round(time.time() - t, 1))
                result["runs"].append(run)
                write()
                if run.get("ok") is False:
                    print(f"  world {world} at {rate} FAILED:\n{run['error']}", flush=True)
    result["wall_s"] = round(time.time() - t0, 1)
    result["complete"] = True
    write()
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s)\n")
    print(table(result), flush=True)


def table(result: dict) -> str:
    rows = ["socket, one TCP stream: " + ", ".join(
        f"{r} -> {p['gbit_s']:.3f} Gbit/s" for r, p in result["socket_probe"].items())]  # fmt: skip
    rows.append("")
    head = (f"{'rate':<7} {'world':>5} {'method':<14} {'step s':>8} {'mean s':>8} {'compute s':>9} "
            f"{'cpu s':>6} {'wire MB':>9} {'hidden':>6} {'pred s':>8} {'err':>6}  "
            f"{'speedup':>8} {'steal':>6}")  # fmt: skip
    rows += [head, "-" * len(head)]
    for run in result["runs"]:
        if run.get("ok") is False:
            rows.append(f"{run['rate']:<7} {run['world']:>5} FAILED (see JSON)")
            continue
        load = run.get("loadavg_start")
        if load:
            rows.append(f"{run['rate']:<7} {run['world']:>5} (load average {load[0]:.1f} -> "
                        f"{run['loadavg_end'][0]:.1f} on {result['cpus']} cores)")  # fmt: skip
        for m in run["methods"]:
            lead = f"{run['rate']:<7} {run['world']:>5} {m['method']:<14}"
            if not m.get("ok"):
                rows.append(f"{lead} {m.get('skipped') or 'failed: ' + m.get('error', '')[:60]}")
                continue
            speed = f"{m['speedup']:.2f}x" if m.get("speedup") else ""
            steal = m.get("steal_share")
            steal = f"{100 * steal:.0f}%" if steal is not None else ""
            err = (
                f"{100 * m['prediction_error']:+.0f}%"
                if m.get("prediction_error") is not None
                else ""
            )
            rows.append(
                f"{lead} {m['step_s']:>8.3f} {m['step_mean_s']:>8.3f} {m['local_s']:>9.3f} "
                f"{m.get('local_cpu_s', float('nan')):>6.3f} {m['wire_bytes'] / 1e6:>9.2f} "
                f"{m.get('hidden_comm_s', 0.0):>6.3f} "
                f"{m['predicted_step_s'] or float('nan'):>8.3f} "
                f"{err:>6}  {speed:>8} {steal:>6}"
            )  # fmt: skip
        cal = run.get("calibration") or []
        if cal:
            rows.append("  calibration (op, MiB in, measured s, predicted s): " + "; ".join(
                f"{c['op']} {c['mib']:g} {c['measured_s']:.3f}/{c['predicted_s']:.3f}"
                for c in cal))  # fmt: skip
    rows.append("")
    rows.append("step s / mean s: median / mean of the timed steps (each the max over ranks); "
                "compute s: the same step with collectives replaced by local stand-ins (mean); "
                "cpu s: that step's CPU seconds in the rank process (mean, max over ranks); "
                "wire MB: bytes per step that reached gloo, one rank; hidden: comm seconds that "
                "ran under compute when the compute-alone steps are replayed on the link "
                "(cost.predict_overlap); pred s: compute + cost model on those bytes (shared "
                "link, gloo) - hidden; err: pred vs mean; speedup: mean "
                "step time vs adam (1-bit methods) or zero3 (zeropp); steal: the machine's "
                "CPU time taken by the hypervisor during the timed steps.")  # fmt: skip
    return "\n".join(rows)


# ============================================================================ the probe


def socket_probe(mib: int) -> None:
    """One TCP stream over 127.0.0.1: prints ``{"gbit_s": ..., "mib": ...}``."""
    n = mib * MiB
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def sink():
        c, _ = srv.accept()
        buf, got = bytearray(MiB), 0
        while got < n:
            k = c.recv_into(buf)
            if not k:
                break
            got += k
        c.sendall(b"k")  # the clock stops when the last byte has arrived, not left
        c.close()

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    s = socket.create_connection(srv.getsockname())
    chunk, sent = b"\0" * (4 * MiB), 0
    start = time.perf_counter()
    while sent < n:
        s.sendall(chunk[: min(len(chunk), n - sent)])
        sent += min(len(chunk), n - sent)
    s.recv(1)
    dt = time.perf_counter() - start
    print(json.dumps({"gbit_s": 8 * n / dt / 1e9, "mib": mib, "seconds": dt}))


# ============================================================================ one rank


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the namespace has nothing else
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=120),
    )
    from fscale.hw import cost

    # gloo's own algorithms on one shared medium: [Note: one shared link] and
    # [Note: gloo's reduce_scatter] in fscale/hw/cost.py.
    link = cost.Link.parse(args.rate, latency_s=args.latency_us * 1e-6, shared=True, backend="gloo")
    out = {"ok": True, "link": str(link), "threads_per_rank": torch.get_num_threads()}
    # The box may be shared: its load says how far compute times can be trusted.
    out["loadavg_start"] = os.getloadavg()
    out["calibration"] = calibrate(args, link)
    # The rank's own CPU per wire byte (gloo's copies, reductions, TCP work): it runs on
    # the cores the compute would overlap ([Note: overlapped steps] in fscale/hw/cost.py).
    host = statistics.median(r["cpu_s_per_wire_byte"] for r in out["calibration"])
    link = dataclasses.replace(link, host_s_per_byte=host)
    out["host_s_per_byte"] = host
    out["methods"] = []
    for name in _csv(args.methods):
        if name not in ALL_METHODS:
            raise SystemExit(f"unknown method {name!r}; known: {ALL_METHODS}")
        res = run_method(name, args, link)
        out["methods"].append(res)
        if args.rank == 0:
            if res.get("ok"):
                brief = (f"{res['step_s']:.3f} s/step, compute {res['local_s']:.3f} s, wire "
                         f"{res['wire_bytes'] / 1e6:.1f} MB, predicted "
                         f"{res['predicted_step_s']:.3f} s")  # fmt: skip
            else:
                brief = res.get("skipped") or res.get("error", "")[:300]
            print(f"    [{args.rate} x{args.world}] {name}: {brief}", flush=True)
    out["loadavg_end"] = os.getloadavg()
    by_name = {m["method"]: m for m in out["methods"] if m.get("ok")}
    for m in out["methods"]:
        base = by_name.get(BASELINE.get(m["method"], ""))
        if m.get("ok") and base:
            m["speedup"] = base["step_mean_s"] / m["step_mean_s"]
            m["baseline"] = base["method"]
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, all) jiffies of the whole machine from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _steal_share(before, after) -> float | None:
    """The share of the machine's CPU time the hypervisor gave to others in between."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _max_over_ranks(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _mean_over_ranks(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def calibrate(args, link) -> list[dict]:
    """Each collective on ``--calibrate-mib`` MiB of fp32 through fscale's comm table."""
    import torch

    from fscale.hw import comm, cost

    n = args.world
    numel = int(args.calibrate_mib * MiB / 4) // n * n
    rows = []
    for op in CALIBRATE_OPS:
        t = torch.randn(numel)
        x = t[: numel // n] if op == "all_gather" else t  # all_gather: the shard goes in

        def call(op=op, x=x):
            if op == "broadcast":
                return comm.broadcast(x, src=0)
            return getattr(comm, op)(x)

        call()  # connections and buffers warm
        times, cpus = [], []
        for _ in range(2):
            comm.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            call()
            cpus.append(_max_over_ranks(time.process_time() - cpu))
            times.append(_max_over_ranks(time.perf_counter() - start))
        nbytes = x.numel() * 4
        wire = cost.wire_bytes(op, nbytes, n, link.shared, link.backend)
        rows.append({
            "op": op,
            "mib": round(nbytes / MiB, 3),
            "measured_s": statistics.median(times),
            "predicted_s": cost.collective_seconds(op, nbytes, link, n),
            "cpu_s": statistics.median(cpus),
            "cpu_s_per_wire_byte": statistics.median(cpus) / wire,
        })  # fmt: skip
    for r in rows:
        r["error"] = r["predicted_s"] / r["measured_s"] - 1
    return rows


# ---------------------------------------------------------------------------- the model


def model_config(args):
    from fscale.models.gpt import GPTConfig

    if args.model == "tiny":
        return GPTConfig.tiny(seq_len=args.seq)
    return GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.d_model // 64,
                     d_model=args.d_model, seq_len=args.seq)  # fmt: skip


def _method_factory(name: str):
    """The compression method's constructor, or (None, why) when its module is missing."""
    module = {"onebit_adam": "onebit", "zero_one_adam": "onebit", "onebit_lamb": "onebit",
              "zeropp": "zeropp"}[name]  # fmt: skip
    try:
        mod = __import__(f"fscale.transforms._compress.{module}", fromlist=[name])
        return getattr(mod, name), None
    except Exception as e:  # a module being written may fail in any way on import
        return None, f"skipped: fscale.transforms._compress.{module}.{name} unavailable ({e})"


def _with_freeze(ctor, freeze_step: int):
    """``ctor(...)`` with every ``*freeze*`` int keyword set to ``freeze_step``."""
    kwargs = {}
    for pname, param in inspect.signature(ctor).parameters.items():
        if "freeze" in pname and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            kwargs[pname] = freeze_step
    return ctor(**kwargs), kwargs


def build_step(name: str, args, loss_fn):
    import fscale as fs
    from fscale.transforms.compress import compress_comm

    lr = 1e-3
    opt = fs.optim.lamb(lr) if name == "onebit_lamb" else fs.optim.adam(lr)
    step = fs.train_step(loss_fn, opt)
    info = {}
    if name in ("zero3", "zeropp"):
        step = fs.shard_zero(step, 3)
    if name in BASELINE:
        ctor, why = _method_factory(name)
        if ctor is None:
            return None, {"skipped": why}
        method, kwargs = _with_freeze(ctor, args.freeze_step)
        info["method_kwargs"] = kwargs
        step = compress_comm(step, method)
    info["transforms"] = [str(t) for t in step.transforms]
    return step, info


class Trace:
    """The schedule of a step run on local stand-ins, for ``cost.predict_overlap``.

    Events in program order: ``("compute", s)`` between comm calls (the stand-ins' own
    copies included, before their issue: ``local_s`` counts them too), ``("issue", key,
    op, nbytes)`` at each call that reached a backend, ``("wait", key)`` where the
    program blocked on it (right after the issue for a synchronous call, at
    ``Handle.wait()`` for an async one).
    """

    def __init__(self):
        self.events: list[tuple] = []
        self.last = time.perf_counter()
        self.keys = 0

    def restart(self) -> None:
        self.events, self.last = [], time.perf_counter()

    def _compute(self) -> None:
        now = time.perf_counter()
        self.events.append(("compute", now - self.last))
        self.last = now

    def issue(self, op: str, t) -> int:
        self._compute()
        self.keys += 1
        self.events.append(("issue", self.keys, op, t.numel() * t.element_size()))
        return self.keys

    def wait(self, key: int) -> None:
        self._compute()
        self.events.append(("wait", key))

    def close(self) -> list[tuple]:
        self._compute()
        return self.events


@contextlib.contextmanager
def local_collectives(world: int, trace: Trace | None = None):
    """Every collective replaced by a local stand-in with the right output shape.

    The step then does all its computing (compression kernels included) and moves no
    byte: its time is the compute alone. The values are wrong (nothing is reduced):
    time with it, never train. ``trace`` records when each call is issued and waited on.
    """
    import torch

    from fscale.hw import comm

    trace = trace or Trace()

    def recorded(fn, op):
        def call(t, **kw):
            result = fn(t, **kw)  # the stand-in's copies: compute before the issue
            key = trace.issue(op, t)
            if not kw.get("async_op"):
                trace.events.append(("wait", key))  # at once: nothing runs under it
                return result

            def finish():
                trace.wait(key)
                return result

            finish.in_place = True  # pending_result as a plain Handle(result) gives it
            return comm.Handle(result, None, finish)

        return call

    def done(result, async_op):
        return result  # the Handle is made by `recorded`, which sees the wait

    def all_reduce(t, *, op, group, async_op):
        return done(t, async_op)

    def all_gather(t, *, group, async_op):
        src = t.reshape(1) if t.dim() == 0 else t
        return done(torch.cat([src] * world), async_op)

    def reduce_scatter(t, *, op, group, async_op):
        return done(t[: t.shape[0] // world].clone(), async_op)

    def all_to_all(t, *, output_split_sizes, input_split_sizes, group, async_op):
        rows = t.shape[0] if output_split_sizes is None else sum(output_split_sizes)
        out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
        k = min(rows, t.shape[0])
        out[:k] = t[:k]
        return done(out, async_op)

    def broadcast(t, *, src, group, async_op):
        return done(t, async_op)

    with contextlib.ExitStack() as stack:
        for op, fn in (("all_reduce", all_reduce), ("all_gather", all_gather),
                       ("reduce_scatter", reduce_scatter), ("all_to_all", all_to_all),
                       ("broadcast", broadcast), ("barrier", lambda *, group: None)):  # fmt: skip
            stack.enter_context(comm.override(op, fn if op == "barrier" else recorded(fn, op)))
        yield


def run_method(name: str, args, link) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import fscale as fs
    from fscale.hw import comm, cost
    from fscale.models.gpt import GPT

    res: dict = {"method": name, "ok": False}
    try:
        cfg = model_config(args)
        torch.manual_seed(0)  # the same init on every rank and for every method
        model = GPT(cfg)
        params, apply = fs.functional(model)
        res["params"] = sum(p.numel() for p in params.values())

        def loss_fn(p, batch):
            logits = apply(p, batch["x"])
            return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

        step, info = build_step(name, args, loss_fn)
        res.update(info)
        if step is None:
            return res
        with contextlib.suppress(Exception):  # the plan's estimate is a nicety
            plan = fs.plan(step, params)
            res["plan_comm_s"] = cost.predict(plan.collectives, link, args.world).seconds
            res["plan_bytes"] = {f"{c.tag}:{c.op}": c.bytes for c in plan.collectives}
        params, state = step.init(params)
        gen = torch.Generator().manual_seed(1000 + args.rank)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        batch = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
        times, losses, wire, calls = [], [], {}, {}
        ticks = None
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                ticks = _cpu_ticks()
            dist.barrier()
            with comm.counting() as counts:
                start = time.perf_counter()
                params, state, metrics = step(params, state, batch)
                elapsed = time.perf_counter() - start
            losses.append(float(metrics["loss"]))
            t = _max_over_ranks(elapsed)
            if i >= args.warmup:
                times.append(t)
                # Summed over the timed steps: 0/1 Adam skips rounds, so one step's
                # bytes are not every step's.
                for op, st in counts.wire.items():
                    wire[op] = wire.get(op, 0) + st.bytes / args.steps
                    calls[op] = calls.get(op, 0) + st.calls / args.steps
                res["comm_bytes"] = {k: int(v) for k, v in metrics["comm_bytes"].items()}
                res["comm_bytes_by_tag"] = {
                    k: int(v) for k, v in metrics.get("comm_bytes_by_tag", {}).items()
                }
        res["steal_share"] = _steal_share(ticks, _cpu_ticks())  # [Note: warm-up and noise]
        res["step_times_s"] = times
        res["step_s"] = statistics.median(times)
        res["step_mean_s"] = statistics.fmean(times)
        res["loss_first"], res["loss_last"] = losses[0], losses[-1]
        res["wire_bytes_by_op"], res["wire_calls_by_op"] = wire, calls  # mean per step
        res["wire_bytes"] = sum(wire.values())
        comm_s = cost.predict_bytes(wire, link, args.world, calls).seconds
        res["predicted_comm_s"] = _mean_over_ranks(comm_s)
        local, local_cpu, overlaps = [], [], []
        trace = Trace()
        with local_collectives(args.world, trace):
            # One untimed step first: the first step after the real ones ran 2-3x slower.
            for i in range(1 + args.local_steps):
                start, cpu = time.perf_counter(), time.process_time()
                trace.restart()
                params, state, _ = step(params, state, batch)
                events = trace.close()
                if i:
                    local.append(time.perf_counter() - start)
                    local_cpu.append(time.process_time() - cpu)
                    overlaps.append(cost.predict_overlap(events, link, args.world))
        res["local_times_s"] = local
        res["trace_events"] = events  # the last compute-alone step's schedule
        # The compute-alone steps replayed on the link ([Note: overlapped steps] in
        # fscale/hw/cost.py): the comm that ran under compute, 0 where every collective
        # is waited on as it is issued (all but ZeRO-3's prefetched gathers and
        # deferred reduce-scatters).
        res["overlap_step_s"] = _max_over_ranks(statistics.fmean(o.seconds for o in overlaps))
        res["hidden_comm_s"] = _mean_over_ranks(statistics.fmean(o.hidden for o in overlaps))
        res["trace_comm_s"] = _mean_over_ranks(statistics.fmean(o.comm for o in overlaps))
        res["local_s"] = _max_over_ranks(statistics.fmean(local))
        # This process's CPU seconds for the same steps: on a shared box the wall time
        # above also counts other processes' turns on the cores, this does not.
        res["local_cpu_s"] = _max_over_ranks(statistics.fmean(local_cpu))
        # Means, not medians, for the prediction and the speedups: a method whose steps
        # differ (0/1 Adam's skipped rounds) is only fairly measured over a window.
        # Compute + the measured wire bytes' time - what the schedule hides. (Not the
        # replay's own total: 0/1 Adam's compute-alone steps skip other rounds than
        # the timed ones, so the comm comes from the timed steps' bytes.)
        res["added_step_s"] = res["local_s"] + res["predicted_comm_s"]
        res["predicted_step_s"] = res["added_step_s"] - res["hidden_comm_s"]
        res["added_error"] = res["added_step_s"] / res["step_mean_s"] - 1
        res["prediction_error"] = res["predicted_step_s"] / res["step_mean_s"] - 1
        res["ok"] = True
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    # Ranks that failed differently must not part ways: meet before the next method.
    dist.barrier()
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        socket_probe(args.probe_mib)
    elif args.rank is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        rank_main(args)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            parent(args)
        except KeyboardInterrupt:
            sys.exit("compress_link.py: interrupted; namespace removed.")


if __name__ == "__main__":
    main()
