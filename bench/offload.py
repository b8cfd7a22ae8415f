"""offload(cpu|nvme) on one GPU host: CPU Adam, NVMe swap bandwidth, the largest GPT that trains.

One run, three parts (``--parts``), each against its peer on the same machine:

  adam   fscale's host AdamW (the kernel ``offload`` runs: ``fs.optim.adamw`` under
         ``cpu_adam.host_kernels()``) against ``torch.optim.AdamW(fused=True)`` and
         ``(foreach=True)`` on the same fp32 CPU tensors and threads (``--adam-m``
         million params in 4M-element tensors). M params/s and GB/s at 28 bytes/param.
         Also the C loop writing the step into second tensors (what an async save's
         kept buffers ask of the step after it) against a copy and torch's kernel.
  swap   the swap engine (``fscale.io.swap.SwapEngine``, the one ``offload(tier="nvme")``
         uses: O_DIRECT when the filesystem takes it, chunk threads, CRC-32 per chunk)
         writing then reading ``--swap-gib`` GiB as 256 MiB files through 3 pinned
         buffers, against ``dd bs=64M oflag=direct`` / ``iflag=direct`` on the same
         directory. Every read is verified (checksums), the data compared once.
  train  ``offload(shard_zero(mixed_precision(train_step(...), "bf16"), 3), "cpu",
         delayed_update=...)`` on GPTs of width 4096 and growing depth, one process:
         tokens/s, MFU (6N+attention FLOPs per token, ``GPT.flops_per_token``, over the
         bf16 dense peak ``--peak-tflops``), device peak GiB, host bytes, and the time
         split (step wall time vs the optimizer's host work). Models that do not fit
         raise and are recorded; the JSON is rewritten after each model.

Usage (on the GPU machine; optree carried as a wheel, see bench/README.md)::

    python bench/offload.py --swap-dir /tmp/fscale-swap
    python bench/offload.py --parts adam --adam-m 20          # quick, any machine

Writes ``bench/results/offload-<device>.json`` and ``$OUT/offload.json`` when ``$OUT``
is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)

import fscale as fs  # noqa: E402
from fscale.io import swap  # noqa: E402
from fscale.kernels import cpu_adam, host_adamw  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402
from fscale.optim.base import apply_gradients  # noqa: E402
from fscale.policies import WANTS_FINAL_GRADS  # noqa: E402

GiB = 2**30
ADAM_BYTES_PER_PARAM = 28  # fp32 p, g, m, v read; p, m, v written


# ----------------------------------------------------------------------------- adam


def bench_adam(m_params: int, repeats: int) -> dict:
    chunk = 4 * 2**20
    n = m_params * 10**6
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in sizes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in sizes]
    out = {"params": n, "threads": torch.get_num_threads(), "tensors": len(sizes)}
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    # The three run in turn, repeat after repeat (host timings drift with clocks and
    # other load; interleaving gives each the same conditions), medians kept.
    runners = {}
    for name, kwargs in (("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})):
        ps = [p.clone().requires_grad_() for p in params]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        runners[name] = torch.optim.AdamW(ps, **hyper, **kwargs).step

    tree_p = {f"p{i}": p.clone() for i, p in enumerate(params)}
    tree_g = {f"p{i}": g for i, g in enumerate(grads)}
    opt = fs.optim.adamw(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    state = [opt.init(tree_p)]

    def fscale_step():
        with cpu_adam.host_kernels():
            _, state[0] = apply_gradients(opt, tree_g, state[0], tree_p)

    runners["fscale"] = fscale_step
    if host_adamw.available():
        # The step an async save's kept buffers ask for ([Note: keeping the owner's
        # buffers]): the C loop writing p, m, v into second tensors, against a copy of
        # p, m, v and torch's in-place kernel (what it avoids).
        ps, ms, vs = ([p.clone() for p in params] for _ in range(3))
        second = [[torch.empty_like(p) for p in params] for _ in range(3)]
        hyper_c = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=5)

        def elsewhere():
            host_adamw.adamw_(ps, grads, ms, vs, out=second, **hyper_c)

        def copy_then_fused():
            for dst, src in zip(second, (ps, ms, vs), strict=True):
                torch._foreach_copy_(dst, src)
            torch._fused_adamw_(
                *second[:1], grads, *second[1:], [], [torch.tensor(5.0)] * len(ps),
                amsgrad=False, maximize=False, **{k: v for k, v in hyper_c.items() if k != "step"},
            )  # fmt: skip

        runners["fscale_elsewhere"] = elsewhere
        runners["copy_then_torch_fused"] = copy_then_fused
    times: dict = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[f"{name}_s"] = sorted(ts)[len(ts) // 2]
        out[f"{name}_all_s"] = ts
    for key in runners:
        s = out[f"{key}_s"]
        out[f"{key}_Mparams_per_s"] = n / s / 1e6
        out[f"{key}_GBps"] = n * ADAM_BYTES_PER_PARAM / s / 1e9
    out["fscale_vs_torch_fused"] = out["torch_fused_s"] / out["fscale_s"]
    out["fscale_vs_torch_foreach"] = out["torch_foreach_s"] / out["fscale_s"]
    if "fscale_elsewhere" in runners:
        out["elsewhere_vs_torch_fused"] = out["torch_fused_s"] / out["fscale_elsewhere_s"]
        out["elsewhere_vs_copy_then_fused"] = (
            out["copy_then_torch_fused_s"] / out["fscale_elsewhere_s"]
        )
    return out


# ----------------------------------------------------------------------------- swap


class _SkipDD(Exception):
    pass


def _dd(args: list[str]) -> float:
    """Bytes/s that dd reports (its last stderr line: '... bytes ... copied, T s, R')."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    line = proc.stderr.strip().splitlines()[-1]
    nbytes = int(line.split()[0])
    seconds = float(re.search(r"copied, ([0-9.e+-]+) s", line).group(1))
    return nbytes / seconds


