"""Quantize a small trained GPT to every format and compare held-out perplexity and bytes.

Trains the GPT of ``examples/train_gpt.py`` (same data, model and step: its helpers
are imported) for ``--steps`` steps, or loads ``--checkpoint``, then runs the
unchanged ``apply`` on ``fs.quantize(params, fmt)`` for fp6 (e3m2, e2m3), fp5
(e2m2, e3m1), fp4 (e2m1), INT8 and INT4 (group 128, also with LoRC), W8A8 and FP8,
and prints a table of held-out perplexity (bytes of the stdlib modules not trained
on) and weight bytes relative to fp16::

    python examples/quantize_gpt.py                          # ~3-5 min on 2 CPU cores
    python examples/quantize_gpt.py --checkpoint out/quantize_gpt.pt   # reuse the weights

The fp16 row rounds every param to fp16 (computing in fp32, as the quantized rows
do); each format's perplexity is compared with it. Embeddings and the (tied) output
head stay in the model's dtype, as ZeroQuant and FP6-LLM keep them; "linear bytes"
counts only the quantized linear weights (codes, scales, LoRC factors, padding),
"model bytes" every param, the unquantized ones (embeddings, norms, biases) in
fp16. fp5's layout packs K in chunks of 256, so the d=128 layers of the small GPT
are padded (``pad=True``), and the padding is counted.

Outputs: the table, and ``--out`` (default ``out/quantize_gpt.json``) with the rows.

Measured (300 steps, 2 CPU cores shared with other jobs: 220 s training, 313 s in all;
32768 held-out bytes), perplexity per byte and bytes of the quantized linears:

    fp16 7.3433 (1.000x) | fp6 e3m2 +0.10% (0.387x) | fp6 e2m3 +0.04% | fp5 e2m2 +0.08%
    (0.533x, padded) | fp4 e2m1 +0.24% (0.262x) | int8 g128 +0.01% (0.516x) | int4 g128
    +0.23% (0.266x) | int4 g128 + LoRC r8 +0.19% (0.349x) | w8a8 -0.01% | fp8 +0.06%
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_gpt  # noqa: E402  (the sibling example: data, step and eval helpers)

import fscale as fs  # noqa: E402
from fscale.models import GPT, GPTConfig  # noqa: E402
from fscale.transforms.quantize import QuantizedWeight, quantize, quantize_report  # noqa: E402

# (label, fmt, quantize kwargs)
ROWS = [
    ("fp6 e3m2", "e3m2", {}),
    ("fp6 e2m3", "e2m3", {}),
    ("fp5 e2m2", "e2m2", {}),
    ("fp5 e3m1", "e3m1", {}),
    ("fp4 e2m1", "e2m1", {}),
    ("int8 g128", "int8", {"group_size": 128}),
    ("int4 g128", "int4", {"group_size": 128}),
    ("int4 g128 asym", "int4", {"group_size": 128, "symmetric": False}),
    ("int4 g128 +LoRC r8", "int4", {"group_size": 128, "lorc_rank": 8}),
    ("w8a8", "w8a8", {}),
    ("fp8 e4m3", "fp8", {}),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (if no checkpoint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--preset", choices=("small", "tiny"), default="small")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="load params from here (skip training)")
    p.add_argument("--save", default="out/quantize_gpt.pt", help="where trained params go")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 16 seqs")
    p.add_argument("--formats", default=None, help="comma-separated labels to run (default all)")
    p.add_argument("--out", default="out/quantize_gpt.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train(args, model, apply, params, train_data, batch_kw) -> dict:
    targs = train_gpt.parse_args(
        ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    )

    def loss_fn(params, batch):
        logits = apply(params, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    step = train_gpt.build_step(targs, loss_fn)
    params, state = step.init(params)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for it in range(1, args.steps + 1):
        batch = train_gpt.get_batch(train_data, gen, **batch_kw)
        params, state, metrics = step(params, state, batch)
        if it % 50 == 0 or it == args.steps:
            loss = float(metrics["loss"])
            print(f"step {it:4d}  loss {loss:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return params


@torch.no_grad()
def perplexity(apply, params, val, batch_kw, n_batches: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        batch = train_gpt.get_batch(val, gen, **batch_kw)
        logits = apply(params, batch["x"])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten()).item()
    return math.exp(total / n_batches)


def _bytes(params) -> tuple[int, int, int]:
    """(quantized linear bytes, their fp16 bytes, model bytes with the rest in fp16)."""
    lin = lin16 = model = 0
    for t in params.values():
        if isinstance(t, QuantizedWeight):
            lin += t.packed_nbytes
            lin16 += 2 * t.numel()
            model += t.packed_nbytes
        elif isinstance(t, torch.Tensor):
            model += 2 * t.numel()  # embeddings, norms, biases: served in fp16
    return lin, lin16, model


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = getattr(GPTConfig, args.preset)()
    if args.seq_len is not None:
        cfg = cfg.replace(seq_len=args.seq_len)
    model = GPT(cfg)
    params, apply = fs.functional(model)

    data = train_gpt.load_stdlib_bytes()
    n_train = int(len(data) * (1 - train_gpt.VAL_FRACTION))
    train_data, val = data[:n_train], data[n_train:]
    batch_kw = dict(
        global_batch=args.batch_size,
        seq_len=cfg.seq_len,
        rank=0,
        batch_size=args.batch_size,
        device=torch.device("cpu"),
    )
    t0 = time.perf_counter()
    if args.checkpoint:
        loaded = torch.load(args.checkpoint, map_location="cpu")
        params = {k: loaded[k] for k in params}
        print(f"loaded {args.checkpoint}")
    else:
        n = model.num_params() / 1e6
        print(f"training GPT {args.preset} ({n:.2f}M params), {args.steps} steps")
        params = train(args, model, apply, params, train_data, batch_kw)
        if args.save:
            path = pathlib.Path(args.save)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in params.items()}, path)
            print(f"saved params to {path} (reuse with --checkpoint {path})")
    train_s = time.perf_counter() - t0

    ppl = lambda p: perplexity(apply, p, val, batch_kw, args.eval_batches, args.seed + 1)  # noqa: E731
    fp32_bytes = sum(t.numel() * t.element_size() for t in params.values())
    p16 = {k: v.half().float() for k, v in params.items()}
    lin16 = sum(
        2 * v.numel() for v in quantize(params, "int8", pad=True).values()
        if isinstance(v, QuantizedWeight)
    )  # fmt: skip
    base16 = ppl(p16)
    rows = [
        dict(label="fp32", fmt="fp32", ppl=ppl(params), linear_bytes=2 * lin16,
             model_bytes=fp32_bytes),
        dict(label="fp16", fmt="fp16", ppl=base16, linear_bytes=lin16, model_bytes=fp32_bytes // 2),
    ]  # fmt: skip
    wanted = None if args.formats is None else set(args.formats.split(","))
    for label, fmt, kw in ROWS:
        if wanted is not None and label not in wanted and fmt not in wanted:
            continue
        t1 = time.perf_counter()
        q = quantize(params, fmt, pad=True, **kw)
        lin, _, model_b = _bytes(q)
        rows.append(
            dict(label=label, fmt=fmt, options=kw, ppl=ppl(q), linear_bytes=lin,
                 model_bytes=model_b, seconds=time.perf_counter() - t1)
        )  # fmt: skip
        if fmt == "e3m2":
            print(quantize_report(q))
    for r in rows:
        r["ppl_rel_fp16"] = r["ppl"] / base16 - 1.0
        r["linear_x_fp16"] = r["linear_bytes"] / lin16
        r["model_x_fp16"] = r["model_bytes"] / (fp32_bytes // 2)

    print(
        f"\nheld-out perplexity (bytes), {args.eval_batches} x {args.batch_size} x {cfg.seq_len} "
        f"tokens; GPT {args.preset}"
    )
    print(
        f"{'format':<20} {'ppl':>8} {'vs fp16':>9} {'linear bytes':>13} {'x fp16':>7} "
        f"{'model x fp16':>13}"
    )
    for r in rows:
        print(
            f"{r['label']:<20} {r['ppl']:>8.4f} {100 * r['ppl_rel_fp16']:>+8.2f}% "
            f"{r['linear_bytes']:>13,} {r['linear_x_fp16']:>7.3f} {r['model_x_fp16']:>13.3f}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(preset=args.preset, steps=0 if args.checkpoint else args.steps,
                checkpoint=args.checkpoint, train_seconds=train_s,
                eval_tokens=args.eval_batches * args.batch_size * cfg.seq_len,
                total_seconds=time.perf_counter() - t0)  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")
    return rows


if __name__ == "__main__":
    main()
