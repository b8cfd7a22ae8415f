"""fscale.serve on one GPU: throughput, batch-1 decode, Poisson latency, FP6 vs bf16.

A Llama-3.1-8B-shaped decoder (hidden 4096, 32 layers, 32 heads / 8 kv heads, SwiGLU
14336, vocab 128256) with random bf16 weights built once in memory (seed 0) and used by
every variant; the HF baseline (``LlamaForCausalLM``, sdpa, static batching) gets copies
of the same weights. Parts (``--parts a,b,c,d``):

- a: output tokens/s at 1/16/64/256 concurrent requests (prompt 512, output 128,
     ignore_eos), engine vs HF ``generate`` at 1/16/64;
- b: batch-1 decode tokens/s vs the weight-bandwidth bound (weight bytes / 4.3e12 B/s),
     overlapped steps, fused kernels and PDL on and off; the decode graph's GPU time
     with cuBLAS vs the one-row GEMV (``b_graph``); ``--b-down-sweep``: the down
     projection's GEMV launches timed in that graph;
- c: Poisson arrivals at a few rates (``--c-seconds`` of arrivals each): p50/p99 TTFT
     and TPOT and effective throughput (the most requests/s served at a rate the engine
     kept up with, with p99 TTFT <= prompt/512 s and p99 TPOT <= 50 ms), Dynamic
     SplitFuse vs prefill-first, on 512/128 and FastGen's 2600/60 workload;
- d: FP6 weights (e3m2; e3m2-a8: e4m3 activations in prefill) vs bf16: batch-1
     decode and throughput at saturation (``--d-formats``, each spec optionally with
     ``@fp16`` activations and ``+head`` for an FP6 head; ``--d-breakdown``: the
     batch-1 decode graph without its quantized products, then without any);
- e: tensor parallel over a torchrun world (alone): batch-1 decode and part a's
     throughput, ``torchrun --nproc-per-node N bench/serve.py --parts e``.

Before timing, the Triton paged attention is checked against its torch reference at
the real shapes, and the engine's greedy tokens against HF's (match fraction printed).
Rows print as measured; JSON (device, date, command, rows) goes to ``$OUT/serve.json``
or ``bench/results/serve_<date>.json``, the latency-throughput plot beside it (PNG).

Usage::

    python bench/serve.py                      # all parts, ~6-8 min on an H200
    python bench/serve.py --parts a,b --layers 8
    python bench/serve.py --tiny               # CPU smoke test of every code path
    python bench/serve.py --profile            # per-step host/GPU breakdown + top kernels
    python bench/serve.py --profile --profile-formats bf16,e3m2-a8 --profile-batches 1
    python bench/serve.py --parts d --d-formats bf16,e3m2-a8+head@fp16 --d-breakdown
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)

from fscale.kernels import fpx_triton, gemv  # noqa: E402
from fscale.kernels import paged_attention as pa  # noqa: E402
from fscale.kernels._triton import describe_launch, pdl  # noqa: E402
from fscale.serve import Engine, SamplingParams  # noqa: E402
from fscale.serve.models.decoder import DecoderConfig, LoadedModel  # noqa: E402
from fscale.transforms.quantize import QuantizedWeight  # noqa: E402

HBM = 4.3e12  # B/s, measured HBM copy bandwidth on the H200 (DESIGN.md section 7)
ROWS: list[dict] = []


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def config(args) -> DecoderConfig:
    if args.tiny:
        return DecoderConfig("llama", 512, 64, 2, 4, 2, 16, 128, 4096, rope_theta=500000.0)
    return DecoderConfig(
        "llama", 128256, 4096, args.layers, 32, 8, 128, 14336, 8192, rope_theta=500000.0
    )


def build_weights(cfg: DecoderConfig, device, dtype) -> LoadedModel:
    """Random weights in the engine's layout (fused qkv / gate_up), seed 0."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(
            dtype
        )

    d, q, kv = cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = {
        "embed.weight": rnd(cfg.vocab_size, d),
        "norm.weight": torch.ones(d, device=device, dtype=dtype),
    }
    p["head.weight"] = rnd(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p[f"layers.{i}.norm1.weight"] = torch.ones(d, device=device, dtype=dtype)
        p[f"layers.{i}.norm2.weight"] = torch.ones(d, device=device, dtype=dtype)
        p[f"layers.{i}.qkv.weight"] = rnd(q + 2 * kv, d)
        p[f"layers.{i}.o.weight"] = rnd(d, q)
        p[f"layers.{i}.gate_up.weight"] = rnd(2 * cfg.intermediate, d)
        p[f"layers.{i}.down.weight"] = rnd(d, cfg.intermediate)
    return LoadedModel(cfg, p, "llama-3.1-8b-shaped-random")


def hf_model(lm: LoadedModel, device, dtype):
    """``LlamaForCausalLM`` holding copies of ``lm``'s weights (None without transformers)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: HF baseline rows are skipped", flush=True)
        return None
    c = lm.config
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden,
        intermediate_size=c.intermediate,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_positions,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    P, q, kv = lm.params, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(P["embed.weight"])
        model.lm_head.weight.copy_(P["head.weight"])
        model.model.norm.weight.copy_(P["norm.weight"])
        for i, layer in enumerate(model.model.layers):
            wq, wk, wv = P[f"layers.{i}.qkv.weight"].split([q, kv, kv])
            layer.self_attn.q_proj.weight.copy_(wq)
            layer.self_attn.k_proj.weight.copy_(wk)
            layer.self_attn.v_proj.weight.copy_(wv)
            layer.self_attn.o_proj.weight.copy_(P[f"layers.{i}.o.weight"])
            gate, up = P[f"layers.{i}.gate_up.weight"].chunk(2)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(P[f"layers.{i}.down.weight"])
            layer.input_layernorm.weight.copy_(P[f"layers.{i}.norm1.weight"])
            layer.post_attention_layernorm.weight.copy_(P[f"layers.{i}.norm2.weight"])
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


# --prefill-graphs choices -> Engine(prefill_graphs=...)
GRAPH_CHOICES = {"auto": None, "on": True, "off": False}


def make_engine(lm, args, **kw) -> Engine:
    opts = dict(
        device=args.device,
        dtype=args.dtype,
        kv_cache_gib=args.kv_gib,
        max_model_len=args.max_model_len,
        max_num_seqs=256,
        cuda_graphs=args.device.type == "cuda",
        prefill_graphs=GRAPH_CHOICES[args.prefill_graphs],
    )
    opts.update(kw)
    t0 = time.perf_counter()
    engine = Engine(lm, **opts)
    print(f"  engine {kw} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return engine


def free() -> None:
    """Collect what the caller let go of (``del engine; free()``) and give its GPU memory
    back: an engine still named by the caller stays alive, and the next one's build
    would then hold two (an 80 GB card cannot)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- checks ---------------------------------------------------------------------------------


def check_attention(args) -> None:
    if args.device.type != "cuda":
        return
    torch.manual_seed(0)
    H, KVH, D, bs = 32, 8, 128, 16
    lens = [700, 1, 300, 513]
    qlens = [1, 1, 120, 64]
    nb = [-(-n // bs) for n in lens]
    kc = torch.randn(sum(nb) + 1, bs, KVH, D, device=args.device, dtype=args.dtype)
    vc = torch.randn_like(kc)
    perm = (torch.randperm(sum(nb)) + 1).tolist()
    bt = torch.zeros(len(lens), max(nb), dtype=torch.int32)
    for b, n in enumerate(nb):
        bt[b, :n] = torch.tensor([perm.pop() for _ in range(n)])
    q = torch.randn(sum(qlens), H, D, device=args.device, dtype=args.dtype)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    a = (
        q,
        kc,
        vc,
        bt.to(args.device),
        torch.tensor(lens, dtype=torch.int32, device=args.device),
        qsl.to(args.device),
    )
    kw = dict(scale=D**-0.5, max_query_len=max(qlens))
    err = (
        (
            pa.paged_attention_triton(*a, **kw).float()
            - pa.paged_attention_reference(*a, **kw).float()
        )
        .abs()
        .max()
    )
    # Decode batches take the split-K decode kernel: B=4 (mixed lengths) and B=1.
    dec = (q[:4], kc, vc, a[3], a[4], torch.arange(5, dtype=torch.int32, device=args.device))
    kw1 = dict(scale=D**-0.5, max_query_len=1)
    for rows in (4, 1):
        d = (dec[0][:rows], kc, vc, dec[3][:rows], dec[4][:rows], dec[5][: rows + 1])
        e = (
            (
                pa.paged_attention_triton(*d, **kw1).float()
                - pa.paged_attention_reference(*d, **kw1).float()
            )
            .abs()
            .max()
        )
        err = max(err, e)
    emit(
        {"part": "check", "what": "paged_attention triton vs reference", "max_abs_err": float(err)}
    )
    if err > 5e-2:
        raise SystemExit(f"paged_attention Triton kernel disagrees with the reference: {err}")


def check_greedy(lm, hf, args) -> None:
    if hf is None:
        return
    engine = make_engine(lm, args, max_tokens_per_step=512)
    ps = prompts(2, 64, lm.config.vocab_size, 1)
    outs = engine.generate(ps, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    same = total = 0
    with torch.no_grad():
        for p, o in zip(ps, outs, strict=True):
            ref = hf.generate(
                torch.tensor([p], device=args.device),
                do_sample=False,
                max_new_tokens=16,
                min_new_tokens=16,
            )[0, len(p) :].tolist()
            # Count the matching prefix: bf16 rounding may flip a near-tie later on.
            k = next(
                (i for i, (x, y) in enumerate(zip(ref, o.token_ids, strict=True)) if x != y), 16
            )
            same, total = same + k, total + 16
    emit(
        {
            "part": "check",
            "what": "engine greedy vs HF generate (matching prefix)",
            "fraction": same / total,
        }
    )
    del engine
    free()


# -- parts ----------------------------------------------------------------------------------


def run_batch(engine, ps, out_len) -> float:
    sync(engine.device)
    t0 = time.perf_counter()
    engine.generate(ps, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    sync(engine.device)
    return time.perf_counter() - t0


def throughput(engine, c: int, args) -> dict:
    """Output tokens/s of ``c`` concurrent requests (prompt, output of ``args``): the
    median of ``args.a_repeat`` runs, each on fresh prompts (single runs swing by %)."""
    V = engine.model_config.vocab_size
    runs = [
        run_batch(engine, prompts(c, args.prompt, V, c + i), args.output)
        for i in range(args.a_repeat)
    ]
    dt = statistics.median_low(runs)
    return {
        "concurrency": c,
        "seconds": dt,
        "output_tok_s": c * args.output / dt,
        "runs_output_tok_s": [c * args.output / t for t in runs],
    }


def part_a(lm, hf, args) -> None:
    V = lm.config.vocab_size
    if hf is not None:
        for c in args.hf_concurrency:
            ids = torch.tensor(prompts(c, args.prompt, V, c), device=args.device)
            with torch.no_grad():
                hf.generate(ids[:, :8], do_sample=False, max_new_tokens=2)  # warm-up
                sync(args.device)
                t0 = time.perf_counter()
                hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=args.output,
                    min_new_tokens=args.output,
                )
                sync(args.device)
            dt = time.perf_counter() - t0
            emit(
                {
                    "part": "a",
                    "system": "hf_generate",
                    "concurrency": c,
                    "seconds": dt,
                    "output_tok_s": c * args.output / dt,
                }
            )
    # The defaults (fused kernels, overlapped steps, prefill graphs where the engine's
    # policy takes them) at every concurrency; A/B at the high ones, same weights: without
    # overlap (the policy then captures prefill graphs), with the prefill graphs forced
    # on, and the eager decoder. Each point is the median of ``args.a_repeat`` runs (single runs
    # of 1-6 s swing by several %).
    variants = (
        ({}, args.concurrency),
        ({"overlap": False}, args.ab_concurrency),
        ({"prefill_graphs": True}, args.ab_concurrency),
        ({"fused_kernels": False}, args.ab_concurrency),
    )
    for kw, conc in variants:
        if not conc:
            continue
        engine = make_engine(lm, args, max_tokens_per_step=args.budget, **kw)
        run_batch(engine, prompts(2, 16, V, 0), 4)  # warm-up (kernels compile)
        for c in conc:
            measured = throughput(engine, c, args)
            emit(
                {
                    "part": "a",
                    "system": "fscale.serve",
                    "fused_kernels": engine.decoder.fused is not None,
                    "prefill_graphs": bool(engine.runner.mixed_sizes),
                    "overlap": engine.overlap,
                    "scheduler": "splitfuse",
                    "budget": args.budget,
                    **measured,
                    "preempted": engine.stats()["num_preempted_total"],
                }
            )
        del engine
        free()


def weight_bytes(lm: LoadedModel) -> int:
    """Bytes one decode step reads: every weight but the embedding table (one row)."""
    seen, n = set(), 0
    for k, v in lm.params.items():
        if k == "embed.weight" or id(v) in seen:
            continue
        seen.add(id(v))
        n += getattr(v, "packed_nbytes", None) or v.numel() * v.element_size()
    return n


def decode_rate(engine, args, vocab) -> float:
    """Batch-1 decode tokens/s: output tokens over the wall time of the steps after the
    first two tokens (no sync between steps: overlapped steps keep theirs)."""
    engine.add_request(
        "b1",
        prompts(1, 128, vocab, 7)[0],
        SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True),
    )
    n, t0, base = 0, None, 0
    while engine.has_unfinished():
        n += sum(len(o.new_token_ids) for o in engine.step())
        if t0 is None and n >= 2:
            sync(engine.device)
            t0, base = time.perf_counter(), n
    sync(engine.device)
    return (n - base) / (time.perf_counter() - t0)


def decode_graph_ms(engine, linear) -> float:
    """GPU time of one replay of ``engine``'s batch-1 decode graph, recaptured with the
    decoder's linears set to ``linear`` (median of 30, ms); the KV holds the request
    ``decode_rate`` left (its blocks were released but not cleared)."""
    dec, runner = engine.decoder, engine.runner
    keep = dec.linear
    dec.linear = linear
    runner.graphs, runner.graph_sizes = {}, []
    runner._capture(8)
    g = runner.graphs[1][0]
    times = []
    for _ in range(33):
        sync(engine.device)
        t0 = time.perf_counter()
        g.replay()
        sync(engine.device)
        times.append(time.perf_counter() - t0)
    dec.linear = keep
    return statistics.median(times[3:]) * 1e3


def down_sweep(engine) -> None:
    """The down projection's GEMV launch configs (``gemv_launch(config=)``) and cuBLAS,
    each timed as the whole batch-1 decode graph (``decode_graph_ms``, the other
    linears on their defaults): in the engine's graph, with PDL and the neighbouring
    kernels, rather than alone (``bench/gemv.py``)."""

    def with_down(down):
        def linear(x, w, b=None):
            if gemv.covers(x, w) and w.shape[1] > 8192:  # only the 14336-wide product
                return down(x, w, b)
            return gemv.gemv_triton(x, w, b)

        return linear

    times = []
    for conf in itertools.product((2, 4, 8), (256, 512), (4, 8), (1, 2, 3, 4)):
        down = functools.partial(gemv.gemv_launch, config=conf)
        times.append((decode_graph_ms(engine, with_down(down)), conf))
    times.sort()
    emit(
        {
            "part": "b_down_sweep",
            "down_config": gemv._config(4096, 14336),
            "default_ms": decode_graph_ms(engine, gemv.gemv_triton),
            "cublas_down_ms": decode_graph_ms(engine, with_down(F.linear)),
            "best": times[:8],
        }
    )


def part_b(lm, args) -> None:
    bound = HBM / weight_bytes(lm)
    prior = os.environ.get("FSCALE_PDL")
    # A/B: overlapped steps, fused kernels and programmatic dependent launch (the CUDA
    # defaults), then each turned off.
    for fused, overlap, use_pdl in (
        (True, True, True),
        (True, True, False),
        (True, False, True),
        (False, False, True),
    ):
        os.environ["FSCALE_PDL"] = "1" if use_pdl else "0"  # read at launch and capture
        engine = make_engine(
            lm, args, max_tokens_per_step=args.budget, fused_kernels=fused, overlap=overlap
        )
        rate = decode_rate(engine, args, lm.config.vocab_size)
        emit(
            {
                "part": "b",
                "weights": "bf16",
                "fused_kernels": engine.decoder.fused is not None,
                "overlap": engine.overlap,
                "pdl": pdl(engine.device),
                "decode_tok_s": rate,
                "step_ms": 1e3 / rate,
                "bandwidth_bound_tok_s": bound,
                "fraction_of_bound": rate / bound,
            }
        )
        if fused and overlap and engine.device.type == "cuda" and engine.runner.graph_sizes:
            emit(  # the same graph with every linear on cuBLAS, then the default policy
                {
                    "part": "b_graph",
                    "pdl": pdl(engine.device),
                    "cublas_ms": decode_graph_ms(engine, F.linear),
                    "gemv_ms": decode_graph_ms(engine, gemv.gemv_triton),
                }
            )
            if args.b_down_sweep and use_pdl:
                down_sweep(engine)
        del engine
        free()
    os.environ.pop("FSCALE_PDL")
    if prior is not None:
        os.environ["FSCALE_PDL"] = prior


KEPT_UP = 0.95  # an engine serving less of what arrived in the window is falling behind


def poisson(engine, ps, out_len, rate, seed) -> dict:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in ps:
        t += rng.expovariate(rate)
        arrivals.append(t)
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    first, last, i = {}, {}, 0
    sync(engine.device)
    t0 = time.perf_counter()
    while i < len(ps) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(ps) and arrivals[i] <= now:
            engine.add_request(str(i), ps[i], params)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)))
            continue
        # No sync here: a step's outputs are on the host when step() returns them, and
        # a sync would stop the overlapped engine queueing its next forward (as a server
        # would not).
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            r = int(o.request_id)
            first.setdefault(r, now)
            if o.finished:
                last[r] = now
    wall = time.perf_counter() - t0
    # [Note: served within the arrivals] The rate the engine serves is counted over the
    # last three quarters of the arrivals (the first quarter fills the engine): requests
    # finished there against requests arrived there. Over a whole run the drain after
    # the last arrival (a full request's latency) lowers requests/wall below the offered
    # rate of an engine that keeps up, and an engine that does not keep up can still
    # pass the TTFT SLO for a run of a few seconds while its queue grows.
    t_end = arrivals[-1]
    t_start = t_end / 4
    arrived = sum(t_start < a <= t_end for a in arrivals)
    done = sum(t_start < f <= t_end for f in last.values())
    window = max(t_end - t_start, 1e-9)
    ttft = sorted(first[r] - arrivals[r] for r in range(len(ps)))
    tpot = sorted((last[r] - first[r]) / max(1, out_len - 1) for r in range(len(ps)))

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "achieved_req_s": len(ps) / wall,
        # An engine cannot serve more than arrives: finishing the first quarter's
        # backlog inside the window is not throughput.
        "served_req_s": min(done, arrived) / window,
        "arrived_req_s": arrived / window,
        "kept_up": done >= KEPT_UP * arrived,
        "output_tok_s": len(ps) * out_len / wall,
    }