def bench_swap(path: str, total_gib: float, file_mib: int = 256) -> dict:
    """dd, then the engine at its defaults and with more I/O threads / larger chunks."""
    out = bench_swap_once(path, total_gib, file_mib, dd=True)
    out["variants"] = []
    for threads, chunk_mib in ((8, 8), (8, 32), (16, 32)):
        v = bench_swap_once(
            path, total_gib, file_mib, dd=False, threads=threads, chunk_mib=chunk_mib
        )
        out["variants"].append({k: v[k] for k in ("io_threads", "chunk_mib", *_RATES) if k in v})
    return out


_RATES = ("fscale_write_GBps", "fscale_read_GBps")


def bench_swap_once(
    path: str, total_gib: float, file_mib: int, *, dd: bool, threads: int = 4, chunk_mib: int = 8
) -> dict:
    os.makedirs(path, exist_ok=True)
    nfiles = max(1, int(total_gib * 1024 // file_mib))
    nbytes = file_mib * 2**20
    out = {"path": path, "files": nfiles, "file_bytes": nbytes, "total_bytes": nfiles * nbytes}
    out.update(io_threads=threads, chunk_mib=chunk_mib)
    df = os.statvfs(path)
    out["free_bytes_before"] = df.f_bavail * df.f_frsize

    dd_file = os.path.join(path, "dd-probe.bin")
    count = nfiles * file_mib // 64
    try:
        if not dd:
            raise _SkipDD
        write_bps = _dd(
            ["if=/dev/zero", f"of={dd_file}", "bs=64M", f"count={count}", "oflag=direct"]
        )
        read_bps = _dd([f"if={dd_file}", "of=/dev/null", "bs=64M", "iflag=direct"])
        out.update(dd_write_GBps=write_bps / 1e9, dd_read_GBps=read_bps / 1e9)
    except _SkipDD:
        pass
    except (subprocess.CalledProcessError, OSError) as e:  # no O_DIRECT here: say so
        out["dd_error"] = repr(e)[:300]
    finally:
        if os.path.exists(dd_file):
            os.remove(dd_file)

    engine = swap.SwapEngine(path, rank=0, io_threads=threads, chunk_bytes=chunk_mib * 2**20)
    out["direct"] = engine.direct
    bufs = [engine.alloc(nbytes) for _ in range(3)]
    for i, b in enumerate(bufs):
        b.copy_(
            torch.randint(
                0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)
            )
        )
    first = bufs[0].clone()
    try:
        # Writes, then reads (which verify every chunk's CRC-32), each through the three
        # buffers in rotation: a buffer is reused once its last transfer is done.
        for kind, submit in (("write", engine.write), ("read", engine.read)):
            t0 = time.perf_counter()
            pending = []
            for i in range(nfiles):
                if len(pending) == len(bufs):
                    pending.pop(0).result()
                pending.append(submit(f"g{i:05d}", bufs[i % len(bufs)]))
            for f in pending:
                f.result()
            if kind == "write":
                engine.flush()
            out[f"fscale_{kind}_GBps"] = nfiles * nbytes / (time.perf_counter() - t0) / 1e9
        engine.read("g00000", bufs[0]).result()
        out["data_equal"] = bool(torch.equal(bufs[0], first))
    finally:
        engine.close()
    for kind in ("write", "read"):
        if f"dd_{kind}_GBps" in out:
            out[f"{kind}_vs_dd"] = out[f"fscale_{kind}_GBps"] / out[f"dd_{kind}_GBps"]
    return out


# ----------------------------------------------------------------------------- train


def build_step(
    model: GPT,
    accumulate: int,
    delayed: bool,
    what: str,
    overlap: bool = True,
    lr: float = 1e-4,
    nvme_path: str | None = None,
):
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=lr, weight_decay=0.1), accumulate=accumulate)
    step = fs.shard_zero(fs.mixed_precision(step, "bf16"), stage=3)
    what = ("optimizer", "params") if what == "params" else ("optimizer",)
    if nvme_path is not None:  # ZeRO-Infinity: optimizer state in swap files (no DPU there)
        os.makedirs(nvme_path, exist_ok=True)
        return fs.offload(step, "nvme", what=what, path=nvme_path, overlap=overlap), params
    step = fs.offload(step, "cpu", what=what, delayed_update=delayed, overlap=overlap)
    return step, params


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_one(layers: int, what: str, args, device) -> dict:
    if args.smoke:
        cfg = GPTConfig.tiny(n_layer=layers, bias=False, seq_len=args.seq)
    else:
        cfg = GPTConfig.gpt_8b5(n_layer=layers, bias=False)
    out: dict = {"n_layer": layers, "d_model": cfg.d_model, "seq": args.seq, "offload": what}
    out["host_threads"] = torch.get_num_threads()
    t0 = time.time()
    torch.manual_seed(0)
    with device:
        model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    out["params"] = n_params
    flops_per_token = model.flops_per_token(args.seq)  # before the weights are released
    out["host_bytes_expected"] = n_params * 12  # fp32 master + 2 moments (+ grad staging)
    nvme = args.swap_dir if args.tier == "nvme" else None
    out["tier"] = args.tier
    step, params = build_step(
        model, args.accumulate, args.delayed, what, args.overlap, nvme_path=nvme
    )
    out["streams_grads_in_backward"] = step.has(WANTS_FINAL_GRADS)
    params, state = step.init(params)
    for p in model.parameters():  # the module's fp32 weights: the shards own them now
        p.data = torch.empty(0, device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["init_s"] = time.time() - t0
    out["host_memory_after_init"] = _host_memory()
    print(f"  layers={layers} after init: {out['host_memory_after_init']}", flush=True)
    out["host_bytes"] = state["offload"].host_bytes
    source = state.get("shard_zero", {}).get("source")  # offload's param source, if any
    param_buffer = getattr(source, "buffer", None)
    if param_buffer is not None:
        out["host_bytes"] += param_buffer.numel() * param_buffer.element_size()
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(
        0,
        cfg.vocab_size,
        (args.accumulate * args.micro, args.seq + 1),
        device=device,
        generator=gen,
    )
    batch = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t = time.perf_counter()
        params, state, metrics = step(params, state, batch)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
        print(f"  layers={layers} step {i}: {times[-1]:.2f} s loss {losses[-1]:.4f}", flush=True)
    timed = times[args.warmup :]
    step_s = sorted(timed)[len(timed) // 2]
    tokens_per_step = args.accumulate * args.micro * args.seq
    flops = flops_per_token * tokens_per_step
    out.update(
        step_s=step_s,
        step_times_s=times,
        losses=losses,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step_s,
        tflops=flops / step_s / 1e12,
        mfu=flops / step_s / (args.peak_tflops * 1e12),
        device_peak_gib=torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None,
    )
    state["offload"].close()  # waits for a delayed update still running: its events too
    out["events"] = _event_summary(state["offload"])
    return out


def _host_memory() -> dict:
    """This process's resident bytes, and the container's use and limit (cgroup v2)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssShmem", "RssAnon")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    for name in ("memory.current", "memory.max"):
        try:
            with open(f"/sys/fs/cgroup/{name}") as f:
                out[name] = f.read().strip()
        except OSError:
            pass
    return out


def _event_summary(handle) -> dict:
    """Seconds between the first and last update event of the last step (host optimizer)."""
    ev = handle.events
    starts = [t for _, t, kind, _ in ev if kind == "update_start"]
    ends = [t for _, t, kind, _ in ev if kind == "update_end"]
    if not starts or not ends:
        return {}
    return {"host_update_s": max(ends) - min(starts), "groups": len(starts)}


def train_in_child(layers: int, what: str) -> dict:
    """Run ``train_one`` in a fresh process: a model too large for host memory gets that
    process killed (the kernel's OOM killer), not this one, and pinned memory cached by
    torch's host allocator for one model is returned to the OS before the next."""
    with tempfile.TemporaryDirectory() as tmp:
        row_out = Path(tmp, "row.json")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_child", str(layers)]
        cmd += ["--_row-out", str(row_out), "--_what", what]
        proc = subprocess.run(cmd)
        if row_out.exists():
            return json.loads(row_out.read_text())
        return {
            "n_layer": layers,
            "offload": what,
            "error": f"the process exited with {proc.returncode} (-9: "
            "killed, e.g. host memory exhausted) before it wrote its result",
        }


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="adam,swap,train")
    parser.add_argument("--adam-m", type=int, default=200, help="million params for part adam")
    parser.add_argument("--adam-repeats", type=int, default=11)
    parser.add_argument("--swap-dir", default="/tmp/fscale-swap-bench")
    parser.add_argument("--swap-gib", type=float, default=8.0)
    parser.add_argument("--layers", default="24,30", help="GPT depths (width 4096) to train")
    parser.add_argument(
        "--params-layers", default="12", help="depths to train with what=('optimizer', 'params')"
    )
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=16)
    parser.add_argument("--delayed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tier", choices=("cpu", "nvme"), default="cpu", help="part train")
    parser.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=True,
        help="offload(overlap=...): off also turns off streaming grads in backward",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU is fine")
    parser.add_argument(
        "--host-threads", type=int, default=None, help="torch.set_num_threads for part train"
    )
    parser.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_row-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_what", default="optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.adam_m, args.swap_gib, args.layers, args.seq, args.accumulate = 8, 0.25, "2", 32, 2
        args.params_layers = "2"
    if args._child is not None:  # one model in this process (see train_in_child)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.host_threads:
            torch.set_num_threads(args.host_threads)
        try:
            row = train_one(args._child, args._what, args, device)
        except Exception as e:  # device OOM, a pinned allocation refused: record it
            row = {"n_layer": args._child, "offload": args._what}
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        Path(args._row_out).write_text(json.dumps(row))
        return
    parts = args.parts.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"bench": "offload", **provenance(device), "host_cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            result["host_mem_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    def write():
        text = json.dumps(result, indent=1)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "offload.json").write_text(text)
        if not args.smoke:
            (REPO / "bench" / "results" / f"offload-{slug}.json").write_text(text)

    if "adam" in parts:
        result["adam"] = bench_adam(args.adam_m, args.adam_repeats)
        print("adam:", result["adam"], flush=True)
        write()
    if "swap" in parts:
        try:
            result["swap"] = bench_swap(args.swap_dir, args.swap_gib)
        except Exception as e:
            result["swap"] = {"error": f"{type(e).__name__}: {e}"}
        print("swap:", result["swap"], flush=True)
        write()
    if "train" in parts:
        if device.type != "cuda" and not args.smoke:
            sys.exit("part train needs a CUDA device (or --smoke).")
        result["train"] = []
        stack = "train_step(loss, adamw, accumulate)"
        result["train_config"] = dict(
            stack=f'offload(shard_zero(mixed_precision({stack}, "bf16"), 3), "{args.tier}")',
            seq=args.seq, micro=args.micro, accumulate=args.accumulate, delayed_update=args.delayed,
            overlap=args.overlap,
            peak_tflops=args.peak_tflops,
        )  # fmt: skip
        runs = [(int(x), "optimizer") for x in args.layers.split(",") if x]
        runs += [(int(x), "params") for x in args.params_layers.split(",") if x]
        for layers, what in runs:
            row = train_in_child(layers, what)
            result["train"].append(row)
            write()
    print(f"\n{name}")
    if "adam" in result:
        a = result["adam"]
        print(
            f"CPU AdamW, {a['params'] / 1e6:.0f}M params, {a['threads']} threads: "
            f"fscale {a['fscale_Mparams_per_s']:.0f} M/s | torch fused "
            f"{a['torch_fused_Mparams_per_s']:.0f} | foreach {a['torch_foreach_Mparams_per_s']:.0f}"
            f" -> {a['fscale_vs_torch_fused']:.2f}x fused"
        )
    if "swap" in result and "fscale_write_GBps" in result["swap"]:
        s = result["swap"]
        print(
            f"swap ({s['total_bytes'] / GiB:.0f} GiB, direct={s['direct']}): write "
            f"{s['fscale_write_GBps']:.2f} GB/s vs dd {s.get('dd_write_GBps', float('nan')):.2f}"
            f" | read {s['fscale_read_GBps']:.2f} vs dd {s.get('dd_read_GBps', float('nan')):.2f}"
        )
    for r in result.get("train", []):
        if "error" in r:
            print(f"train n_layer={r['n_layer']} ({r['offload']}): {r['error'][:160]}")
        else:
            print(
                f"train {r['params'] / 1e9:.2f}B ({r['n_layer']}x{r['d_model']}, {r['offload']}): "
                f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, "
                f"step {r['step_s']:.2f} s, device peak {r['device_peak_gib'] or 0:.1f} GiB, "
                f"host {r['host_bytes'] / GiB:.0f} GiB"
            )


if __name__ == "__main__":
    main()
