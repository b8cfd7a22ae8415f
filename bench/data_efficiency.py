"""Data efficiency: seqlen curriculum + random-LTD against a plain bf16 run, same tokens.

A GPT (``--model 125m``: GPT-2 small's shape, 12 x 768, 12 heads, seq 1024, on
bytes: vocab 256, so ~86M params, GPT-2 small's non-embedding count) trains on the
Python standard library's ``.py`` sources (test suites included: 31 MB on 3.11; the
last 10% in sorted path order is the validation split). The runs go one after the
other in one process, each from the same init and the same stream of windows:

- ``baseline``: ``fs.mixed_precision(fs.train_step(loss, adamw(warmup_cosine)), "bf16")``;
- ``cl+ltd``: ``fs.curriculum`` (``seqlen_warmup`` from ``--cl-start`` to the full
  length over the first ``--cl-frac`` of the baseline's steps; ``--cl-mode truncate``
  cuts each row to its first ``L`` tokens, ``--cl-mode reshape`` splits it into
  ``T // L`` windows of ``L``, with lengths rounded down to divisors of ``T``, so a step
  feeds ``batch x T`` tokens at every length) and ``fs.random_ltd``
  (all units but the first and last; keep rising linearly from ``--ltd-keep`` to the
  full length over ``--ltd-frac`` of the run: by default, ``--ltd-of fed``, as a share
  ``keep / seq`` of the length the curriculum feeds, so the middle layers drop tokens
  during the curriculum too; ``--ltd-of seq`` counts tokens of the full length, which
  drops nothing while the fed length is at most the keep), LR from ``fs.layer_token_lr``;
- ``cl``, ``ltd``: each alone (``--runs``; the default for ``tiny`` runs all four).

Tokens: a step consumes ``rows x L`` tokens, ``L`` the length the model is fed
(the curriculum's ``seqlen``, else ``--seq``) and ``rows`` the sequences fed
(``batch``; ``batch x (T // L)`` in reshape mode), checked against the step's
``metrics["tokens"]``; the tail the curriculum cuts off is not consumed (DeepSpeed
counts the tokens of the batches fed the same way). Tokens
random-LTD skips in the middle layers are consumed: they are read, pass the first
and last layers and are in the loss. Every run stops once it has consumed
``--budget-tokens`` (rounded down to whole baseline steps; a curriculum run's last
step may pass it by less than one step).

Each run records (train seconds, tokens, val loss) at every ``--eval-every`` tokens:
full-length windows, a fixed set of ``--val-batches`` batches, the clock stopped
(synchronised) around it. Reported: the baseline's final val loss, and per run the
train seconds at which its val loss first reaches it (linear between evaluations),
their ratio to the baseline's train seconds (the goal: <= 0.75), and the tokens then.

Usage::

    python bench/data_efficiency.py --model 125m --out $OUT/data_efficiency-125m.json \
        --png $OUT/data_efficiency-125m.png
    python bench/data_efficiency.py --model 125m --cl-mode reshape \
        --out $OUT/data_efficiency-125m-reshape.json          # windows instead of truncation
    python bench/data_efficiency.py --model tiny --device cpu --budget-tokens 200000 \
        --out /tmp/de.json --png /tmp/de.png                 # CPU smoke test, ~40 s on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402

import fscale as fs  # noqa: E402
from fscale.data.schedules import fixed_linear  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402

# Defaults per model: 125m sized so two runs fit ~3 min on one H200 (~600k tokens/s).
# [Note: batch 64] At 32 x 1024 tokens a step of this model is host-bound on the H200: at
# keep 512 the GPU's kernels take 37.6 ms of a 50 ms step (profiled), so random-LTD's
# saving never reaches the clock. At 64 x 1024 every run is GPU-bound (baseline ~108
# ms/step, random-LTD at keep 128 of 1024 ~43 ms).
MODELS = {
    "tiny": dict(
        cfg=GPTConfig(vocab_size=256, n_layer=4, n_head=2, d_model=64, seq_len=128),
        batch=16,
        budget=200_000,
        lr=3e-3,
        runs="baseline,cl+ltd,cl,ltd",
        val_batches=4,
    ),
    "125m": dict(
        cfg=GPTConfig(vocab_size=256, n_layer=12, n_head=12, d_model=768, seq_len=1024),
        batch=64,
        budget=40_000_000,
        lr=6e-4,
        runs="baseline,cl+ltd",
        val_batches=8,
    ),
}
# name: (curriculum, random_ltd)
RUNS = {
    "baseline": (False, False),
    "cl+ltd": (True, True),
    "cl": (True, False),
    "ltd": (False, True),
}
VAL_FRACTION = 0.1
WARMUP_FRACTION = 0.05  # LR warmup, of the baseline's steps (every run: the same steps)
RESERVE_S = 15.0  # kept back from --time-limit-s for the last evaluation and the files


# ----------------------------------------------------------------------------- data


def load_corpus(limit: int) -> tuple[torch.Tensor, dict]:
    """The stdlib's ``.py`` bytes in sorted path order (uint8), and where they came from.

    Unlike examples/train_gpt.py this keeps the test suites: 12 MB without them would
    be seen ~3.5 times in a 40M-token run of an 86M-param model, which then memorises.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}  # differ between installs
    files = sorted(
        (f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    buf = bytearray()
    for f in files:
        buf += f.read_bytes()
        if len(buf) >= limit:
            break
    buf = bytes(buf[:limit])
    if len(buf) < 1 << 16:
        raise RuntimeError(f"found only {len(buf)} bytes of Python source under {root}.")
    info = {
        "root": str(root),
        "bytes": len(buf),
        "sha256": hashlib.sha256(buf).hexdigest(),
        "python": sys.version.split()[0],
    }
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).clone(), info


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> dict[str, torch.Tensor]:
    """``{"x", "y"}`` (B, seq) longs from windows of ``data`` (on its device) at ``starts``."""
    idx = starts.to(data.device, non_blocking=True)[:, None] + torch.arange(
        seq + 1, device=data.device
    )
    w = data[idx].long()
    return {"x": w[:, :-1], "y": w[:, 1:]}


# ----------------------------------------------------------------------------- runs


@dataclass
class Plan:
    """One run's schedules, all functions of the step count, fixed before it starts."""

    name: str
    seqlen: object  # count -> L (tokens fed per sequence)
    keep: object  # count -> tokens kept in the middle layers (>= L: none dropped)
    windows: object  # count -> sequences fed per batch row (T // L in reshape mode, else 1)
    steps: int  # steps to consume the budget
    tokens: int
    curve: list = field(default_factory=list)

    def fed(self, count: int, batch: int) -> int:
        """Tokens step ``count`` feeds: rows x L."""
        return batch * self.windows(count) * self.seqlen(count)


class KeepOfFed:
    """Random-LTD's keep as a share of the length the curriculum feeds: ``ramp(c) / T``
    of ``L(c)`` tokens (multiples of 8, at least 8), so the middle layers drop tokens
    while the curriculum still feeds short windows, where an absolute keep (128 of
    ``L <= 128``) would drop none."""

    def __init__(self, ramp, T: int, seqlen):
        self.ramp, self.T, self.seqlen = ramp, T, seqlen
        self.seen: set[int] = set()

    def __call__(self, c: int) -> int:
        L = self.seqlen(c)
        keep = L if self.ramp(c) >= self.T else max(8, self.ramp(c) * L // self.T // 8 * 8)
        self.seen.add(keep)
        return keep

    def values(self):
        return sorted(self.seen)


def plan_run(name: str, args, cfg: GPTConfig, base_steps: int) -> Plan:
    cl, ltd = RUNS[name]
    T, B = cfg.seq_len, args.batch
    budget = base_steps * B * T
    reshape = cl and args.cl_mode == "reshape"
    if cl:
        warm = max(1, round(args.cl_frac * base_steps))
        # Reshape: lengths dividing T, so no row loses its tail (64, 128, ..., 1024).
        seqlen = fs.seqlen_warmup(args.cl_start, T, steps=warm, divides=T if reshape else None)
    else:
        seqlen = fixed_linear(T, T, steps=1)

    def windows(c: int) -> int:
        return T // seqlen(c) if reshape else 1

    steps, tokens = 0, 0
    while tokens < budget:  # the schedule is fixed: count the run's steps in advance
        tokens += B * windows(steps) * seqlen(steps)
        steps += 1
    if ltd:
        # Multiples of 64 (of 8 at small T): tensor-core friendly, and fewer shapes.
        bucket = 64 if T >= 512 else 8
        ramp = max(1, round(args.ltd_frac * steps))
        if args.ltd_of == "fed":
            keep = KeepOfFed(fixed_linear(args.ltd_keep, T, steps=ramp, bucket=1), T, seqlen)
        else:
            keep = fixed_linear(args.ltd_keep, T, steps=ramp, bucket=bucket)
    else:
        keep = fixed_linear(T, T, steps=1)
    return Plan(name, seqlen, keep, windows, steps, tokens)


def lr_for(plan: Plan, args, cfg: GPTConfig, base_steps: int):
    """The baseline's ``warmup_cosine``; for the others ``fs.layer_token_lr``, whose
    cosine follows the layer-tokens consumed (the paper's LayerToken LR), ending where
    this run ends, as the baseline's does (both runs fully annealed at their end)."""
    warm = max(1, round(WARMUP_FRACTION * base_steps))
    end = 0.1 * args.lr
    if plan.name == "baseline":
        return fs.optim.warmup_cosine(args.lr, warm, base_steps, end=end)
    n, T = cfg.n_layer, cfg.seq_len
    dropped = n - 2  # random_ltd's default layers: all but the first and the last

    def work(c: int) -> int:  # layer-tokens per batch row at count c (reshape: T // L windows)
        L = plan.seqlen(c)
        return plan.windows(c) * (dropped * min(plan.keep(c), L) + (n - dropped) * L)

    # layer_token_lr counts its n_dropped layers at min(keep, seq_len) and the rest at
    # seq_len; under the curriculum every layer sees windows(c) * L(c) <= seq_len, so pass all n
    # layers as dropping, each at the per-layer mean: the same layer-tokens (to < 1 per
    # layer per step), and with keep >= L the plain token count (token-based decay, as
    # DeepSpeed advises for the seqlen curriculum).
    def keep_mean(c: int) -> int:
        return -(-work(c) // n)

    total = sum(n * keep_mean(c) for c in range(plan.steps))
    return fs.layer_token_lr(
        args.lr,
        keep=keep_mean,
        seq_len=T,
        n_layers=n,
        n_dropped=n,
        warmup_steps=warm,
        total_steps=max(warm + 1, round(total / (n * T))),
        end=end,
    )


def build(plan: Plan, args, cfg: GPTConfig, base_steps: int, device):
    torch.manual_seed(args.seed)  # every run starts from the same weights
    with torch.device(device):
        model = GPT(cfg)
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

    cl, ltd = RUNS[plan.name]
    optimizer = fs.optim.adamw(
        lr=lr_for(plan, args, cfg, base_steps),
        b2=0.95,
        weight_decay=0.1,
        mask=fs.optim.decay_mask_default,
    )
    step = fs.train_step(loss_fn, optimizer, clip_norm=1.0, model=apply)
    if ltd:
        step = fs.random_ltd(step, keep=plan.keep, seed=args.seed)
    if cl:
        step = fs.curriculum(step, plan.seqlen, mode=args.cl_mode)
    step = fs.mixed_precision(step, args.precision)
    return apply, params, step


@torch.no_grad()
def evaluate(apply, params, val_batches, device) -> float:
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else _null()
    losses = []
    with amp:
        for b in val_batches:
            logits = apply(params, b["x"])
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), b["y"].flatten()))
    return torch.stack(losses).mean().item()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(plan, args, cfg, base_steps, device, train_data, val_batches, deadline) -> dict:
    """Runs ``plan``; its curve is ``[{step, tokens, time_s, val_loss, train_loss}]``."""
    apply, params, step = build(plan, args, cfg, base_steps, device)
    params, state = step.init(params)
    gen = torch.Generator().manual_seed(args.seed)  # the same windows in every run
    hi = len(train_data) - cfg.seq_len - 1
    B, T = args.batch, cfg.seq_len
    train_s = tokens = 0.0
    losses, stopped = [], False
    next_eval = args.eval_every

    def record(count):
        sync(device)
        train_loss = torch.stack(losses).float().mean().item() if losses else None
        losses.clear()
        v = evaluate(apply, params, val_batches, device)
        point = dict(step=count, tokens=int(tokens), time_s=train_s, val_loss=v)
        point["train_loss"] = train_loss  # mean since the last point, at the lengths fed
        plan.curve.append(point)
        print(
            f"  {plan.name:<8} step {count:5d}  tokens {tokens / 1e6:8.2f}M  "
            f"train {train_s:7.1f}s  val {v:.4f}",
            flush=True,
        )

    record(0)
    t0 = time.perf_counter()
    for count in range(plan.steps):
        if time.perf_counter() > deadline:
            stopped = True
            break
        batch = windows(train_data, torch.randint(0, hi, (B,), generator=gen), T)
        params, state, metrics = step(params, state, batch)
        losses.append(torch.as_tensor(metrics["loss"]).detach().reshape(()))
        L, fed = plan.seqlen(count), plan.fed(count, B)
        if "seqlen" in metrics and (metrics["seqlen"], metrics["tokens"]) != (L, fed):
            raise AssertionError(
                f"step {count}: curriculum fed {metrics['tokens']} tokens at length "
                f"{metrics['seqlen']}, plan {fed} at {L}"
            )
        tokens += fed
        if tokens >= next_eval or count == plan.steps - 1:
            sync(device)
            train_s += time.perf_counter() - t0
            record(count + 1)
            next_eval = (tokens // args.eval_every + 1) * args.eval_every
            t0 = time.perf_counter()
    if stopped:
        sync(device)
        train_s += time.perf_counter() - t0
        record(count)
    last = plan.curve[-1]
    return {
        "name": plan.name,
        "curriculum": RUNS[plan.name][0],
        "cl_mode": args.cl_mode if RUNS[plan.name][0] else None,
        "random_ltd": RUNS[plan.name][1],
        "steps": last["step"],
        "planned_steps": plan.steps,
        "tokens": last["tokens"],
        "train_s": last["time_s"],
        "tokens_per_s": last["tokens"] / max(last["time_s"], 1e-9),
        "final_val_loss": last["val_loss"],
        "stopped_early": stopped,
        "seqlens": list(getattr(plan.seqlen, "values", lambda: ())()),
        "keeps": list(getattr(plan.keep, "values", lambda: ())()),
        "curve": plan.curve,
    }


def reach(curve: list[dict], target: float) -> tuple[float, float] | None:
    """(train seconds, tokens) at which the val loss first reaches ``target``, linear
    between evaluations; None if it never does."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return p["time_s"], p["tokens"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return (
                prev["time_s"] + f * (p["time_s"] - prev["time_s"]),
                prev["tokens"] + f * (p["tokens"] - prev["tokens"]),
            )
        prev = p
    return None


def plot(path: Path, runs: list[dict], target: float, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in runs:
        xs = [p["time_s"] for p in r["curve"]], [p["tokens"] / 1e6 for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        for ax, x in zip(axes, xs, strict=True):
            ax.plot(x, ys, "o-", ms=2.5, lw=1.4, label=r["name"])
    for ax, xlabel in zip(axes, ("train seconds (evaluation excluded)", "tokens (M)"), strict=True):
        ax.axhline(target, color="grey", ls=":", lw=0.9, label="baseline's final")
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    # The first points (near ln 256) would squash the part that matters.
    tail = [p["val_loss"] for r in runs for p in r["curve"][len(r["curve"]) // 4 :]]
    if tail:
        axes[0].set_ylim(min(tail) - 0.05, max(tail) + 0.3)
    axes[0].set_ylabel("validation loss (nats / byte)")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="125m")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--runs", default=None, help=f"of {','.join(RUNS)} (baseline first)")
    p.add_argument("--budget-tokens", type=int, default=None, help="tokens per run")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="full sequence length")
    p.add_argument("--lr", type=float, default=None, help="peak LR")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--eval-every", type=int, default=None, help="tokens (default budget/20)")
    p.add_argument("--val-batches", type=int, default=None, help="fixed val batches")
    p.add_argument("--cl-start", type=int, default=None, help="first length (seq/16, >= 8)")
    p.add_argument("--cl-frac", type=float, default=0.35, help="of the baseline's steps")
    p.add_argument(
        "--cl-mode",
        choices=("truncate", "reshape"),
        default="reshape",
        help="fs.curriculum's mode: (B, T) -> (B, L), or (B * T // L, L) windows with L "
        "dividing T (--cl-start must divide --seq)",
    )
    p.add_argument("--ltd-keep", type=int, default=None, help="first keep (seq/8)")
    p.add_argument("--ltd-frac", type=float, default=0.7, help="of the run's steps")
    p.add_argument(
        "--ltd-of",
        choices=("seq", "fed"),
        default="fed",
        help="keep rises from --ltd-keep tokens (seq) or from --ltd-keep / seq of the "
        "length the curriculum feeds (fed), to all of them",
    )
    p.add_argument("--corpus-mb", type=float, default=64.0, help="at most this much source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=480.0, help="hard stop, whole script")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results)")
    p.add_argument("--png", default=None, help="loss-curve PNG (default: beside the JSON)")
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    cfg = spec["cfg"] if args.seq is None else spec["cfg"].replace(seq_len=args.seq)
    T = cfg.seq_len
    args.batch = args.batch or spec["batch"]
    args.lr = args.lr or spec["lr"]
    args.val_batches = args.val_batches or spec["val_batches"]
    args.cl_start = args.cl_start or max(8, T // 16)
    if args.cl_mode == "reshape" and T % args.cl_start:
        p.error(f"--cl-mode reshape: --cl-start {args.cl_start} must divide the length {T}")
    args.ltd_keep = args.ltd_keep or max(1, T // 8)
    runs = (args.runs or spec["runs"]).split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown or runs[0] != "baseline":
        p.error(f"--runs: names from {list(RUNS)}, baseline first; got {runs}")
    if cfg.n_layer < 3 and any(RUNS[r][1] for r in runs):
        p.error(f"random_ltd drops in the middle layers: the model needs >= 3, has {cfg.n_layer}")
    base_steps = max(1, (args.budget_tokens or spec["budget"]) // (args.batch * T))
    budget = base_steps * args.batch * T
    args.eval_every = args.eval_every or max(args.batch * T, budget // 20)
    deadline = t_start + args.time_limit_s - RESERVE_S

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    data, corpus = load_corpus(int(args.corpus_mb * 2**20))
    n_train = int(len(data) * (1 - VAL_FRACTION))
    train_data, val_data = data[:n_train].to(device), data[n_train:].to(device)
    g = torch.Generator().manual_seed(args.seed + 1)  # a fixed validation set
    val_batches = [
        windows(val_data, torch.randint(0, len(val_data) - T - 1, (args.batch,), generator=g), T)
        for _ in range(args.val_batches)
    ]
    with torch.device("meta"):
        n_params = GPT(cfg).num_params()

    result = {
        "bench": "data_efficiency",
        **provenance(device),
        "model": args.model,
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "d_model", "seq_len")},
        "params": n_params,
        "args": vars(args),
        "budget_tokens": budget,
        "baseline_steps": base_steps,
        "corpus": {**corpus, "train_bytes": n_train, "val_bytes": len(data) - n_train},
        "token_definition": "rows x the length fed per step (rows: batch, or batch x T // L "
        "in reshape mode; curriculum-cut tails excluded; random-LTD's dropped tokens included)",
        "runs": [],
    }
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out)
        path = path if path.suffix == ".json" else path / f"data_efficiency-{args.model}.json"
    else:
        slug = result["device"].lower().replace(" ", "-")
        path = Path(__file__).parent / "results" / f"data_efficiency-{args.model}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.png) if args.png else path.with_suffix(".png")
    print(
        f"GPT {args.model}: {n_params / 1e6:.1f}M params, {cfg.n_layer} x {cfg.d_model}, seq {T}"
        f" | batch {args.batch} | budget {budget / 1e6:.2f}M tokens = {base_steps} baseline "
        f"steps | corpus {len(data) / 1e6:.1f} MB ({n_train / 1e6:.1f} train) | {result['device']}",
        flush=True,
    )

    # Kernels, cuBLAS handles and the allocator warm up on a throwaway run, so the
    # baseline (first) is not charged for them.
    warm = plan_run("baseline", args, cfg, base_steps)
    _, wp, ws = build(warm, args, cfg, base_steps, device)
    wp, wstate = ws.init(wp)
    for _ in range(3):
        wp, wstate, _m = ws(wp, wstate, val_batches[0])
    sync(device)
    del wp, wstate, ws, _m

    for name in runs:
        plan = plan_run(name, args, cfg, base_steps)
        lengths = list(plan.seqlen.values()) if RUNS[name][0] else ""
        lengths = lengths and f", curriculum ({args.cl_mode}) lengths {lengths}"
        print(f"{name}: {plan.steps} steps, {plan.tokens / 1e6:.2f}M tokens{lengths}", flush=True)
        if time.perf_counter() > deadline:
            result["runs"].append({"name": name, "skipped": "time limit"})
            continue
        row = train(plan, args, cfg, base_steps, device, train_data, val_batches, deadline)
        result["runs"].append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(result, indent=1))  # each run kept if a later one dies

    done = [r for r in result["runs"] if "curve" in r]
    base = done[0]
    target = base["final_val_loss"]
    result["target_val_loss"] = target
    for r in done:
        hit = reach(r["curve"], target)
        r["time_to_target_s"] = hit and hit[0]
        r["tokens_to_target"] = hit and hit[1]
        r["time_ratio"] = hit and hit[0] / base["train_s"]
    path.write_text(json.dumps(result, indent=1))
    title = (
        f"GPT {args.model} on stdlib bytes, {budget / 1e6:.1f}M tokens per run, "
        f"curriculum: {args.cl_mode}"
    )
    plot(png, done, target, title)

    print(f"\nbaseline's final val loss: {target:.4f}")
    print(
        f"{'run':<9} {'steps':>6} {'tokens M':>9} {'train s':>8} {'tok/s':>9} {'val':>7} "
        f"{'t->base s':>9} {'ratio':>6}"
    )
    for r in result["runs"]:
        if "curve" not in r:
            print(f"{r['name']:<9} skipped ({r['skipped']})")
            continue
        hit = r["time_to_target_s"]
        t_hit = f"{hit:.1f}" if hit is not None else "not reached"
        ratio = f"{r['time_ratio']:.3f}" if hit is not None else "-"
        flag = " (stopped: time limit)" if r["stopped_early"] else ""
        print(
            f"{r['name']:<9} {r['steps']:>6} {r['tokens'] / 1e6:>9.2f} {r['train_s']:>8.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['final_val_loss']:>7.4f} {t_hit:>9} {ratio:>6}{flag}"
        )
    print(f"total {time.perf_counter() - t_start:.0f}s | wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()
