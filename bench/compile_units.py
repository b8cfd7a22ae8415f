"""``compile_units`` against fscale eager, plain torch eager and ``torch.compile`` (issue 19 (a)).

One GPU, the 1.4B GPT (24 x 2048, seq 2048), bf16 compute with fp32 master weights and
fused AdamW everywhere, the same micro-batch, one after the other in one process:

- fscale eager: ``mixed_precision(train_step(...), "bf16")``, and over ``shard_zero(3)``
  (a world of one still runs ZeRO-3's gather path);
- fscale ``compile_units``: the same two stacks with ``fs.compile_units`` innermost;
- plain torch: the ``nn.Module`` under ``torch.autocast(bf16)`` with
  ``torch.optim.AdamW(fused=True)``, eager and ``torch.compile(model)``.

Goals: compile_units >= 1.15x fscale eager and >= 1.0x torch.compile, stage 3
included. Every variant is built and warmed up (compiled) first, then ``--steps``
rounds time one step of each (a device sync around each step; the order rotates), so
all variants see the same GPU clocks and temperature; the median step is reported
(``--no-interleave``: one variant after the other, as before 2026-12-03). ``--window K``
times K steps back to back per sample, so the host can run ahead as in training.

Usage::

    python bench/compile_units.py --model 1b4 --out $OUT/compile-1b4.json
    python bench/compile_units.py --model tiny --device cpu --steps 2 --batch 2  # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import provenance  # noqa: E402

import fscale as fs  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402

MODELS = {"tiny": GPTConfig.tiny, "1b4": GPTConfig.gpt_1b4}
LR = 1e-4


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _model(cfg, device):
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(cfg)


def fscale_runner(cfg, device, *, compiled: bool, stage: int):
    model = _model(cfg, device)
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())

    step = fs.train_step(loss_fn, fs.optim.adamw(LR, weight_decay=0.1), model=apply)
    if compiled:
        step = fs.compile_units(step)
    step = fs.mixed_precision(step, "bf16")
    if stage:
        step = fs.shard_zero(step, stage)
    params, state = step.init(params)
    box = {"params": params, "state": state}

    def run(batch):
        box["params"], box["state"], metrics = step(box["params"], box["state"], batch)
        return metrics["loss"]

    return run


def torch_runner(cfg, device, *, compiled: bool):
    model = _model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compiled else model

    def run(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = fwd(batch["x"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


VARIANTS = {
    "fscale eager": lambda c, d: fscale_runner(c, d, compiled=False, stage=0),
    "fscale compile_units": lambda c, d: fscale_runner(c, d, compiled=True, stage=0),
    "fscale zero3 eager": lambda c, d: fscale_runner(c, d, compiled=False, stage=3),
    "fscale zero3 compile_units": lambda c, d: fscale_runner(c, d, compiled=True, stage=3),
    "torch eager": lambda c, d: torch_runner(c, d, compiled=False),
    "torch.compile": lambda c, d: torch_runner(c, d, compiled=True),
}


def time_variant(name, cfg, device, batch, steps, warmup) -> dict:
    _free(device)
    run = VARIANTS[name](cfg, device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = run(batch)
    _sync(device)
    warm_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = run(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del run
    _free(device)
    return {"step_s": times, "median_s": statistics.median(times), "warmup_s": warm_s,
            "losses": losses, "peak_gib": peak}  # fmt: skip


def time_interleaved(names, cfg, device, batch, steps, warmup, window=1) -> dict:
    """Every variant built and warmed up, then ``steps`` rounds of one timed sample each
    (in a rotating order): the GPU's clocks and temperature drift over a run (the same
    GEMM kernels measured ~5% slower in variants timed minutes after the first), so
    variants timed one after the other would each get a different GPU.

    A sample is ``window`` steps back to back between two device syncs, divided by
    ``window``: with 1, every step starts on an idle GPU and the host's work before its
    first kernel is all exposed; with more, the host runs ahead as in a training loop
    that does not read the loss every step."""
    _free(device)
    runs, rows = {}, {}
    for name in names:
        run = runs[name] = VARIANTS[name](cfg, device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            run(batch)
        _sync(device)
        rows[name] = {"step_s": [], "losses": [], "warmup_s": time.perf_counter() - t0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for r in range(steps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            losses = [runs[name](batch) for _ in range(window)]
            _sync(device)
            rows[name]["step_s"].append((time.perf_counter() - t0) / window)
            rows[name]["losses"].extend(float(loss) for loss in losses)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    for row in rows.values():
        row["median_s"] = statistics.median(row["step_s"])
        row["peak_gib"] = peak  # of all variants together
    del runs
    _free(device)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="variants to run")
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build every variant first and time them in rounds (one step of each per "
        "round), so each sees the same clocks and temperature; --no-interleave times "
        "them one after the other (the first runs on a cooler GPU)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="steps per timed sample, back to back between two syncs (interleaved only)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = MODELS[args.model]()
    seq = args.seq or cfg.seq_len
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=g).to(device)
    batch = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
    names = args.only or list(VARIANTS)
    if args.interleave:
        rows = time_interleaved(
            names, cfg, device, batch, args.steps, args.warmup, max(args.window, 1)
        )
    else:
        rows = {}
        for name in names:
            rows[name] = time_variant(name, cfg, device, batch, args.steps, args.warmup)
    for name in names:
        print(f"{name:28s} {rows[name]['median_s'] * 1e3:9.1f} ms", flush=True)
    tokens_per_step = args.batch * seq
    for row in rows.values():
        row["tokens_per_s"] = tokens_per_step / row["median_s"]

    def ratio(a, b):
        return rows[b]["median_s"] / rows[a]["median_s"] if a in rows and b in rows else None

    ratios = {
        "compile_units / fscale eager": ratio("fscale compile_units", "fscale eager"),
        "compile_units / torch.compile": ratio("fscale compile_units", "torch.compile"),
        "zero3 compile_units / zero3 eager": ratio(
            "fscale zero3 compile_units", "fscale zero3 eager"
        ),
        "zero3 compile_units / torch.compile": ratio("fscale zero3 compile_units", "torch.compile"),
        "torch.compile / torch eager": ratio("torch.compile", "torch eager"),
    }
    result = {
        "bench": "compile_units",
        **provenance(device),
        "model": args.model,
        "batch": args.batch,
        "seq": seq,
        "schedule": "interleaved" if args.interleave else "one after the other",
        "window": args.window if args.interleave else 1,
        "variants": rows,
        "speedups": ratios,
    }
    out = args.out or os.environ.get("OUT")
    name = f"compile-{args.model}.json"
    path = Path(out) if out else Path(__file__).parent / "results" / name
    if path.suffix != ".json":
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{'variant':28s} {'ms/step':>9s} {'tokens/s':>10s} {'peak GiB':>9s}")
    for name, row in rows.items():
        print(
            f"{name:28s} {row['median_s'] * 1e3:9.1f} {row['tokens_per_s']:10,.0f} "
            f"{row['peak_gib']:9.1f}"
        )
    for k, v in ratios.items():
        if v is not None:
            print(f"{k:40s} {v:.3f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