def part_c(lm, args) -> None:
    V = lm.config.vocab_size
    for wname, (plen, olen, rates) in args.workloads.items():
        if args.c_workloads and wname not in args.c_workloads.split(","):
            continue
        # SplitFuse at each budget of --c-budgets (the budget trades TPOT for throughput,
        # so a deployment picks it for its SLOs, as FastGen does); prefill-first's budget
        # only has to hold a prompt.
        for sched, budget in (
            *(("splitfuse", b) for b in args.splitfuse_budgets),
            ("prefill_first", args.prefill_budget),
        ):
            engine = make_engine(lm, args, scheduler=sched, max_tokens_per_step=budget)
            run_batch(engine, prompts(2, 16, V, 0), 4)
            # Effective throughput: the requests/s *served* within the SLOs (not the
            # offered rate: past saturation the engine falls behind the arrivals).
            best = best_offered = 0.0
            for rate in args.c_rates.get(f"{wname}:{sched}", args.c_rates.get(wname, rates)):
                # Arrivals over --c-seconds at each rate: a run of a few seconds past
                # the engine's capacity ends before its queue grows, and its p99 TTFT
                # then passes an SLO that a longer stream of arrivals breaks.
                n = max(args.requests, math.ceil(rate * args.c_seconds))
                ps = prompts(n, plen, V, int(rate * 100))
                r = poisson(engine, ps, olen, rate, seed=1)
                ok = r["ttft_p99"] <= plen / 512 and r["tpot_p99"] <= 0.050
                if ok and r["kept_up"]:
                    best, best_offered = max(best, r["served_req_s"]), max(best_offered, rate)
                emit(
                    {
                        "part": "c",
                        "workload": wname,
                        "scheduler": sched,
                        "budget": budget,
                        "rate": rate,
                        "requests": n,
                        "slo_met": ok,
                        **r,
                    }
                )
            emit(
                {
                    "part": "c",
                    "workload": wname,
                    "scheduler": sched,
                    "budget": budget,
                    "effective_req_s": best,
                    "best_offered_req_s": best_offered,
                }
            )
            del engine
            free()


