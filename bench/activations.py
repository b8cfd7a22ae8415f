"""Largest micro-batch with and without ``checkpoint_activations``, and tokens/s at each.

One GPU, the 1.4B GPT (24 x 2048, seq 2048), ``fs.mixed_precision(bf16)`` over
``fs.train_step(..., model=model)``; for each policy (none, ``"selective"``,
``"unit"``) the micro-batch doubles until CUDA runs out of memory, then bisects
between the last fit and the first failure. At the largest fit the step is timed
(``--steps`` after ``--warmup``) and tokens/s, MFU and peak GiB are reported.

Usage::

    python bench/activations.py --model 1b4
    python bench/activations.py --model tiny --device cpu --max-batch 4   # CPU smoke test

Writes ``$OUT/activations-<model>.json`` when ``$OUT`` is set, else
``bench/results/activations-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
POLICIES = ("none", "selective", "unit")


def build(cfg: GPTConfig, device, policy: str):
    """The GPT and ``checkpoint_activations(mixed_precision(train_step(...)))`` for ``policy``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=3e-4, weight_decay=0.1), model=model)
    step = fs.mixed_precision(step, "bf16")
    if policy != "none":
        step = fs.checkpoint_activations(step, policy=policy)
    return model, params, step


def batch_of(cfg: GPTConfig, device, micro: int, seq: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g).to(device)
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def trial(built, device, micro, seq, steps, warmup):
    """Run ``warmup + steps`` steps; returns (ms per step, peak GiB, losses) or None on OOM.

    ``built`` is ``build``'s model and step, made once per policy: the params alias the
    module's weights, so trials train them further (the weights' values do not change
    what fits or how fast a step runs).
    """
    cfg, model, step = built
    free(device)
    params = state = None
    try:
        params, _ = fs.functional(model)
        params, state = step.init(params)
        batch = batch_of(cfg, device, micro, seq)
        losses, times = [], []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            params, state, metrics = step(params, state, batch)
            losses.append(float(metrics["loss"]))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        return 1e3 * sum(times) / len(times), peak, losses
    except torch.OutOfMemoryError:
        return None
    finally:
        del params, state
        free(device)


def largest(built, device, seq, max_batch, trial=trial):
    """The largest micro-batch that fits (doubling, then bisecting), with its probe log.

    ``trial(built, device, micro, seq, steps, warmup)`` returns None when it does not fit
    (bench/activation_offload.py passes one that also caps host memory)."""
    log, fit, fail = [], 0, None
    micro = 1
    while micro <= max_batch:
        ok = trial(built, device, micro, seq, steps=1, warmup=1) is not None
        log.append((micro, ok))
        if not ok:
            fail = micro
            break
        fit, micro = micro, micro * 2
        if fit < max_batch < micro:
            micro = max_batch  # the cap itself is the last probe
    if fail is not None:
        lo, hi = fit, fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok = trial(built, device, mid, seq, steps=1, warmup=1) is not None
            log.append((mid, ok))
            lo, hi = (mid, hi) if ok else (lo, mid)
        fit = lo
    return fit, log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = MODELS[args.model]()
    seq = args.seq or cfg.seq_len
    with torch.device("meta"):
        flops_per_token = GPT(cfg).flops_per_token(seq)
    rows = []
    result = {
        "bench": "activations",
        **provenance(device),
        "model": args.model,
        "seq": seq,
        "flops_per_token": flops_per_token,
        "results": rows,
    }
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out)
        path = path if path.suffix == ".json" else path / f"activations-{args.model}.json"
    else:
        slug = result["device"].lower().replace(" ", "-")
        path = Path(__file__).parent / "results" / f"activations-{args.model}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for policy in args.policies.split(","):
        model, _, step = build(cfg, device, policy)
        built = (cfg, model, step)
        fit, log = largest(built, device, seq, args.max_batch)
        row = {"policy": policy, "largest_micro_batch": fit, "probes": log}
        timed = None
        while fit and timed is None:  # a longer run can still fail where two steps fit
            timed = trial(built, device, fit, seq, args.steps, args.warmup)
            fit -= timed is None
        row["largest_micro_batch"] = fit
        if fit:
            ms, peak, losses = timed
            tokens = fit * seq / (ms / 1e3)
            row.update(step_ms=ms, tokens_per_s=tokens, peak_gib=peak, losses=losses)
            if flops_per_token:
                row["mfu"] = flops_per_token * tokens / (args.peak_tflops * 1e12)
        rows.append(row)
        del model, step, built
        free(device)
        print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)
        path.write_text(json.dumps(result, indent=1))  # each policy kept if a later one dies
    print(f"\n{'policy':<10} {'micro':>6} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if r["largest_micro_batch"]:
            mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
            print(
                f"{r['policy']:<10} {r['largest_micro_batch']:>6} {r['tokens_per_s']:>10.0f} "
                f"{mfu:>6} {r['peak_gib']:>9.1f}"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
