"""The non-finite guard's cost on the 1.4B GPT step, one GPU (issue 15 (c), goal < 1%).

``train_step(nonfinite="skip")`` (the default: one host read of the step's vote) against
``nonfinite="off"`` (the vote is computed, never read: no sync), the same params and
state, in alternating blocks of steps so that clock drift hits both alike; plus the
vote's grad pass alone (``torch._foreach_norm`` over fp32 grads of every param), the
part both modes pay when neither ``clip_norm`` nor fp16 gives the flag for free.

Usage (one H200; see bench/README.md for the optree wheel)::

    python3 bench/guard.py --model 1b4 --out $OUT/guard-1b4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fscale as fs  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402

MODELS = {"tiny": GPTConfig.tiny, "1b4": GPTConfig.gpt_1b4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b4", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    cfg = MODELS[args.model]()
    torch.manual_seed(0)
    with device:
        model = GPT(cfg)
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())

    skip = fs.mixed_precision(fs.train_step(loss_fn, fs.optim.adamw(1e-4)), "bf16")
    off = dataclasses.replace(skip, nonfinite="off")
    params, state = skip.init(params)
    n = sum(t.numel() for t in params.values())
    g = torch.Generator(device=device).manual_seed(1)
    shape = (args.batch, args.seq + 1)
    tokens = torch.randint(0, cfg.vocab_size, shape, device=device, generator=g)
    batch = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
    for step in (skip, off, skip, off):  # warm up both
        params, state, _ = step(params, state, batch)
    torch.cuda.synchronize()
    times = {"skip": [], "off": []}
    for _ in range(args.blocks):
        for name, step in (("skip", skip), ("off", off)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, state, metrics = step(params, state, batch)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps)
    assert not bool(metrics["nonfinite"])
    # The flag's grad pass alone, on fp32 grads shaped like the params.
    grads = [torch.randn_like(t, dtype=torch.float32) for t in params.values()]
    for _ in range(3):
        torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        flag = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    torch.cuda.synchronize()
    flag_s = (time.perf_counter() - t0) / reps
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "model": args.model,
        "params": n,
        "batch": args.batch,
        "seq": args.seq,
        "step_s": times,
        "median_step_s": med,
        "skip_over_off": med["skip"] / med["off"],
        "flag_pass_s": flag_s,
        "flag_pass_over_step": flag_s / med["off"],
        "command": " ".join(sys.argv),
    }
    del flag
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