def part_e(lm, args) -> None:
    """Tensor parallel over the torchrun world (every rank calls this): batch-1 decode
    and output tokens/s at part a's concurrencies. Rank 0 takes the requests, the other
    ranks follow its steps ([Note: one engine loop on every rank] in parallel.py)."""
    engine = make_engine(lm, args, max_tokens_per_step=args.budget, tensor_parallel="world")
    if not engine.is_leader:
        engine.follow()
        return
    V, tp = lm.config.vocab_size, engine.tp.size
    rate = decode_rate(engine, args, V)
    mine = weight_bytes(LoadedModel(lm.config, engine.decoder.params, ""))
    emit(
        {
            "part": "e",
            "tensor_parallel": tp,
            "concurrency": 1,
            "decode_tok_s": rate,
            "weight_bytes_per_rank": mine,  # vocab-parallel embedding and head included
            "weight_bytes_whole": weight_bytes(lm),
        }
    )
    run_batch(engine, prompts(2, 16, V, 0), 4)  # warm-up
    for c in args.concurrency:
        emit({"part": "e", "tensor_parallel": tp, **throughput(engine, c, args)})
    engine.shutdown()


def graph_breakdown(engine) -> dict:
    """The batch-1 decode graph's GPU time (ms, ``decode_graph_ms``) as the engine runs
    it, with its quantized products left out (an empty output of their shape) and with
    every product left out: what the products cost where they run, beside the
    neighbouring kernels, in one graph. The engine's graphs are recaptured as they were
    last. (Products ending in the SwiGLU epilogue, FSCALE_FPX_SWIGLU=1, do not go
    through ``decoder.linear`` and stay in.)"""
    if engine.device.type != "cuda":
        print("  --d-breakdown: decode graphs are CUDA only; skipped", flush=True)
        return {}
    keep = engine.decoder.linear

    def skip(quantized_only):
        def linear(x, w, b=None):
            if quantized_only and not isinstance(w, QuantizedWeight):
                return keep(x, w, b)
            return x.new_empty(*x.shape[:-1], w.shape[0])

        return linear

    no_quantized = decode_graph_ms(engine, skip(True))
    no_products = decode_graph_ms(engine, skip(False))
    return {
        "graph_ms": decode_graph_ms(engine, keep),
        "graph_ms_without_quantized_products": no_quantized,
        "graph_ms_without_products": no_products,
    }


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def d_variant(spec: str) -> tuple[str | None, torch.dtype | None, bool, str | None, str | None]:
    """A part-d weights spec -> (fs.quantize format or None, engine dtype or None for the
    run's, quantize_head, FSCALE_FPX_SWIGLU for its run or None to leave it,
    FSCALE_TUNE_STREAMED for its engine or None to leave it): "bf16" plain weights in
    the run's dtype, "fp16" plain fp16, "e3m2-a8" FP6, "e3m2-a8@fp16" FP6 with fp16
    activations (as FP6-LLM and DeepSpeed's wf6af16 run it), "e3m2-a8+head" with the
    head in FP6 too, "+swiglu" / "+noswiglu" with the FPx SwiGLU epilogue on / off
    (e3m2-a8+head+noswiglu@fp16), "+l2tune" / "+hbmtune" with the FPx launches tuned
    on one L2-resident weight / on copies streamed from HBM ([Note: tuning on
    streamed weights]; either one tunes its engine's launches afresh)."""
    name, _, dt = spec.partition("@")
    if dt and dt not in DTYPES:
        raise SystemExit(f"--d-formats {spec!r}: the dtype after @ must be one of {list(DTYPES)}")
    name, *flags = name.split("+")
    unknown = set(flags) - {"head", "swiglu", "noswiglu", "l2tune", "hbmtune"}
    if unknown:
        raise SystemExit(f"--d-formats {spec!r}: unknown +{sorted(unknown)[0]}; use +head, "
                         "+swiglu, +noswiglu, +l2tune or +hbmtune")  # fmt: skip
    swiglu = "1" if "swiglu" in flags else "0" if "noswiglu" in flags else None
    tune = "0" if "l2tune" in flags else "1" if "hbmtune" in flags else None
    dtype = DTYPES[dt] if dt else torch.float16 if name == "fp16" else None
    return (None if name in DTYPES else name), dtype, "head" in flags, swiglu, tune


