"""Where ``fs.save``'s time goes for a GPU-resident state, old writer loop against new.

One run (about 4-6 minutes on one H200 for ``--model 1b4``) trains the 1.4B GPT under
``mixed_precision("bf16")`` with AdamW for two steps, then measures on the state that
``fs.save`` writes (bf16 params, fp32 masters, two fp32 moments; ~15.8 GB):

1. device-to-host copies of every tensor: pageable ``.cpu()`` one after another, the
   same from 8 threads at once (what DCP's writer threads do), and into two reused
   64 MiB pinned slabs on a side stream (what fscale's writer does): GB/s each;
2. ``dd oflag=direct`` of 8 GiB to the same disk: the drive's sequential-write peer;
3. ``fs.save`` (synchronous, to its return: fsynced, renamed into place) with DCP's own
   writer loop (``SaveIO(pinned=0)``: the old path), fscale's loop (``SaveIO()``), and
   fscale's loop without early write-out (``SaveIO(writeback=0)``): GB/s and x dd, in
   an interleaved order (new, old, new without write-out, new again), each checkpoint
   removed and the page cache synced before the next; the old and new checkpoints'
   checksum records (CRC-32 of every data file) must be equal: the same bytes;
4. ``fs.load`` of the new checkpoint with fscale's reader (a thread per file, device
   targets through pinned memory) and with DCP's (one file after another, pageable
   copies), the files dropped from the page cache before each, timed, each checked
   torch.equal to what was saved;
5. asynchronous saves: the blocking call (staging) and the slowdown of the steps that run
   while the save is written, old staging (pageable, writer threads at full priority)
   against new (pinned, niced), the new one twice (the first pins its host memory).

Prints a table and the JSON; writes the JSON to ``--out`` or ``$OUT/checkpoint-profile-
<model>.json`` when ``OUT`` is set (else bench/results/).

Usage::

    python3 bench/checkpoint_profile.py --model 1b4 --dir /root/ckpt-prof      # one H200
    python3 bench/checkpoint_profile.py --model tiny --device cpu --dir /tmp/ckpt-prof
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402
from checkpoint import MODELS, _dd, _du, _sync, _tensors, _uncache, trained  # noqa: E402

import fscale as fs  # noqa: E402
from fscale.checkpoint import SaveIO  # noqa: E402

OLD = SaveIO(pinned=0, background_nice=0, stage="pageable")
NEW = SaveIO()
NO_WRITEBACK = SaveIO(writeback=0)


def _vm() -> dict:
    out = {}
    for k in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes",
              "dirty_expire_centisecs"):  # fmt: skip
        try:
            out[k] = int(Path(f"/proc/sys/vm/{k}").read_text())
        except OSError:
            pass
    return out


def _d2h(tensors: list[torch.Tensor], device) -> dict:
    """GB/s of copying every tensor to the host: pageable serially, pageable from 8
    threads, pinned slabs on a side stream."""
    nbytes = sum(t.nbytes for t in tensors)
    out = {"bytes": nbytes}
    if device.type != "cuda":
        return out
    _sync(device)
    t0 = time.perf_counter()
    for t in tensors:
        t.cpu()
    out["pageable_serial_GBps"] = nbytes / (time.perf_counter() - t0) / 1e9

    work = sorted(tensors, key=lambda t: -t.nbytes)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not work:
                    return
                t = work.pop()
            t.cpu()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out["pageable_8_threads_GBps"] = nbytes / (time.perf_counter() - t0) / 1e9

    slab = 64 << 20
    t0 = time.perf_counter()
    slabs = [torch.empty(slab, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    out["pin_2x64MiB_s"] = time.perf_counter() - t0
    stream = torch.cuda.Stream(device)
    events = [None, None]
    k = 0
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for t in tensors:
            flat = t.reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), slab):
                n = min(slab, flat.numel() - start)
                if events[k] is not None:
                    events[k].synchronize()  # the slab's previous copy was "written"
                slabs[k][:n].copy_(flat[start : start + n], non_blocking=True)
                events[k] = torch.cuda.Event()
                events[k].record(stream)
                k ^= 1
    stream.synchronize()
    out["pinned_slabs_GBps"] = nbytes / (time.perf_counter() - t0) / 1e9
    return out


def _drop(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


@contextlib.contextmanager
def _reader(old: bool):
    """fs.load with DCP's own reader (one file after another, pageable copies) if ``old``."""
    if not old:
        yield
        return
    saved = fs.checkpoint.ParallelReader
    fs.checkpoint.ParallelReader = lambda where, threads: dcp.FileSystemReader(where)
    try:
        yield
    finally:
        fs.checkpoint.ParallelReader = saved


