"""fscale's ZeRO stages against FSDP2 and DDP: one GPT, one torchrun, one process group.

Variants, run one after the other (all memory freed in between), each on the same
model, the same initial weights (one seed, built on the device) and the same data:

- ``fscale-z3``, ``fscale-z2``, ``fscale-z1``:
  ``fs.shard_zero(fs.mixed_precision(fs.train_step(loss, fs.optim.adamw(...)), "bf16"), stage=S)``;
- ``fsdp2``: ``fully_shard`` per block then the root, bf16 params / fp32 reduce,
  ``torch.optim.AdamW(fused=True)`` (``fsdp2-noreshard``: ``reshard_after_forward=False``,
  the ZeRO-2-like setting, on request only);
- ``ddp``: ``DistributedDataParallel`` + ``torch.autocast(bf16)`` + fused AdamW; skipped
  when its 16 bytes per param do not fit the device (the 8.5B model).

Per variant: step ms (wall clock around the timed loop, max over ranks; per-step CUDA
events too), tokens/s per GPU, MFU (``GPT.flops_per_token`` x tokens/s over
``--peak-tflops``), peak GiB (``torch.cuda.max_memory_allocated``, max over ranks), the
loss per step (mean over ranks). Each rank trains on one fixed random batch, the same
every step, so the loss must fall (memorisation) and all variants should print nearly
the same losses: a check that every variant applies the same update.

Usage::

    torchrun --nproc-per-node 2 bench/zero_vs_fsdp2.py --model 1b4
    torchrun --nproc-per-node 2 bench/zero_vs_fsdp2.py --model 8b5 --stages 3
    python -m torch.distributed.run --nproc-per-node 2 bench/zero_vs_fsdp2.py \\
        --model tiny --device cpu --steps 2 --warmup 1 --out /tmp/smoke   # CPU smoke test

Writes ``$OUT/zero_vs_fsdp2-<model>.json`` when ``$OUT`` is set, else
``bench/results/zero_vs_fsdp2-<model>-<device>.json`` (``--out`` overrides: a ``.json``
file or a folder). The JSON is rewritten after every variant, so a run that dies part
way keeps what it measured. The table is printed last, on rank 0.

[Note: failures and hangs]
A variant that raises (CUDA OOM, an fscale error) is caught on its rank, its memory
freed, and every rank then all-reduces an error flag: all ranks take the same path to
the next variant. That only works when the ranks fail together, which OOM does here
(same shapes, same allocation sequence on every rank). A failure on one rank alone,
in the middle of a step, leaves the others inside a collective it will never join;
the process group's ``--timeout`` then aborts the run (the NCCL watchdog), and the JSON
written so far remains. Keep rank-specific code out of the variants for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `import fscale` from this checkout, installed or not

OPTREE_MISSING = """\
zero_vs_fsdp2.py: the Python package `optree` (an fscale dependency) is not installed.
Carry it as a wheel (see /work/.library/device/README.md, "a Python package missing"):
  here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
            --implementation cp --platform manylinux_2_28_x86_64 \\
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl optree
  there:  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
            --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
and name `.whl` in the run's carry list."""

try:
    import optree  # noqa: F401  (fscale.tree needs it; fail here with the fix, not deep inside)
except ModuleNotFoundError:
    sys.exit(OPTREE_MISSING)

from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)

import fscale as fs  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402

MODELS = {"tiny": GPTConfig.tiny, "1b4": GPTConfig.gpt_1b4, "8b5": GPTConfig.gpt_8b5}
DEFAULT_BATCH = {"tiny": 4, "1b4": 8, "8b5": 2}
GiB = 2**30


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Env:
    device: torch.device
    rank: int
    world: int
    local_rank: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def init_distributed(args) -> Env:
    if "RANK" not in os.environ:  # plain `python bench/zero_vs_fsdp2.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("zero_vs_fsdp2.py: --device cuda but no CUDA device; use --device cpu.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Env(device, dist.get_rank(), dist.get_world_size(), local_rank)