def part_d(lm, args) -> None:
    """FP6 vs bf16 at a smaller engine (max_num_seqs / budget ``args.d_seqs`` /
    ``args.d_budget``): every graph bucket and prefill size is an M the FPx kernels tune
    on first use (~15 launches timed per weight shape), so fewer of them keep this part
    to a few minutes."""
    V = lm.config.vocab_size
    t_start = time.perf_counter()

    def progress(what):
        print(f"  part d: {what} (+{time.perf_counter() - t_start:.0f} s)", flush=True)

    variants = [
        (*d_variant(f), GRAPH_CHOICES[pg])
        for f in args.d_formats.split(",")
        for pg in args.d_prefill_graphs.split(",")
    ]
    for fmt, dtype, head, swiglu, tune, graphs in variants:
        if swiglu is not None:  # read by the decoder at each forward: set for the whole run
            os.environ["FSCALE_FPX_SWIGLU"] = swiglu
        if tune is not None:  # read when a launch is tuned: tune this engine's afresh
            os.environ["FSCALE_TUNE_STREAMED"] = tune
            fpx_triton.clear_tuned()
        dtype = dtype or args.dtype
        act = str(dtype).removeprefix("torch.")
        name = f"{fmt or 'plain'}{'+head' if head else ''}@{act}"
        name += {"1": " +swiglu", "0": " +noswiglu"}.get(swiglu, "")
        name += {"1": " +hbmtune", "0": " +l2tune"}.get(tune, "")
        progress(f"{name}: building the engine (tunes FPx launches per M bucket)")
        engine = make_engine(
            lm,
            args,
            dtype=dtype,
            quantize=fmt,
            quantize_head=head,
            max_tokens_per_step=args.d_budget,
            max_num_seqs=args.d_seqs,
            prefill_graphs=graphs,
        )
        progress(f"{name}: warm-up")
        run_batch(engine, prompts(2, 16, V, 0), 4)
        progress(f"{name}: batch-1 decode, {args.d_repeat} times")
        rates = [decode_rate(engine, args, V) for _ in range(args.d_repeat)]
        c = args.saturation
        progress(f"{name}: {c} requests at saturation, {args.d_repeat} times")
        runs = [
            run_batch(engine, prompts(c, args.prompt, V, c + i), args.output)
            for i in range(args.d_repeat)
        ]
        dt = statistics.median_low(runs)  # the median run (a run is ~2 s: noisy alone)
        graph = graph_breakdown(engine) if args.d_breakdown else {}
        emit(
            {
                "part": "d",
                **graph,
                "weights": fmt or act,
                "activations": act,
                "quantized_head": head,
                "fpx_swiglu": os.environ.get("FSCALE_FPX_SWIGLU", "default"),
                "fpx_tune_streamed": os.environ.get("FSCALE_TUNE_STREAMED", "default"),
                "fpx_launches": {  # this process's decode launches (tuned at first use)
                    f"{n}x{k} M<={b}": describe_launch(cfg)
                    for (_, n, k, b, _), cfg in fpx_triton.tuned().items()
                    if b <= 16 and fmt
                },
                "prefill_graphs": bool(engine.runner.mixed_sizes),
                "decode_tok_s": statistics.median_low(rates),
                "decode_runs_tok_s": rates,
                "weight_bytes": weight_bytes(LoadedModel(lm.config, engine.decoder.params, "")),
                "saturation_concurrency": c,
                "saturation_output_tok_s": c * args.output / dt,
                "saturation_runs_output_tok_s": [c * args.output / t for t in runs],
                "max_num_seqs": args.d_seqs,
                "budget": args.d_budget,
            }
        )
        del engine
        free()
    progress("done")