def _sums(where: str) -> dict:
    """``{data file: (size, CRC-32)}``, read back (DCP's loop records one CRC per file,
    fscale's one per item: the files are compared, not the records)."""
    out = {}
    for n in os.listdir(where):
        if n.startswith("__checksums_"):
            for name, rec in json.loads(Path(where, n).read_text()).items():
                crc = 0
                with open(Path(where, name), "rb", buffering=0) as f:
                    while chunk := f.read(64 << 20):
                        crc = zlib.crc32(chunk, crc)
                out[name] = (rec["size"], crc)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dir", default="/tmp/fscale-ckpt-prof")
    p.add_argument("--steps", type=int, default=4, help="timed steps per async save")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t_start = time.perf_counter()
    step, params, state, batch, build = trained(args.model, "bf16", device, args.batch, args.seq)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    row: dict = {"vm": _vm(), "cpus": os.cpu_count(), "write_threads": fs.checkpoint.WRITE_THREADS}
    log = []

    def say(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:6.1f} s] {msg}"
        log.append(line)
        print(line, flush=True)

    say(f"model {args.model} trained 2 steps on {device}")
    tensors = list(_tensors(params, state).values())
    row["d2h"] = _d2h(tensors, device)
    say(f"d2h {json.dumps(row['d2h'])}")

    # The drive's peer, written once the checkpoint's size is known (first save).
    saves = {}
    order = [("new", NEW), ("old", OLD), ("new_no_writeback", NO_WRITEBACK), ("new_again", NEW)]
    sums = {}
    for name, io in order:
        target = os.path.join(args.dir, name)
        _sync(device)
        t0 = time.perf_counter()
        fs.save(target, params, state, io=io)
        s = time.perf_counter() - t0
        nbytes = _du(target)
        saves[name] = {"s": s, "bytes": nbytes, "GBps": nbytes / s / 1e9}
        sums[name] = _sums(target)
        if name == "new":
            dd_s, dd_bytes, dd_read_s = _dd(os.path.join(args.dir, "dd.bin"), nbytes)
            row["dd_GBps"] = dd_bytes / dd_s / 1e9
            row["dd_read_GBps"] = dd_bytes / dd_read_s / 1e9
            say(f"dd {row['dd_GBps']:.2f} GB/s write, {row['dd_read_GBps']:.2f} GB/s read")
        if name != "new_again":
            _drop(target)
        say(f"save {name}: {s:.2f} s, {saves[name]['GBps']:.2f} GB/s")
    for v in saves.values():
        v["x_dd"] = v["GBps"] / row["dd_GBps"]
    row["save"] = saves
    row["old_and_new_files_equal"] = sums["old"] == sums["new"] == sums["new_again"]

    saved = {k: v.clone() for k, v in _tensors(params, state).items()}
    where = os.path.join(args.dir, "new_again")
    row["load"] = {}
    for name in ("new", "old"):
        _uncache(where)  # read from the disk, not from the page cache of the last read
        fresh_step, fresh = build()
        _sync(device)
        t0 = time.perf_counter()
        with _reader(old=name == "old"):
            lp, ls = fs.load(where, fresh_step, fresh)
        _sync(device)
        load_s = time.perf_counter() - t0
        got = _tensors(lp, ls)
        row["load"][name] = {
            "s": load_s,
            "GBps": saves["new_again"]["bytes"] / load_s / 1e9,
            "x_dd_read": saves["new_again"]["bytes"] / load_s / 1e9 / row["dd_read_GBps"],
            "equal": saved.keys() == got.keys()
            and all(torch.equal(got[k], v) for k, v in saved.items()),
        }
        say(f"load {name} {load_s:.2f} s, equal={row['load'][name]['equal']}")
        del got, lp, ls
    del saved, fresh, fresh_step
    _drop(where)

    def steps(n):
        nonlocal params, state
        times = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            params, state, _ = step(params, state, batch)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return times

    plain = steps(args.steps)
    row["step_s_plain"] = plain
    asyncs = {}
    for name, io in (("old", OLD), ("new_first", NEW), ("new_second", NEW)):
        target = os.path.join(args.dir, f"async-{name}")
        _sync(device)
        t0 = time.perf_counter()
        handle = fs.save(target, params, state, async_save=True, io=io)
        call_s = time.perf_counter() - t0
        during = steps(args.steps)
        t1 = time.perf_counter()
        handle.wait()
        wait_s = time.perf_counter() - t1
        slowdown = sum(during) - sum(plain[: len(during)])
        asyncs[name] = {
            "call_s": call_s,
            "steps_slowdown_s": slowdown,
            "stall_s": call_s + slowdown,
            "wait_after_steps_s": wait_s,
            "step_s_during": during,
        }
        _drop(target)
        say(f"async {name}: call {call_s:.2f} s + steps slower by {slowdown:.2f} s")
    row["async"] = asyncs
    row["total_s"] = time.perf_counter() - t_start
    shutil.rmtree(args.dir, ignore_errors=True)

    result = {"bench": "checkpoint_profile", **provenance(device), "model": args.model, **row}
    out = args.out or os.environ.get("OUT")
    name = f"checkpoint-profile-{args.model}.json"
    path = Path(out) if out else Path(__file__).parent / "results" / name
    if path.suffix != ".json":
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))

    print("\n" + json.dumps(row, indent=1))
    d = row["d2h"]
    print(f"\n{'':24s} {'s':>7s} {'GB/s':>6s} {'x dd':>5s}   (dd {row['dd_GBps']:.2f} GB/s)")
    for k, v in saves.items():
        print(f"save {k:19s} {v['s']:7.2f} {v['GBps']:6.2f} {v['x_dd']:5.2f}")
    for k, v in row["load"].items():
        print(f"load {k:19s} {v['s']:7.2f} {v['GBps']:6.2f}        equal={v['equal']}")
    if "pinned_slabs_GBps" in d:
        print(
            f"d2h GB/s: pageable {d['pageable_serial_GBps']:.2f}, pageable x8 threads "
            f"{d['pageable_8_threads_GBps']:.2f}, pinned slabs {d['pinned_slabs_GBps']:.2f}"
        )
    for k, v in asyncs.items():
        print(f"async {k:11s} stall {v['stall_s']:.2f} s (call {v['call_s']:.2f} + steps "
              f"{v['steps_slowdown_s']:.2f})")  # fmt: skip
    print(f"old/new files equal (CRC-32 records): {row['old_and_new_files_equal']}")
    print(f"total {row['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
