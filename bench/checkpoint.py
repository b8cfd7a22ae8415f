"""Checkpoint speed on one GPU: ``fs.save`` / ``fs.load`` against ``dd oflag=direct``.

The 1.4B GPT under ``mixed_precision("bf16")`` with AdamW (fp32 params and two fp32
moments: 12 bytes per param on the device) trains two steps, then:

- ``fs.save`` (synchronous) of params and state, timed to its return (files fsynced
  and renamed into place); GB/s over the bytes on disk;
- ``dd if=/dev/zero of=<same disk> bs=64M oflag=direct`` of the same number of bytes,
  the drive's sequential-write peer (goal: fs.save >= 80% of it);
- ``dd iflag=direct`` reading those bytes back, the read peer of ``fs.load``;
- ``fs.load`` (the files dropped from the page cache first) into a fresh
  ``step.init``, timed, and checked equal (torch.equal) to what was saved;
- the training stall of an asynchronous save: the ``fs.save(..., async_save=True)``
  call itself (it stages a copy of the state) plus how much slower than the median
  plain step every step is that runs until the save is written (goal: <= 1 s);
  ``--async-io NAME:field=int,...`` times more ``SaveIO`` settings in the same run
  (the best one is the row's figure, all are in ``async_runs``), ``--async-only``
  skips the synchronous save, ``dd`` and the load, ``--no-default-async`` times only
  the ``--async-io`` variants, and ``--repeat N`` runs them in turn N rounds and
  reports each one's median stall (the stalls of one machine vary by seconds between
  runs of the same settings). Every stall is also given against the median of all
  plain steps, which run after each save too.

Every timed step also records offload's host-update span (its first sub-group update
to its last: ``update_s_*``) and the host's CPU seconds by kind over the step from
``/proc/stat`` (``cpu_s_*``; ``steal`` is time the hypervisor took this VM's cores,
for its disk I/O among others), plain and during each async save.

``--old-io`` saves with DCP's own writer loop and the old async staging
(``SaveIO(pinned=0, background_nice=0, stage="pageable")``), for A/B runs;
``--background-nice`` and ``--background-threads`` set ``SaveIO``'s (async saves);
``--direct`` writes the data files with ``O_DIRECT`` (``SaveIO(direct=True)``; an
``--async-io`` variant can take ``direct=true`` too); ``--no-load`` skips the load
(the offloaded 3.5B load takes over a minute).

``--stack offload`` runs ``offload(shard_zero(mixed_precision(step, "bf16"), 3), "cpu")``
instead, whose fp32 masters and moments live in host memory (``--model 3b4``: the
largest whose checkpoint, 12 bytes per param, fits the 64 GiB disk next to what the run
needs). What was saved is compared with what was loaded by a float64 sum and sum of
squares per tensor (the saved state is freed before the load, so the host never holds
two copies), exactly (torch.equal) otherwise. ``dd`` writes at most 8 GiB.

Usage::

    python3 bench/checkpoint.py --model 1b4 --dir /root/ckpt-bench --out $OUT/checkpoint-1b4.json
    python3 bench/checkpoint.py --model 3b4 --stack offload --dir /root/ckpt-bench --out $OUT/
    python3 bench/checkpoint.py --model tiny --device cpu --dir /tmp/ckpt-bench   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402

import fscale as fs  # noqa: E402
from fscale import tree  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402
from fscale.state import TensorEntry, describe  # noqa: E402

MODELS = {
    "tiny": GPTConfig.tiny,
    # 6 x 768: ~0.1B params, a 1.2 GB checkpoint (CPU runs of the save path).
    "m100": lambda: GPTConfig.gpt_1b4(n_layer=6, d_model=768, n_head=12),
    "1b4": GPTConfig.gpt_1b4,
    # 30 x 3072 (24 heads of 128): 3.55B params, a 42.6 GB checkpoint in fp32 + moments.
    "3b4": lambda: GPTConfig.gpt_1b4(n_layer=30, d_model=3072, n_head=24),
}
DD_MAX_BYTES = 8 << 30


def _tensors(params, state) -> dict[str, torch.Tensor]:
    """Every tensor of params and state by path (offloaded host state included)."""
    out = {f"params/{k}": v for k, v in params.items() if v is not None}
    for path, entry in describe(state).items():
        if isinstance(entry, TensorEntry):
            out[path] = entry.tensor
    return out


def _fingerprint(tensors: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for k, t in tensors.items():
        x = t.detach().double()
        out[k] = (float(x.sum()), float((x * x).sum()))
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _dd(target: str, nbytes: int) -> tuple[float, int, float]:
    """``(write s, bytes, read s)``: ``dd`` writing ``nbytes`` with O_DIRECT (fsynced),
    the drive's write peer, then reading them back with O_DIRECT (no page cache), its
    read peer."""
    count = max(1, min(nbytes, DD_MAX_BYTES) // (64 << 20))

    def run(*argv) -> float:
        t0 = time.perf_counter()
        out = subprocess.run(["dd", *argv], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([0-9.e+-]+) s", out.stderr)
        return float(m.group(1)) if m else time.perf_counter() - t0

    try:
        write_s = run("if=/dev/zero", f"of={target}", "bs=64M", f"count={count}",
                      "oflag=direct", "conv=fsync")  # fmt: skip
        read_s = run(f"if={target}", "of=/dev/null", "bs=64M", "iflag=direct")
    finally:
        if os.path.exists(target):
            os.remove(target)
    return write_s, count * (64 << 20), read_s


def _uncache(where: str) -> None:
    """Drop the page cache of a checkpoint's files (posix_fadvise DONTNEED), so a load
    reads the disk."""
    os.sync()
    for path in Path(where).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def trained(model_name: str, stack: str, device, batch_size: int, seq: int | None):
    """``(step, params, state, batch, build)``: the bench's GPT (seed 0) on ``device``
    for ``stack`` ("bf16", or "offload": offload(shard_zero(bf16, 3), "cpu")), after two
    steps on one random batch (seed 1); ``build()`` gives a fresh ``(step, params)`` of
    the same model for a load."""
    cfg = MODELS[model_name]()
    seq = seq or cfg.seq_len
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)

    def build():
        params, apply = fs.functional(model)

        def loss_fn(p, batch):
            logits = apply(p, batch["x"])
            return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

        step = fs.train_step(loss_fn, fs.optim.adamw(lr=3e-4, weight_decay=0.1))
        step = fs.mixed_precision(step, "bf16")
        if stack == "offload":
            step = fs.offload(fs.shard_zero(step, 3), "cpu")
        return step, params

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), generator=g).to(device)
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    step, params = build()
    params, state = step.init(params)
    for _ in range(2):
        params, state, _ = step(params, state, batch)
    _sync(device)
    return step, params, state, batch, build


def _value(text: str):
    """A ``--async-io`` field value: true / false, an int, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _cpu_seconds() -> dict[str, float]:
    """The host's CPU time by kind (all cores, seconds) from /proc/stat: ``steal`` is
    time the hypervisor ran something else on this VM's cores (its disk I/O, say)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:9]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {k: int(v) / tick for k, v in zip(names, fields, strict=False)}


def _update_span(state) -> float:
    """Seconds from offload's first sub-group update to its last in the step just run
    (its host optimizer's share of the step), or nan without offload's log."""
    handle = state.get("offload") if isinstance(state, dict) else None
    times = {}
    for _, t, kind, _ in getattr(handle, "events", ()):
        if kind in ("update_start", "update_end"):
            times.setdefault(kind, []).append(t)
    if not times.get("update_start") or not times.get("update_end"):
        return float("nan")
    return max(times["update_end"]) - min(times["update_start"])


@contextlib.contextmanager
def _profiled(on: bool):
    """cProfile the block when ``on``; the top 25 entries by cumulative time print."""
    if not on:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--stack", choices=("bf16", "offload"), default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dir", default="/tmp/fscale-ckpt-bench")
    p.add_argument(
        "--steps",
        type=int,
        default=4,
        help="plain timed steps (the stall compares every step during a save with their median)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--old-io", action="store_true", help="DCP's writer loop, pageable staging")
    p.add_argument("--background-nice", type=int, default=None)
    p.add_argument("--background-threads", type=int, default=None)
    p.add_argument("--direct", action="store_true", help="SaveIO(direct=True): O_DIRECT data files")
    p.add_argument("--no-load", action="store_true")
    p.add_argument("--async-only", action="store_true", help="skip the sync save, dd, load")
    p.add_argument(
        "--async-io",
        action="append",
        help="another async save to time, NAME:field=value,... of SaveIO (repeatable), e.g. "
        "idle2:background_threads=2,background_idle=true; env.VAR=value sets an environment "
        "variable while that save runs (e.g. pyloop:env.FSCALE_CRC_WRITE=0)",
    )
    p.add_argument("--max-async-steps", type=int, default=200)
    p.add_argument(
        "--no-default-async", action="store_true", help="time only the --async-io variants"
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of the async variants")
    p.add_argument(
        "--profile-async",
        action="store_true",
        help="cProfile the async fs.save call; the top entries by cumulative time print",
    )
    args = p.parse_args(argv)
    io = (
        fs.checkpoint.SaveIO(pinned=0, background_nice=0, stage="pageable")
        if args.old_io
        else fs.checkpoint.SaveIO()
    )
    if args.background_nice is not None:
        io = dataclasses.replace(io, background_nice=args.background_nice)
    if args.background_threads is not None:
        io = dataclasses.replace(io, background_threads=args.background_threads)
    if args.direct:
        io = dataclasses.replace(io, direct=True)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    step, params, state, batch, build = trained(
        args.model, args.stack, device, args.batch, args.seq
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    target = os.path.join(args.dir, "ckpt")

    nan = float("nan")
    save_s, nbytes, dd_s, dd_bytes, dd_read_s = nan, nan, nan, 1, nan
    if not args.async_only:
        t0 = time.perf_counter()
        fs.save(target, params, state, io=io)
        save_s = time.perf_counter() - t0
        nbytes = _du(target)
        dd_s, dd_bytes, dd_read_s = _dd(os.path.join(args.dir, "dd.bin"), nbytes)

    exact = args.stack != "offload"
    load_s, same = nan, None
    if not (args.no_load or args.async_only):
        saved = _tensors(params, state)
        saved = {k: v.clone() for k, v in saved.items()} if exact else _fingerprint(saved)
        del params, state
        fresh_step, fresh = build()
        _uncache(target)
        t0 = time.perf_counter()
        params, state = fs.load(target, fresh_step, fresh)
        _sync(device)
        load_s = time.perf_counter() - t0
        got = _tensors(params, state)
        if exact:
            same = saved.keys() == got.keys() and all(
                torch.equal(got[k], v) for k, v in saved.items()
            )
        else:
            same = _fingerprint(got) == saved
        del fresh, saved, got
    if os.path.exists(target):
        shutil.rmtree(target)  # room for the async save's checkpoint on the same disk

    updates: list[float] = []  # per step: offload's host update, first start to last end
    cpu: list[dict] = []  # per step: the host's CPU seconds by kind (steal: the hypervisor's)

    def one_step() -> float:
        nonlocal params, state
        _sync(device)
        before = _cpu_seconds()
        t0 = time.perf_counter()
        params, state, _ = step(params, state, batch)
        _sync(device)
        took = time.perf_counter() - t0
        updates.append(_update_span(state))
        after = _cpu_seconds()
        cpu.append({k: round(after[k] - before.get(k, 0.0), 3) for k in after})
        return took

    def async_run(name: str, save_io, env: dict) -> dict:
        """One asynchronous save: its call, then steps until it is written (at most
        ``--max-async-steps``); the stall is the call plus every such step's excess over
        the median plain step. ``env`` is set while it runs."""
        _sync(device)
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        where = os.path.join(args.dir, f"async-{name}")
        available = fs.checkpoint._host_available()  # the spread between machines
        t0 = time.perf_counter()
        with _profiled(args.profile_async):
            handle = fs.save(where, params, state, async_save=True, io=save_io)
        call = time.perf_counter() - t0
        during = []
        first_update = len(updates)
        while not handle.done() and len(during) < args.max_async_steps:
            during.append(one_step())
        during_updates, during_cpu = updates[first_update:], cpu[first_update:]
        counted = handle.done()  # every step that ran while it was written is counted
        handle.wait()
        total = time.perf_counter() - t0
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        shutil.rmtree(where, ignore_errors=True)
        after = [one_step() for _ in range(args.steps)]  # the baseline again, for drift
        plain_after.extend(after)
        base = statistics.median(plain)
        slowdown = sum(t - base for t in during)
        first = sum(t - base for t in during[: args.steps])
        print(
            f"async {name}: stall {call + slowdown:.2f} s (call {call:.2f} s + {len(during)} "
            f"steps slower by {slowdown:.2f} s; first {args.steps}: {first:.2f} s), "
            f"save written in {total:.1f} s",
            flush=True,
        )
        return {
            "name": name,
            "io": repr(save_io),
            "env": env,
            "step_s_during_async_save": during,
            "update_s_during_async_save": during_updates,
            "cpu_s_during_async_save": during_cpu,
            "async_call_s": call,
            "async_steps_slowdown_s": slowdown,
            f"async_slowdown_first_{args.steps}_steps_s": first,
            "async_stall_s": call + slowdown,
            "async_save_written_s": total,
            "async_all_steps_counted": counted,
            "step_s_plain_after": after,
            "host_available_bytes_at_call": available,
        }

    plain = [one_step() for _ in range(args.steps)]
    update_plain, cpu_plain = updates[-len(plain) :], cpu[-len(plain) :]
    plain_after: list[float] = []
    variants = [] if args.no_default_async else [("default", io, {})]
    for spec in args.async_io or []:
        name, _, kv = spec.partition(":")
        pairs = [x.split("=", 1) for x in kv.split(",") if x]
        env = {k.removeprefix("env."): v for k, v in pairs if k.startswith("env.")}
        fields = {k: _value(v) for k, v in pairs if not k.startswith("env.")}
        variants.append((name, dataclasses.replace(io, **fields), env))
    # --repeat: the variants in turn, N rounds (A B A B ...), so that a drift of the
    # machine over the minutes of the run lands on every variant alike.
    runs = []
    for k in range(args.repeat):
        for name, v, env in variants:
            runs.append({**async_run(name, v, env), "round": k})
    # Each run's stall again against every plain step of the run (before and after
    # each save): a baseline that drifts over minutes of training moves them all.
    pooled = statistics.median(plain + plain_after)
    for r in runs:
        during = r["step_s_during_async_save"]
        r["async_stall_pooled_s"] = r["async_call_s"] + sum(t - pooled for t in during)
        print(
            f"async {r['name']}: stall {r['async_stall_pooled_s']:.2f} s against the "
            f"median of all {len(plain) + len(plain_after)} plain steps ({pooled:.3f} s)"
        )
    by_variant = {}
    for name, _, _ in variants:
        mine = [r for r in runs if r["name"] == name]
        by_variant[name] = {
            "stall_s": [r["async_stall_s"] for r in mine],
            "stall_pooled_s": [r["async_stall_pooled_s"] for r in mine],
            "median_stall_s": statistics.median(r["async_stall_s"] for r in mine),
            "median_stall_pooled_s": statistics.median(r["async_stall_pooled_s"] for r in mine),
        }
        if args.repeat > 1:
            v = by_variant[name]
            print(
                f"async {name}: median of {len(mine)} stalls {v['median_stall_s']:.2f} s "
                f"({v['median_stall_pooled_s']:.2f} s against the pooled plain steps)"
            )
    # The row's figure: the best run, or with --repeat the variant of the best median
    # (its median run).
    if args.repeat > 1:
        name = min(by_variant, key=lambda n: by_variant[n]["median_stall_s"])
        mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["async_stall_s"])
        best = mine[(len(mine) - 1) // 2]
    else:
        best = min(runs, key=lambda r: r["async_stall_s"])
    call_s, slowdown_s, stall_s = (
        best["async_call_s"],
        best["async_steps_slowdown_s"],
        best["async_stall_s"],
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    row = {
        "params": sum(t.numel() for t in tree.leaves(params) if t is not None),
        "checkpoint_bytes": nbytes,
        "save_s": save_s,
        "save_GBps": nbytes / save_s / 1e9,
        "dd_s": dd_s,
        "dd_GBps": dd_bytes / dd_s / 1e9,
        "save_vs_dd": (nbytes / save_s) / (dd_bytes / dd_s),
        "load_s": load_s,
        "load_GBps": nbytes / load_s / 1e9,
        "dd_read_s": dd_read_s,
        "dd_read_GBps": dd_bytes / dd_read_s / 1e9,
        "load_vs_dd_read": (nbytes / load_s) / (dd_bytes / dd_read_s),
        "loaded_equal": same,
        "step_s_plain": plain,
        "update_s_plain": update_plain,
        "cpu_s_plain": cpu_plain,
        "step_s_plain_after_each_async": plain_after,
        "async_stall_pooled_s": best["async_stall_pooled_s"],
        "async_best": best["name"],
        "async_call_s": call_s,
        "async_steps_slowdown_s": slowdown_s,
        "async_stall_s": stall_s,
        "async_by_variant": by_variant,
        "async_runs": runs,
    }
    result = {
        "bench": "checkpoint",
        **provenance(device),
        "model": args.model,
        "stack": args.stack,
        "io": repr(io),
        "compare": "torch.equal" if exact else "float64 sum and sum of squares per tensor",
        **row,
    }
    out = args.out or os.environ.get("OUT")
    name = f"checkpoint-{args.model}-{args.stack}.json"
    path = Path(out) if out else Path(__file__).parent / "results" / name
    if path.suffix != ".json":
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}, indent=1))
    print(
        f"\nsave {save_s:.2f} s ({row['save_GBps']:.2f} GB/s, {row['save_vs_dd']:.2f}x dd "
        f"{row['dd_GBps']:.2f} GB/s), load {load_s:.2f} s ({row['load_GBps']:.2f} GB/s, "
        f"{row['load_vs_dd_read']:.2f}x dd read {row['dd_read_GBps']:.2f} GB/s), "
        f"equal={same}, async stall {stall_s:.2f} s (call {call_s:.2f} s + steps slower by "
        f"{slowdown_s:.2f} s over {len(best['step_s_during_async_save'])} steps, "
        f"{best['name']} of {len(runs)})\nwrote {path}"
    )


if __name__ == "__main__":
    main()