# -- profile --------------------------------------------------------------------------------


def _timed_step(engine, acc: dict) -> None:
    """One engine.step() with its pieces timed (ms, summed into ``acc``): schedule, run
    (host: inputs + launch), forward (waiting for the GPU), sample (on the device) and
    outputs (the rest: the D2H copy, bookkeeping, detokenize, output objects). The
    engine runs synchronous steps (overlap=False): the breakdown times each piece."""
    import fscale.serve.engine as eng

    dev = engine.device
    sched, run, smp = engine.scheduler.schedule, engine.runner.run, eng.sample_tokens
    marks = {}

    def t_sched():
        t = time.perf_counter()
        out = sched()
        marks["schedule"] = time.perf_counter() - t
        return out

    def t_run(batch, last_tokens=None):
        t = time.perf_counter()
        out = run(batch, last_tokens)
        marks["run_host"] = time.perf_counter() - t
        t = time.perf_counter()
        sync(dev)
        marks["forward_wait"] = time.perf_counter() - t
        return out

    def t_sample(*a, **k):
        t = time.perf_counter()
        out = smp(*a, **k)
        marks["sample"] = time.perf_counter() - t
        return out

    engine.scheduler.schedule, engine.runner.run, eng.sample_tokens = t_sched, t_run, t_sample
    try:
        sync(dev)
        t0 = time.perf_counter()
        engine.step()
        total = time.perf_counter() - t0
    finally:
        del engine.scheduler.schedule, engine.runner.run
        eng.sample_tokens = smp
    marks["outputs_etc"] = total - sum(marks.values())
    marks["total"] = total
    for k, v in marks.items():
        acc.setdefault(k, []).append(v * 1e3)