def resolve_mixed_precision():
    """``fs.mixed_precision`` wherever it is exported, or (None, why not)."""
    getters = (
        lambda: fs.mixed_precision,
        lambda: importlib.import_module("fscale.transforms").mixed_precision,
        lambda: importlib.import_module("fscale.transforms.precision").mixed_precision,
    )
    why = None
    for get in getters:
        try:
            return get(), None
        except Exception as e:  # a half-written module may raise anything on import
            why = f"{type(e).__name__}: {e}"
    return None, why


def import_fully_shard():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


# ----------------------------------------------------------------------------- model and data


def build_model(cfg: GPTConfig, env: Env, seed: int) -> GPT:
    """The GPT built directly on the device, the same weights on every rank and variant.

    One seed gives every variant the same init. Across ranks it would too on identical
    GPUs, but the launch shape of CUDA's RNG kernels depends on the device, so rank 0's
    weights are broadcast (DDP does the same; fscale and FSDP2 assume equal weights).
    """
    torch.manual_seed(seed)
    with env.device:
        model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, src=0)
    return model


def make_batch(cfg: GPTConfig, env: Env, batch: int, seq: int, seed: int) -> dict:
    """One fixed random batch per rank (different per rank, the same for every variant)."""
    gen = torch.Generator(device=env.device).manual_seed(seed * 1000 + 17 + env.rank)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=env.device, generator=gen)
    return {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 softmax for every variant: what autocast does for DDP, done explicitly for
    # the others, whose logits come out in bf16.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------- variants


class FscaleRun:
    """``shard_zero(mixed_precision(train_step(...)), stage)`` on the GPT."""

    def __init__(self, args, cfg, env, stage: int, precision: str, mixed_precision):
        self.info: dict = {"stage": stage, "precision": precision}
        model = build_model(cfg, env, args.seed)
        params, apply = fs.functional(model)

        def loss_fn(p, batch):
            return cross_entropy(apply(p, batch["x"]), batch["y"])

        step = fs.train_step(loss_fn, fs.optim.adamw(lr=args.lr, weight_decay=args.weight_decay))
        if precision == "mixed_precision":
            step = mixed_precision(step, "bf16", reduce_dtype=torch.float32)
        step = fs.shard_zero(step, stage=stage)
        try:
            plan = fs.plan(step, params)
            self.info["plan_memory_gib"] = {k: v / GiB for k, v in plan.memory.items()}
            self.info["plan_memory_total_gib"] = sum(plan.memory.values()) / GiB
            self.info["kernels"] = dict(plan.kernels)
        except Exception as e:  # the estimate is a nicety; never let it sink the variant
            self.info["plan_error"] = f"{type(e).__name__}: {e}"
        before = {n: p.data_ptr() for n, p in params.items()}
        params, state = step.init(params)
        # Stage 3 returns shards; stages 1/2 under mixed precision return bf16 compute
        # copies (the fp32 master is sharded): either way the module's own fp32
        # weights are dead weight now.
        if any(p.data_ptr() != before[n] for n, p in params.items()):
            release_module_weights(model)
            self.info["module_numel_after_release"] = sum(p.numel() for p in model.parameters())
        self.info["transforms"] = [str(t) for t in step.transforms]
        self.model, self.step, self.params, self.state = model, step, params, state
        self.autocast = precision == "autocast"
        self.device_type = env.device.type
        self.batch = make_batch(cfg, env, args.batch, args.seq, args.seed)
        self.metrics: dict = {}

    def __call__(self) -> torch.Tensor:
        ctx = (
            torch.autocast(self.device_type, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            self.params, self.state, self.metrics = self.step(self.params, self.state, self.batch)
        return self.metrics["loss"]

    def final_info(self) -> dict:
        comm_bytes = self.metrics.get("comm_bytes") or {}
        out = {"comm_bytes_per_step": {k: int(v) for k, v in comm_bytes.items()}}
        peak = self.metrics.get("zero3_peak_unsharded_bytes")
        if peak is not None:
            out["zero3_peak_unsharded_gib"] = int(peak) / GiB
        return out


@torch.no_grad()
def release_module_weights(model: torch.nn.Module) -> None:
    """[Note: stage-3 module storage]

    ``fs.functional`` returns tensors that alias the module's Parameters (no copy), and
    ``apply`` uses the module only as a structure: ``torch.func.functional_call`` swaps
    every trainable param for the tensor in the dict it is given (ZeRO-3's full-shaped
    ``LazyParam`` stand-ins), so after ``step.init`` has copied this rank's rows into
    its shards the module's full fp32 weights are never read again. Pointing each
    Parameter at an empty tensor frees them (34 GB at 8.5B) while the Parameter
    objects, their names and the head/tok_emb tie survive for ``functional_call``.
    Building on ``meta`` and materialising only shards would avoid the transient full
    copy too, but then the init would not be the same as the other variants' (one
    seed, the GPT's own init on the device) and the losses could not be compared;
    FSDP2 here also starts from the full model on the device and shards it in place.
    GPT has no buffers; a model with buffers would keep them (apply reads them).
    """
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class TorchRun:
    """FSDP2 or DDP with ``torch.optim.AdamW(fused=True)``: the peers."""

    def __init__(self, args, cfg, env, kind: str):
        self.info: dict = {}
        model = build_model(cfg, env, args.seed)
        self.autocast = None
        if kind.startswith("fsdp2"):
            fully_shard, MixedPrecisionPolicy = import_fully_shard()
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            reshard = kind != "fsdp2-noreshard"
            for block in model.blocks:
                fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
            self.info.update(reshard_after_forward=reshard, mp_policy="bf16 params, fp32 reduce")
            self.module = model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(
                model,
                device_ids=[env.local_rank] if env.cuda else None,
                gradient_as_bucket_view=True,
            )
            self.autocast = env.device.type
            self.info.update(autocast="bf16", gradient_as_bucket_view=True)
        self.opt = torch.optim.AdamW(
            model.parameters(),
            lr=args.lr,
            weight_decay=args.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=True,
        )
        self.info["optimizer"] = "torch.optim.AdamW(fused=True)"
        self.batch = make_batch(cfg, env, args.batch, args.seq, args.seed)

    def __call__(self) -> torch.Tensor:
        ctx = (
            torch.autocast(self.autocast, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            logits = self.module(self.batch["x"])
        loss = cross_entropy(logits, self.batch["y"])
        del logits
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def final_info(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- measuring


def measure(name: str, make, args, env: Env, trace_dir: Path | None):
    """Build, warm up, time and (optionally) profile one variant; this rank's numbers."""
    local: dict = {}
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    run = make()
    env.sync()
    local["build_init_s"] = time.perf_counter() - t_build
    local["info"] = run.info
    if env.cuda:
        local["init_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        local["resting_gib"] = torch.cuda.memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()
    if injected_failure(args.fail, name, env.rank):
        raise RuntimeError(f"--fail {name}: injected failure (testing the error path)")

    losses = []
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(run())
    env.sync()
    local["warmup_s"] = time.perf_counter() - t_warm
    dist.barrier()
    env.sync()

    if env.cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    step_walls = []
    t0 = time.perf_counter()
    if env.cuda:
        events[0].record()
    for i in range(args.steps):
        t_step = time.perf_counter()
        losses.append(run())
        if env.cuda:
            events[i + 1].record()
        step_walls.append(time.perf_counter() - t_step)
    env.sync()
    wall = time.perf_counter() - t0
    if env.cuda:
        step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(args.steps)]
        local["events_total_ms"] = events[0].elapsed_time(events[-1])
        local["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        local["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    else:
        step_ms = [1e3 * s for s in step_walls]  # CPU steps are synchronous
    local["wall_s"] = wall
    local["step_ms_list"] = step_ms
    local["losses"] = torch.stack([loss.float().reshape(()) for loss in losses]).cpu()
    local["final_info"] = run.final_info()

    if trace_dir is not None and args.profile_steps > 0:
        local["trace"] = profile_steps(name, run, args, env, trace_dir)
    del run
    return local


def injected_failure(spec: str | None, name: str, rank: int) -> bool:
    """``--fail a,b@1``: variant ``a`` fails on every rank, ``b`` on rank 1 only."""
    for item in (spec or "").split(","):
        variant, _, at = item.partition("@")
        if variant == name and (not at or int(at) == rank):
            return True
    return False


def profile_steps(name: str, run, args, env: Env, trace_dir: Path) -> str | None:
    """A few more steps under torch.profiler; rank 0 writes a gzipped chrome trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            with torch.profiler.record_function(f"{name} step"):
                run()
        env.sync()
    if env.rank != 0:
        return None
    path = trace_dir / f"trace-{args.model}-{name}.json.gz"
    try:  # rank 0 only, after the variant's last collective: may fail without desync
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        return str(path)
    except Exception as e:
        return f"export failed: {type(e).__name__}: {e}"


def summarize(name: str, err: str | None, local: dict, args, env: Env, flops_per_token: int):
    """All ranks: agree on failure, then reduce the numbers. Same collectives on every rank."""
    flag = torch.tensor([0.0 if err is None else 1.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        errors = [None] * env.world
        dist.all_gather_object(errors, err)
        msgs = sorted({e for e in errors if e})
        failed = [r for r, e in enumerate(errors) if e]
        return {"variant": name, "ok": False, "error": " | ".join(msgs), "failed_ranks": failed}

    vals = torch.tensor(
        [local["wall_s"], local.get("peak_gib", 0.0), local.get("init_peak_gib", 0.0),
         local.get("resting_gib", 0.0), local.get("peak_reserved_gib", 0.0),
         local.get("events_total_ms", 0.0)],
        dtype=torch.float64, device=env.device,
    )  # fmt: skip
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    wall, peak, init_peak, resting, reserved, events_ms = vals.tolist()
    losses = local["losses"].to(env.device)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM)
    losses = (losses / env.world).tolist()

    tokens = args.batch * args.seq
    step_s = wall / args.steps
    tok_s = tokens / step_s
    res = {
        "variant": name,
        "ok": True,
        "step_ms": 1e3 * step_s,
        "step_ms_median_rank0": statistics.median(local["step_ms_list"]),
        "step_ms_min_rank0": min(local["step_ms_list"]),
        "step_ms_max_rank0": max(local["step_ms_list"]),
        "tokens_per_s_per_gpu": tok_s,
        "tokens_per_s_total": tok_s * env.world,
        "tflops_per_gpu": flops_per_token * tok_s / 1e12,
        "mfu": flops_per_token * tok_s / (args.peak_tflops * 1e12),
        "loss_first": losses[0],
        "loss_final": losses[-1],
        "losses": losses,
        "build_init_s_rank0": local["build_init_s"],
        "warmup_s_rank0": local["warmup_s"],
        **local["info"],
        **local["final_info"],
    }
    if env.cuda:
        res.update(
            peak_gib=peak,
            init_peak_gib=init_peak,
            resting_gib=resting,
            peak_reserved_gib=reserved,
            events_step_ms=events_ms / args.steps,
        )
    if local.get("trace"):
        res["trace"] = local["trace"]
    return res


def free_memory(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(name, make, args, env, flops_per_token, trace_dir) -> dict:
    err = None
    local: dict = {}
    try:
        local = measure(name, make, args, env, trace_dir)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"[:1500]
        print(f"[rank {env.rank}] {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    # Outside the except block: the traceback (and the tensors its frames hold) is gone.
    free_memory(env)
    res = summarize(name, err, local, args, env, flops_per_token)
    free_memory(env)
    return res


# ----------------------------------------------------------------------------- report


def device_name(env: Env) -> str:
    if env.cuda:
        return torch.cuda.get_device_name(env.device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def output_path(args, dev_name: str) -> Path:
    if args.out:
        out = Path(args.out)
        return out if out.suffix == ".json" else out / f"zero_vs_fsdp2-{args.model}.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"], f"zero_vs_fsdp2-{args.model}.json")
    return REPO / "bench" / "results" / f"zero_vs_fsdp2-{args.model}-{device_slug(dev_name)}.json"


def command_line() -> str:
    """How this run was launched, as one would type it again."""
    script = " ".join(sys.argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: argv has lost the launcher
        return f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} {script}"
    return f"{Path(sys.executable).name} {script}"


def ratios(results: list[dict]) -> dict:
    ok = {r["variant"]: r for r in results if r.get("ok")}
    out = {}
    for name, r in ok.items():
        if not name.startswith("fscale"):
            continue
        for peer in ("fsdp2", "fsdp2-noreshard", "ddp"):
            if peer in ok:
                p = ok[peer]
                entry = {"throughput": r["tokens_per_s_per_gpu"] / p["tokens_per_s_per_gpu"]}
                if "peak_gib" in r and p.get("peak_gib"):
                    entry["peak_memory"] = r["peak_gib"] / p["peak_gib"]
                out[f"{name}/{peer}"] = entry
    return out


def table(result: dict) -> str:
    rows = result["variants"]
    ok = {r["variant"]: r for r in rows if r.get("ok")}
    lines = [
        f"{result['device']} x{result['world_size']}  model {result['model']} "
        f"({result['params'] / 1e9:.2f}B params)  batch {result['batch']}x{result['seq']}/GPU  "
        f"steps {result['steps']} (+{result['warmup']} warm-up)  fscale precision: "
        f"{result['fscale_precision']}",
        f"{'variant':16} {'step ms':>9} {'tok/s/GPU':>10} {'MFU%':>6} {'peak GiB':>9} "
        f"{'loss first->final':>18} {'vs FSDP2':>9} {'vs DDP':>7}",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['variant']:16} FAILED/SKIPPED: {r.get('error', '')[:150]}")
            continue
        peak = f"{r['peak_gib']:9.2f}" if "peak_gib" in r else f"{'-':>9}"
        vs = []
        for peer in ("fsdp2", "ddp"):
            if r["variant"].startswith("fscale") and peer in ok:
                vs.append(f"{r['tokens_per_s_per_gpu'] / ok[peer]['tokens_per_s_per_gpu']:.2f}x")
            else:
                vs.append("-")
        lines.append(
            f"{r['variant']:16} {r['step_ms']:9.1f} {r['tokens_per_s_per_gpu']:10.0f} "
            f"{100 * r['mfu']:6.1f} {peak} {r['loss_first']:8.4f}->{r['loss_final']:<8.4f} "
            f"{vs[0]:>9} {vs[1]:>7}"
        )
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument(
        "--variants",
        default="fscale,fsdp2,ddp",
        help="comma list of fscale, fsdp2, fsdp2-noreshard, ddp (run in this order)",
    )
    p.add_argument("--stages", default="3,2,1", help="fscale ZeRO stages, in run order")
    p.add_argument("--batch", type=int, default=None, help="per GPU (1b4: 8, 8b5: 2, tiny: 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense bf16 peak for MFU (H100/H200 SXM: 989)",
    )
    p.add_argument(
        "--fscale-precision",
        choices=("mixed_precision", "autocast", "fp32"),
        default="mixed_precision",
        help="mixed_precision: fs.mixed_precision(step, 'bf16') (falls back to fp32, "
        "loudly, if it cannot be imported); autocast: torch.autocast(bf16) around "
        "the fscale step; fp32: neither",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="fscale",
        default=None,
        help="profile a few extra steps of these variants (default: the fscale "
        "ones) and write gzipped chrome traces next to the JSON / to $OUT",
    )
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="process-group timeout (s): aborts a hung collective",
    )
    p.add_argument(
        "--out", default=None, help="JSON file or folder (default: $OUT or bench/results/)"
    )
    p.add_argument("--force-ddp", action="store_true", help="run DDP even if it cannot fit")
    p.add_argument("--fail", default=None, help=argparse.SUPPRESS)  # inject errors (tests)
    args = p.parse_args(argv)  # fmt: skip
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.model]
    if min(args.steps, args.batch) < 1 or args.warmup < 0:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def plan_variants(args, env: Env, params: int) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(name, spec) in run order, and results for variants skipped up front."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {"fscale", "fsdp2", "fsdp2-noreshard", "ddp"}
    unknown = sorted(set(wanted) - known)
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {sorted(known)}.")
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    if any(s not in (1, 2, 3) for s in stages):
        sys.exit(f"--stages: {args.stages!r}; give ZeRO stages among 1, 2, 3 (e.g. 3,2,1).")
    todo, skipped = [], []
    for v in wanted:
        if v == "fscale":
            todo += [(f"fscale-z{s}", {"kind": "fscale", "stage": s}) for s in stages]
        elif v == "ddp" and env.cuda and not args.force_ddp:
            # fp32 params + grads + two Adam moments: 16 bytes a param before activations.
            need = 16 * params
            total = torch.cuda.get_device_properties(env.device).total_memory
            if need > 0.9 * total:
                skipped.append({
                    "variant": "ddp", "ok": False, "skipped": True,
                    "error": f"skipped: DDP needs {need / GiB:.0f} GiB for params, grads and "
                    f"AdamW state alone (16 B/param), the device has {total / GiB:.0f} GiB "
                    "(--force-ddp runs it anyway)",
                })  # fmt: skip
                continue
            todo.append((v, {"kind": v}))
        else:
            todo.append((v, {"kind": v}))
    return todo, skipped


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = MODELS[args.model]()
    if args.seq is None:
        args.seq = cfg.seq_len
    elif args.seq != cfg.seq_len:
        cfg = cfg.replace(seq_len=args.seq)
    env = init_distributed(args)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    with torch.device("meta"):
        meta = GPT(cfg)  # counts and FLOPs without memory
    n_params = meta.num_params()
    flops_per_token = meta.flops_per_token(args.seq)
    del meta

    notes = [
        "compiled: no (eager everywhere)",
        "data: one fixed random batch per rank, reused every step: the loss falls by "
        "memorisation, and all variants should show nearly the same losses",
        "same initial weights in every variant (one seed, built on the device)",
        "loss: cross entropy on fp32 logits everywhere",
        "tf32 matmuls on; NCCL defaults (NCCL_NVLS_ENABLE="
        f"{os.environ.get('NCCL_NVLS_ENABLE', 'unset')})",
        "DDP: gradient_as_bucket_view=True, autocast bf16",
        "fscale optimizer: fs.optim.adamw (fused 'adamw_update' kernel from the dispatch table); "
        "peers: torch.optim.AdamW(fused=True); both lr "
        f"{args.lr}, betas (0.9, 0.999), eps 1e-8, weight decay {args.weight_decay} on all params",
        "step ms: wall clock around the timed loop / steps, max over ranks; MFU: "
        f"flops_per_token ({flops_per_token / 1e9:.2f} GFLOP, PaLM 6N + 12LdT) x tokens/s "
        f"per GPU / {args.peak_tflops} TFLOP/s",
    ]
    precision = args.fscale_precision
    mixed_precision = None
    if precision == "mixed_precision":
        mixed_precision, why = resolve_mixed_precision()
        if mixed_precision is None:
            precision = "fp32"
            warning = (
                "WARNING: fs.mixed_precision could not be imported "
                f"({why}); the fscale variants ran in FP32 while FSDP2/DDP ran in bf16, so "
                "fscale's numbers are NOT comparable (rerun with --fscale-precision autocast "
                "for a bf16 fscale step)"
            )
            notes.insert(0, warning)
            if env.rank == 0:
                print("!" * 100 + f"\n{warning}\n" + "!" * 100, flush=True)
    elif precision == "fp32":
        notes.insert(0, "WARNING: --fscale-precision fp32: fscale ran in FP32, the peers in bf16")
    else:
        notes.insert(
            0,
            "fscale precision: torch.autocast(bf16) around the step (not "
            "fs.mixed_precision): fp32 params are gathered/reduced at full width",
        )

    todo, skipped = plan_variants(args, env, n_params)
    if skipped:
        notes.append("DDP skipped: " + skipped[0]["error"])
    profile = set()
    if args.profile:
        for v in args.profile.split(","):
            profile |= {n for n, _ in todo if n == v or n.startswith(v + "-z")}

    dev_name = device_name(env)
    out_path = output_path(args, dev_name)
    trace_dir = (
        Path(os.environ["OUT"]) if os.environ.get("OUT") and not args.out else out_path.parent
    )
    result = {
        "bench": "zero_vs_fsdp2",
        **provenance(env.device, command=command_line()),
        "world_size": env.world,
        "backend": dist.get_backend(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if env.cuda else None,
        "fscale": getattr(fs, "__version__", None),
        "model": args.model,
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "flops_per_token": flops_per_token,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step_per_gpu": args.batch * args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "peak_tflops": args.peak_tflops,
        "fscale_precision": precision,
        "compiled": False,
        "notes": notes,
        "variants": [],
        "ratios": {},
        "complete": False,
    }

    def write() -> None:
        if env.rank != 0:
            return
        result["variants"] = done + skipped
        result["ratios"] = ratios(done)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    if env.rank == 0:
        print(f"zero_vs_fsdp2: {dev_name} x{env.world}, model {args.model} "
              f"({n_params / 1e9:.2f}B), variants {[n for n, _ in todo]} -> {out_path}",
              flush=True)  # fmt: skip
    done: list[dict] = []
    write()  # a record exists even if the first variant takes the run down
    t_all = time.time()
    for name, spec in todo:
        if spec["kind"] == "fscale":
            make = lambda s=spec["stage"]: FscaleRun(  # noqa: E731
                args, cfg, env, s, precision, mixed_precision
            )
        else:
            make = lambda k=spec["kind"]: TorchRun(args, cfg, env, k)  # noqa: E731
        try:
            res = run_variant(
                name, make, args, env, flops_per_token, trace_dir if name in profile else None
            )
        except BaseException as e:
            # The group itself broke (a rank failed alone and the collective timed out, see
            # [Note: failures and hangs]): nothing more can run. Keep what was measured.
            result["aborted"] = f"during {name}: {type(e).__name__}: {e}"[:1500]
            done.append({"variant": name, "ok": False, "error": result["aborted"]})
            write()
            raise
        done.append(res)
        write()
        if env.rank == 0:
            if res["ok"]:
                peak = f", peak {res['peak_gib']:.2f} GiB" if "peak_gib" in res else ""
                print(f"  {name}: {res['step_ms']:.1f} ms/step, "
                      f"{res['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU "
                      f"{100 * res['mfu']:.1f}%{peak}, loss {res['loss_first']:.4f} -> "
                      f"{res['loss_final']:.4f}", flush=True)  # fmt: skip
            else:
                print(f"  {name}: FAILED: {res['error']}", flush=True)
    result["wall_s"] = time.time() - t_all
    result["complete"] = True
    write()
    if env.rank == 0:
        print(f"\nwrote {out_path}\n")
        print(table(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
