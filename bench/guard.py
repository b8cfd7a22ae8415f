"""The non-finite guard's cost on the 1.4B GPT step, one GPU (issue 15 (c), goal < 1%).

Four steps on the same params and state, in alternating blocks of steps so that clock
drift hits all alike: ``nonfinite="skip"`` as it is by default with AdamW on a GPU
("late": the verdict goes into the fused kernel as a device flag and the host reads it
during the next call, after that call's forward and backward are queued: [Note: reading
the verdict a step late]), ``"skip_now"`` ("now": the same device flag, the host reads
it after this call's update is queued), the read on the host before the update (an
optimizer that does not skip on the device: "host"), and ``nonfinite="off"`` (the vote
is computed, never read: no sync). Then a NaN batch through "late" must leave every
param untouched and be counted by the next call. Plus the vote's grad pass alone
(``torch._foreach_norm`` over fp32 grads of every param), the part every guarded mode
pays when neither ``clip_norm`` nor fp16 gives the flag for free.

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
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())
        return loss * batch["scale"] if "scale" in batch else loss

    adamw = fs.optim.adamw(1e-4)
    skip = fs.mixed_precision(fs.train_step(loss_fn, adamw), "bf16")
    assert skip.skips_on_device()
    now = dataclasses.replace(skip, nonfinite="skip_now")
    host = dataclasses.replace(now, optimizer=adamw._replace(skips_on_device=False))
    assert not host.skips_on_device()
    off = dataclasses.replace(skip, nonfinite="off")
    modes = {"late": skip, "now": now, "host": host, "off": off}
    params, state = skip.init(params)
    n = sum(t.numel() for t in params.values())
    g = torch.Generator(device=device).manual_seed(1)
    shape = (args.batch, args.seq + 1)
    tokens = torch.randint(0, cfg.vocab_size, shape, device=device, generator=g)
    batch = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
    for step in [*modes.values()] * 2:  # warm up all
        params, state, _ = step(params, state, batch)
    torch.cuda.synchronize()
    times = {name: [] for name in modes}
    for _ in range(args.blocks):
        for name, step in modes.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, state, metrics = step(params, state, batch)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps)
    assert not bool(metrics["nonfinite"])
    before = {k: v.clone() for k, v in params.items()}
    poisoned = {**batch, "scale": torch.tensor(float("nan"), device=device)}  # NaN loss, grads
    params, state, metrics = skip(params, state, poisoned)
    assert isinstance(metrics["nonfinite"], torch.Tensor) and bool(metrics["nonfinite"])
    untouched = all(torch.equal(params[k], v) for k, v in before.items())
    skipped = state["guard"]["skipped_steps"]
    params, state, metrics = skip(params, state, batch)  # settles the NaN call
    counted = state["guard"]["skipped_steps"] == skipped + 1
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
        "late_over_off": med["late"] / med["off"],
        "now_over_off": med["now"] / med["off"],
        "host_over_off": med["host"] / med["off"],
        "nan_step_left_params_untouched": untouched,
        "nan_step_counted_by_the_next_call": counted,
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