def _top_kernels(engine, steps: int, n: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if engine.device.type == "cuda" else []
    )
    sync(engine.device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        sync(engine.device)
    rows = []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", 0)
        if dev_t > 0:
            rows.append(
                {
                    "kernel": e.key[:90],
                    "calls_per_step": e.count / steps,
                    "us_per_step": dev_t / steps,
                }
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    print("  top CPU ops (self ms per step):", flush=True)
    for e in cpu:
        ms = e.self_cpu_time_total / steps / 1e3
        print(f"    {ms:8.3f} ms  x{e.count / steps:6.1f}  {e.key[:80]}", flush=True)
    return rows[:n], sum(r["us_per_step"] for r in rows)


def profile(lm, args) -> None:
    """Per-step breakdown of decode steps at each batch in ``args.profile_batches``,
    fused kernels vs the eager decoder, and the top CUDA kernels per step; for each
    weight format of ``--profile-formats`` (quantized ones with fused kernels only, at
    part d's engine size: every graph bucket is an M their kernels tune on)."""
    V = lm.config.vocab_size
    for fmt in args.profile_formats.split(","):
        quant = None if fmt == "bf16" else fmt
        for fused in (True,) if quant else (True, False):
            kw = dict(max_tokens_per_step=args.budget, fused_kernels=fused, overlap=False)
            if quant:
                kw.update(
                    quantize=quant, max_tokens_per_step=args.d_budget, max_num_seqs=args.d_seqs
                )
            _profile_engine(make_engine(lm, args, **kw), args, V, fmt)


def _profile_engine(engine, args, V: int, fmt: str) -> None:
    """Decode steps at each batch of ``args.profile_batches``: timed pieces, top kernels."""
    run_batch(engine, prompts(2, 16, V, 0), 4)  # warm-up
    for B in args.profile_batches:
        params = SamplingParams(max_tokens=args.max_model_len - 129, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(B, 128, V, 3)):
            engine.add_request(f"p{B}-{i}", p, params)
        while any(s.num_computed < s.num_prompt for s in engine._seqs.values()):
            engine.step()  # prefill
        for _ in range(3):
            engine.step()
        acc: dict = {}
        for _ in range(args.profile_steps):
            _timed_step(engine, acc)
        med = {k: sorted(v)[len(v) // 2] for k, v in acc.items()}
        emit(
            {
                "part": "profile",
                "weights": fmt,
                "fused_kernels": engine.decoder.fused is not None,
                "batch": B,
                "median_ms": med,
            }
        )
        top, gpu_us = _top_kernels(engine, args.profile_trace_steps, n=30)
        emit(
            {
                "part": "profile",
                "weights": fmt,
                "fused_kernels": engine.decoder.fused is not None,
                "batch": B,
                "gpu_us_per_step": gpu_us,
                "top_kernels": top,
            }
        )
        for rid in list(engine._seqs):
            engine.abort(rid)
        engine.step()
    del engine
    free()


# -- output ---------------------------------------------------------------------------------


def plot(path: Path, rows: list[dict] | None = None) -> None:
    """Part c's p99 TTFT and TPOT against the offered request rate, one line per
    workload, scheduler and budget (``rows``: this run's, or a results JSON's)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    rows = [r for r in (ROWS if rows is None else rows) if r["part"] == "c" and "rate" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for w, s, b in sorted({(r["workload"], r["scheduler"], r["budget"]) for r in rows}):
        rs = sorted(
            (r for r in rows if (r["workload"], r["scheduler"], r["budget"]) == (w, s, b)),
            key=lambda r: r["rate"],
        )
        x = [r["rate"] for r in rs]
        axes[0].plot(x, [r["ttft_p99"] for r in rs], "o-", label=f"{w} {s} {b}")
        axes[1].plot(x, [r["tpot_p99"] * 1e3 for r in rs], "o-", label=f"{w} {s} {b}")
    axes[0].set(xlabel="offered requests/s", ylabel="p99 TTFT (s)", yscale="log", xscale="log")
    axes[1].set(xlabel="offered requests/s", ylabel="p99 TPOT (ms)", xscale="log")
    axes[1].axhline(50, color="gray", ls="--")  # the TPOT SLO
    axes[0].legend(fontsize=7)
    fig.suptitle("fscale.serve: latency vs offered load (Poisson arrivals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke test)")
    ap.add_argument("--kv-gib", type=float, default=40.0)
    ap.add_argument("--a-repeat", type=int, default=3, help="part a: runs per point (median)")
    ap.add_argument(
        "--c-budgets", help="part c: SplitFuse token budgets, comma-separated (default 1024)"
    )
    ap.add_argument("--c-workloads", help="part c: only these workloads (512/128, fastgen)")
    ap.add_argument(
        "--c-seconds",
        type=float,
        help="part c: each rate's arrivals span about this many seconds (GPU: 20)",
    )
    ap.add_argument(
        "--c-rates",
        default="",
        help="part c: offered rates per workload, or per workload and scheduler, e.g. "
        "'fastgen=8,10,12;fastgen:prefill_first=6,7;512/128=32,48'",
    )
    ap.add_argument(
        "--b-down-sweep",
        action="store_true",
        help="part b: also time the down projection's GEMV configs in the decode graph",
    )
    ap.add_argument("--d-repeat", type=int, default=5, help="part d: saturation runs (median)")
    ap.add_argument(
        "--prefill-graphs",
        default="auto",
        choices=list(GRAPH_CHOICES),
        help="parts a-c: Engine(prefill_graphs=...), piecewise graphs of prefill steps",
    )
    ap.add_argument(
        "--d-prefill-graphs",
        default="auto",
        help="part d: 'auto', 'off', 'on' or several, e.g. 'off,on' (Engine(prefill_graphs="
        "...): None, False, True; side by side)",
    )
    ap.add_argument("--d-seqs", dest="set_d_seqs", type=int, help="part d: max_num_seqs (32)")
    ap.add_argument("--d-budget", dest="set_d_budget", type=int, help="part d: token budget (512)")
    ap.add_argument(
        "--saturation", dest="set_saturation", type=int, help="part d: concurrent requests (32)"
    )
    ap.add_argument(
        "--d-formats",
        default="bf16,e3m2,e3m2-a8",
        help="part d's weights: bf16, fp16 and fs.quantize formats (e3m2-a8: W6A8 "
        "prefill), each with an optional @bf16/@fp16 activation dtype (e3m2-a8@fp16) and "
        "+head for the head quantized too (e3m2-a8+head@fp16)",
    )
    ap.add_argument(
        "--d-breakdown",
        action="store_true",
        help="part d: also time the batch-1 decode graph without its (quantized) products",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="per-step host/GPU breakdown at B=1 and B=64 (fused and eager) and the top "
        "CUDA kernels; runs instead of the parts",
    )
    ap.add_argument(
        "--profile-formats",
        default="bf16",
        help="--profile's weights: bf16 and fs.quantize formats, e.g. bf16,e3m2-a8",
    )
    ap.add_argument(
        "--profile-batches",
        dest="profile_batches_set",
        help="--profile's decode batches, e.g. 1,64 (the default)",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.tiny:
        args.device, args.dtype = torch.device("cpu"), torch.float32
        args.kv_gib, args.max_model_len = 0.05, 1024
        args.prompt, args.output, args.concurrency, args.hf_concurrency = 32, 8, [1, 4], [1, 4]
        args.budget, args.splitfuse_budget, args.prefill_budget = 64, 32, 128
        args.workloads = {"512/128": (32, 8, [20.0]), "fastgen": (100, 4, [10.0])}
        args.requests, args.decode_tokens, args.saturation = 4, 12, 4
        args.ab_concurrency, args.d_seqs, args.d_budget = [4], 4, 64
        args.profile_batches, args.profile_steps, args.profile_trace_steps = [1, 4], 5, 2
    else:
        args.device, args.dtype = torch.device("cuda"), torch.bfloat16
        args.max_model_len = 4096
        args.prompt, args.output = 512, 128
        args.concurrency, args.hf_concurrency = [1, 16, 64, 256], [1, 16, 64]
        args.budget, args.splitfuse_budget, args.prefill_budget = 2048, 1024, 4096
        args.workloads = {
            # Rates fine enough around each scheduler's knee to say which serves more
            # within the SLOs, and past both (2026-12-06, ~20 s of arrivals per rate
            # on an H100: FastGen's workload, prefill-first's TPOT breaks at 8 req/s,
            # SplitFuse at budget 1,536 holds to its ceiling near 12; 512/128, both
            # reach the ceiling near 45).
            "512/128": (512, 128, [32.0, 40.0, 44.0, 48.0, 56.0]),
            "fastgen": (2600, 60, [5.0, 6.0, 7.0, 8.0, 10.0, 11.0, 12.0, 13.0]),
        }
        args.requests, args.decode_tokens, args.saturation = 48, 128, 32
        args.ab_concurrency, args.d_seqs, args.d_budget = [64, 256], 32, 512
        args.profile_batches, args.profile_steps, args.profile_trace_steps = [1, 64], 30, 5
    if args.c_seconds is None:
        args.c_seconds = 2.0 if args.tiny else 20.0
    args.c_rates = {
        name: [float(r) for r in rates.split(",")]
        for name, rates in (w.split("=") for w in args.c_rates.split(";") if w)
    }
    args.splitfuse_budgets = (
        [int(b) for b in args.c_budgets.split(",")] if args.c_budgets else [args.splitfuse_budget]
    )
    if args.profile_batches_set:
        args.profile_batches = [int(b) for b in args.profile_batches_set.split(",")]
    for name in ("d_seqs", "d_budget", "saturation"):  # part d's engine, from the command line
        if getattr(args, f"set_{name}") is not None:
            setattr(args, name, getattr(args, f"set_{name}"))
    leader = True
    if "e" in parts:  # under torchrun: one GPU (or gloo CPU rank) per process
        if parts != {"e"}:
            ap.error("--parts e (tensor parallel, under torchrun) runs alone")
        from fscale.hw.launch import init_distributed

        rank, _, args.device = init_distributed(args.device.type)
        leader = rank == 0
    cfg = config(args)
    print(f"{cfg}\nparts {sorted(parts)} on {args.device}", flush=True)
    lm = build_weights(cfg, args.device, args.dtype)
    if args.profile:
        profile(lm, args)
        return
    if "e" in parts:
        part_e(lm, args)
        if not leader:
            return
    if "e" not in parts:
        check_attention(args)
        hf = hf_model(lm, args.device, args.dtype) if "a" in parts or args.tiny else None
        check_greedy(lm, hf, args)
    if "a" in parts:
        part_a(lm, hf, args)
    hf = None
    free()
    if "b" in parts:
        part_b(lm, args)
    if "c" in parts:
        part_c(lm, args)
    if "d" in parts:
        part_d(lm, args)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = (
        "serve.json"
        if os.environ.get("OUT")
        else f"serve_{date}{'_tiny' if args.tiny else ''}.json"
    )
    result = {"bench": "serve", **provenance(args.device), "layers": cfg.num_layers, "rows": ROWS}
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}", flush=True)
    plot(out / name.replace(".json", ".png"))


if __name__ == "__main__":
    main()
