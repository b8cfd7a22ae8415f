"""Decode tokens/s of a 7B-shaped decoder: fp16 weights against fp6 / fp5 / fp4 / int4 / int8.

A LLaMA-7B-shaped stack (32 layers, d=4096, 32 heads, SwiGLU 11008; random weights,
RMSNorm, no rotary embedding: it costs the same in every format) decodes one token
per sequence against a KV cache of ``--context`` positions, for batch 1 and 16. Every
linear layer runs through fscale's kernel table exactly as ``fs.quantize`` routes it
(``fpx_linear`` / ``int_linear``); fp16 is cuBLAS ``x @ w.t()``. One decode step
(all 32 layers) is captured in a CUDA graph per format and batch -- the way a serving
engine runs decoding, and the only fair way to compare: eager launches of ~230
kernels cost more host time than a 4 ms step has. The first eager call per shape
tunes the kernel launch (fpx and int kernels), before capture.

Before timing, each quantized stack's logits are checked against the same stack run
with the dequantized weights in fp16 (relative error of the last hidden state).

Usage (on a CUDA machine)::

    python bench/quant_decode.py [--layers 32] [--context 512]

Writes ``bench/results/quant_decode-<device>.json`` and, when ``$OUT`` is set,
``$OUT/quant_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _provenance import provenance  # noqa: E402  (bench/ is on sys.path)
from _source import import_kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


fpx, _, intq = import_kernels("fpx", "fpx_triton", "intq")  # fpx_triton: lowerings

D, HEADS, FFN = 4096, 32, 11008
FORMATS = ["fp16", "fp6", "fp5", "fp4", "int8", "int4"]
_FPX = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}


def quantize(w: torch.Tensor, fmt: str):
    """(weight object, linear function) for one [N, K] fp16 weight in ``fmt``."""
    if fmt == "fp16":
        return w, lambda x, w: x @ w.t()
    if fmt in _FPX:
        return fpx.pack(w.float(), _FPX[fmt]), fpx.fpx_linear
    bits = int(fmt[3:])
    return intq.pack_int(w.float(), bits=bits, group_size=128), intq.int_linear


def dense(w, fmt: str) -> torch.Tensor:
    """The fp16 weight a quantized one stands for (the check's reference)."""
    if fmt == "fp16":
        return w
    if fmt in _FPX:
        return fpx.unpack(w).half()
    return intq.unpack_int(w).half()


class Decoder:
    """Weights of every layer in one format, and one decode step over a static KV cache."""

    def __init__(self, layers: int, fmt: str, gen: torch.Generator, device):
        self.fmt, self.layers = fmt, []
        for _ in range(layers):
            shapes = {"qkv": (3 * D, D), "o": (D, D), "gate_up": (2 * FFN, D), "down": (D, FFN)}
            layer = {}
            for name, (n, k) in shapes.items():
                w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).half()
                layer[name], self.linear = quantize(w, fmt)
                del w
            self.layers.append(layer)

    def dense_copy(self) -> Decoder:
        copy = object.__new__(Decoder)
        copy.fmt, copy.linear = "fp16", lambda x, w: x @ w.t()
        copy.layers = [{k: dense(w, self.fmt) for k, w in layer.items()} for layer in self.layers]
        return copy

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            for w in layer.values():
                total += w.numel() * 2 if isinstance(w, torch.Tensor) else w.nbytes
        return total

    def step(self, x: torch.Tensor, cache: list) -> torch.Tensor:
        """x [B, D] fp16 -> [B, D]: one token per sequence through every layer."""
        b = x.shape[0]
        for layer, (k_cache, v_cache) in zip(self.layers, cache, strict=True):
            h = F.rms_norm(x, (D,))
            q, k, v = self.linear(h, layer["qkv"]).split(D, dim=-1)
            q = q.view(b, HEADS, 1, D // HEADS)
            # The new token's k, v go into the cache's last slot (a fixed context length
            # keeps the graph static; the cost is that of a context of that length).
            k_cache[:, :, -1] = k.view(b, HEADS, D // HEADS)
            v_cache[:, :, -1] = v.view(b, HEADS, D // HEADS)
            a = F.scaled_dot_product_attention(q, k_cache, v_cache).reshape(b, D)
            x = x + self.linear(a, layer["o"])
            h = F.rms_norm(x, (D,))
            gate, up = self.linear(h, layer["gate_up"]).split(FFN, dim=-1)
            x = x + self.linear(F.silu(gate) * up, layer["down"])
        return x


def time_graph(fn, iters: int) -> float:
    """Median ms of a captured ``fn`` replayed ``iters`` times (CUDA events per replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up (and the kernels' launch tuning) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_decode.py needs a CUDA device.")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    rows = []
    for fmt in args.formats.split(","):
        gen = torch.Generator(device=device).manual_seed(0)  # same weights in every format
        model = Decoder(args.layers, fmt, gen, device)
        row = {"format": fmt, "weight_bytes": model.nbytes()}
        check_gen = torch.Generator(device=device).manual_seed(1)
        for b in batches:
            x = torch.randn(b, D, device=device, generator=check_gen).half()
            shape = (b, HEADS, args.context, D // HEADS)
            cache = [
                (torch.randn(shape, device=device, generator=check_gen).half(),
                 torch.randn(shape, device=device, generator=check_gen).half())
                for _ in range(args.layers)
            ]  # fmt: skip
            if fmt != "fp16":
                ref_model = model.dense_copy()
                want = ref_model.step(x, [(k.clone(), v.clone()) for k, v in cache])
                del ref_model
                got = model.step(x, [(k.clone(), v.clone()) for k, v in cache])
                row[f"b{b}_rel_err_vs_dequantized"] = rel_err(got, want)
            ms = time_graph(lambda: model.step(x, cache), args.iters)  # noqa: B023
            row[f"b{b}_step_ms"] = ms
            row[f"b{b}_tokens_per_s"] = b / ms * 1e3
            row[f"b{b}_weight_GBps"] = model.nbytes() / ms / 1e6
            cache = None  # noqa: F841  (free before the next batch's cache)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        model = None  # noqa: F841
        torch.cuda.empty_cache()

    base = next((r for r in rows if r["format"] == "fp16"), None)
    for r in rows:
        for b in batches:
            if base is not None:
                r[f"b{b}_speedup_vs_fp16"] = base[f"b{b}_step_ms"] / r[f"b{b}_step_ms"]
    result = {
        "bench": "quant_decode",
        **provenance(device),
        "model": dict(layers=args.layers, d=D, heads=HEADS, ffn=FFN, context=args.context),
        "timer": "CUDA graph of one decode step, CUDA events, median of replays",
        "results": rows,
        "wall_s": time.time() - t0,
    }
    text = json.dumps(result, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "quant_decode.json").write_text(text)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (REPO / "bench" / "results" / f"quant_decode-{slug}.json").write_text(text)

    print(f"\n{name}: 7B-shaped decoder ({args.layers} layers), context {args.context}")
    hdr = f"{'format':>6} {'GB':>6}"
    for b in batches:
        hdr += f" {'b' + str(b) + ' ms':>9} {'tok/s':>8} {'x fp16':>7}"
    print(hdr)
    for r in rows:
        line = f"{r['format']:>6} {r['weight_bytes'] / 1e9:>6.2f}"
        for b in batches:
            line += f" {r[f'b{b}_step_ms']:>9.3f} {r[f'b{b}_tokens_per_s']:>8.0f}"
            line += f" {r.get(f'b{b}_speedup_vs_fp16', 1.0):>6.2f}x"
        print(line)


if __name__ == "__main__":
    main()
