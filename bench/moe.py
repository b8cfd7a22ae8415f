"""MoE on one GPU (issue 17): grouped-GEMM experts, and an MoE GPT against its dense peer.

(a) The expert FFN (``w_out(gelu(w_in x))`` per expert, no bias) forward + backward on
    16,384 tokens x top-2 = 32,768 routed rows, d=4096, hidden 14336, 8 and 64 experts,
    bf16, with balanced and Zipf-skewed (s=1.2) rows per expert. Each grouped-GEMM
    lowering (``torch._grouped_mm``, the Triton kernels, the per-expert loop) is timed
    against a dense FFN of the same rows and FLOPs (two plain GEMMs + gelu).
    TFLOP/s = 12 * rows * d * hidden / time (two GEMMs, x3 for forward + backward).
    Goals: >= 85% of dense balanced, >= 70% skewed, >= 1.5x the loop at 64 experts.
(b) Training step of an MoE GPT (24 x 2048, seq 2048, 8 experts of hidden 4096, top-2,
    dropless) against the dense 1.4B GPT: the same *active* size (two experts of
    hidden 2d per token = the dense 4d MLP). ``fs.mixed_precision(bf16)`` over
    ``fs.train_step`` with fscale's fused AdamW; tokens/s and MFU on active-parameter
    FLOPs (``GPT.flops_per_token``). Goal: MoE >= 0.8x the dense tokens/s.

Times are CUDA-event medians after warmup; each row is printed as measured.

Usage::

    python bench/moe.py                      # H200: about 3-4 minutes
    python bench/moe.py --only ffn           # part (a) only (needs no optree)
    python bench/moe.py --tiny --device cpu  # CPU smoke test (seconds)

Writes ``$OUT/moe.json`` when ``$OUT`` is set, else ``bench/results/moe_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
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

try:  # the whole library (part b); the GPU image may lack optree
    import fscale as fs
    from fscale.kernels import grouped_gemm as gg
except ImportError as err:  # part (a) needs only the kernels
    fs, _FS_ERROR = None, err
    from _source import import_kernels

    (gg,) = import_kernels("grouped_gemm")

from fscale.hw import dispatch  # noqa: E402

IMPLS = ("reference", "torch", "triton")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_ms(fn, device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls (CUDA events on a GPU), after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def expert_counts(rows: int, experts: int, dist: str) -> torch.Tensor:
    """Rows per expert: equal, or Zipf (p_e ~ 1 / (e + 1)^1.2, the largest first)."""
    if dist == "balanced":
        p = torch.ones(experts)
    else:
        p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    counts = torch.floor(p / p.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return counts


# ----------------------------------------------------------------------------- (a) FFN


def ffn_rows(args, device) -> list[dict]:
    d, h, tokens, k = args.d, args.hidden, args.tokens, 2
    rows = tokens * k
    flops = 12 * rows * d * h
    dt = torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(device, dt).requires_grad_()
    dy = torch.randn(rows, d, generator=gen).to(device, dt)
    out = []

    def emit(row):
        out.append(row)
        ratio = "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("x_"))
        err = f"  err={row['max_rel_err']:.1e}" if "max_rel_err" in row else ""
        print(f"ffn E={row['experts']:3d} {row['routing']:8s} {row['impl']:9s} "
              f"{row['ms']:8.2f} ms {row['tflops']:7.1f} TFLOP/s  {ratio}{err}",
              flush=True)  # fmt: skip

    # The dense FFN of the same rows and FLOPs: the ceiling the grouped GEMM aims at.
    ms = statistics.median(time_ms(_dense(x, dy, h, gen), device, args.warmup, args.iters))
    dense_row = {"experts": 1, "routing": "-", "impl": "dense", "ms": ms,
                 "tflops": flops / ms / 1e9}  # fmt: skip
    emit(dense_row)
    for experts in args.experts:
        w_in = (torch.randn(experts, d, h, generator=gen) * 0.02).to(device, dt).requires_grad_()
        w_out = (torch.randn(experts, h, d, generator=gen) * 0.02).to(device, dt).requires_grad_()
        _experts_rows(args, device, x, dy, w_in, w_out, flops, dense_row, emit)
        del w_in, w_out
        _free(device)
    return out


def _dense(x, dy, h, gen):
    d = x.shape[1]
    w1 = (torch.randn(d, h, generator=gen) * 0.02).to(x.device, x.dtype).requires_grad_()
    w2 = (torch.randn(h, d, generator=gen) * 0.02).to(x.device, x.dtype).requires_grad_()

    def dense():
        y = F.gelu(x @ w1, approximate="tanh") @ w2
        torch.autograd.grad(y, (x, w1, w2), dy)

    return dense


def _experts_rows(args, device, x, dy, w_in, w_out, flops, dense_row, emit):
    experts, rows = w_in.shape[0], x.shape[0]
    for dist in ("balanced", "zipf1.2"):
        counts = expert_counts(rows, experts, dist).to(device)
        results, ref = {}, None
        # The loop first: the others' rows then carry their ratio and error against it.
        for impl in sorted(args.impls, key=lambda i: i != "reference"):

            def run(impl=impl, counts=counts):
                a = gg.grouped_mm(x, w_in, counts, impl=impl)
                y = gg.grouped_mm(F.gelu(a, approximate="tanh"), w_out, counts, impl=impl)
                return y, torch.autograd.grad(y, (x, w_in, w_out), dy)

            try:
                y, grads = run()  # also tunes the Triton launches
                mine = (y.detach().float(), grads[0].float())
                del y, grads
                ms = statistics.median(time_ms(run, device, args.warmup, args.iters))
            except Exception as e:  # a lowering this device lacks
                print(f"ffn E={experts:3d} {dist:8s} {impl:9s} skipped: {e}"[:300], flush=True)
                continue
            results[impl] = ms
            row = {"experts": experts, "routing": dist, "impl": impl, "ms": ms,
                   "tflops": flops / ms / 1e9, "counts_max": int(counts.max()),
                   "x_dense": dense_row["ms"] / ms}  # fmt: skip
            if impl == "reference":
                ref = mine
            elif ref is not None:
                row["x_loop"] = results["reference"] / ms
                row["max_rel_err"] = max(
                    float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                    for a, b in zip(mine, ref, strict=True)
                )
            del mine
            emit(row)
        del ref


# ----------------------------------------------------------------------------- (b) GPT


def gpt_rows(args, device) -> list[dict]:
    from fscale.models.gpt import GPT, GPTConfig

    if args.tiny:
        dense_cfg = GPTConfig.tiny()
    else:
        dense_cfg = GPTConfig.gpt_1b4()
    moe_cfg = dense_cfg.replace(
        experts=8, top_k=2, expert_hidden=2 * dense_cfg.d_model, capacity_factor=None
    )
    seq = args.seq or dense_cfg.seq_len
    out = []
    for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        batch = args.batch
        while batch >= 1:
            try:
                out.append(_train(name, cfg, batch, seq, args, device, GPT))
                break
            except torch.cuda.OutOfMemoryError:
                print(f"gpt {name}: micro-batch {batch} does not fit; halving", flush=True)
                _free(device)
                batch //= 2
    if len(out) == 2:
        out[1]["x_dense_tokens_per_s"] = out[1]["tokens_per_s"] / out[0]["tokens_per_s"]
        print(f"gpt moe / dense tokens/s: {out[1]['x_dense_tokens_per_s']:.3f}", flush=True)
    return out


def _train(name, cfg, batch, seq, args, device, GPT) -> dict:
    _free(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    flops_per_token = model.flops_per_token(seq)
    n_params, n_active = model.num_params(), model.num_params(active=True)
    params, apply = fs.functional(model)

    def loss_fn(p, b):
        logits = apply(p, b["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), b["y"].flatten())

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=1e-4, weight_decay=0.1), model=model)
    step = fs.mixed_precision(step, "bf16")
    params, state = step.init(params)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    data = {"x": tokens[:, :-1].contiguous(), "y": tokens[:, 1:].contiguous()}
    box = {"p": params, "s": state}
    losses = []

    def one():
        box["p"], box["s"], metrics = step(box["p"], box["s"], data)
        losses.append(metrics["loss"])

    times = time_ms(one, device, args.warmup, args.steps)
    ms = statistics.median(times)
    tps = batch * seq / ms * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    row = {
        "model": name, "params": n_params, "active_params": n_active, "batch": batch,
        "seq": seq, "ms": ms, "step_ms": times, "tokens_per_s": tps,
        "flops_per_token": flops_per_token,
        "mfu": flops_per_token * tps / (args.peak_tflops * 1e12),
        "peak_gib": peak, "losses": [float(v) for v in losses[-3:]],
        "kernels": dispatch.resolved(),
    }  # fmt: skip
    print(f"gpt {name:5s} params {n_params / 1e9:.2f}B active {n_active / 1e9:.2f}B "
          f"batch {batch} {ms:8.1f} ms {tps:10,.0f} tok/s MFU {row['mfu']:.3f} "
          f"peak {peak:.1f} GiB", flush=True)  # fmt: skip
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--only", choices=("ffn", "gpt"), default=None)
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--experts", nargs="*", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="timed GPT steps")
    p.add_argument("--batch", type=int, default=8, help="GPT micro-batch (halved on OOM)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.tiny:
        args.d, args.hidden, args.tokens = 64, 128, 256
        args.experts = args.experts or [4, 8]
        args.seq, args.batch = args.seq or 32, min(args.batch, 2)
    else:
        args.d, args.hidden, args.tokens = 4096, 14336, 16384
        args.experts = args.experts or [8, 64]
    result = {"bench": "moe", **provenance(device), "args": {k: v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    if args.only in (None, "ffn"):
        result["ffn"] = ffn_rows(args, device)
    if args.only in (None, "gpt"):
        if fs is None:
            print(f"gpt: skipped, fscale does not import here ({_FS_ERROR})", flush=True)
        else:
            result["gpt"] = gpt_rows(args, device)
    result["wall_s"] = time.perf_counter() - t0
    out = args.out or os.environ.get("OUT")
    date = datetime.date.today().isoformat()
    path = Path(out) / "moe.json" if out else Path(__file__).parent / "results" / f"moe_{date}.json"
    if out and out.endswith(".json"):
        path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path} ({result['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
