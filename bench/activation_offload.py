"""Largest micro-batch and tokens/s with activation offload (``checkpoint_activations(offload=)``).

One GPU, the 1.4B GPT (24 x 2048, seq 2048), ``fs.mixed_precision(bf16)`` over
``fs.train_step(..., model=model)``, AdamW. For each config -- no checkpointing,
``"unit"``, ``"unit"`` + ``offload="cpu"``, ``"selective"`` + ``offload="cpu"`` (and on
request ``"none"`` + offload: nothing recomputed, every saved activation offloaded)
-- the micro-batch doubles until CUDA (or pinned host memory) runs out, then bisects
between the last fit and the first failure (``bench/activations.py``'s search and
trial, reused). A micro-batch whose offloaded bytes (measured per sample at a smaller
one, x2 for the pinned allocator's rounding) exceed 60% of host RAM counts as no fit
without being run: the kernel's OOM killer cannot be caught. At the
largest fit the step is timed (``--steps`` after ``--warmup``, synchronized) and
tokens/s, MFU, peak GiB and the MiB offloaded per step are reported.

Usage::

    python bench/activation_offload.py --model 1b4 --out bench/results/activation_offload.json
    python bench/activation_offload.py --model tiny --device cpu --max-batch 4 \\
        --min-offload-bytes 0 --out /tmp/ao.json                         # CPU smoke test

Writes ``--out`` (a ``.json`` path or a folder), else ``$OUT``, else
``bench/results/activation_offload-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import activations  # noqa: E402
from _provenance import provenance  # noqa: E402
from activations import MODELS  # noqa: E402

import fscale as fs  # noqa: E402
from fscale.models.gpt import GPT, GPTConfig  # noqa: E402
from fscale.transforms.checkpoint import MIN_OFFLOAD_BYTES  # noqa: E402

# name -> (checkpoint policy or None, offload)
CONFIGS = {
    "none": (None, None),
    "unit": ("unit", None),
    "selective": ("selective", None),
    "unit+offload": ("unit", "cpu"),
    "selective+offload": ("selective", "cpu"),
    "none+offload": ("none", "cpu"),
}
DEFAULT = ("none", "unit", "unit+offload", "selective+offload")


class _Recording:
    """A step that keeps its last metrics (``trial`` returns only times and losses)."""

    def __init__(self, step):
        self.step, self.metrics = step, {}
        self.host_bytes_per_sample = 0  # offloaded bytes of one sample, once measured

    def init(self, params):
        return self.step.init(params)

    def __call__(self, params, state, batch):
        params, state, self.metrics = self.step(params, state, batch)
        offloaded = self.metrics.get("activation_offload_bytes", 0)
        self.host_bytes_per_sample = max(self.host_bytes_per_sample, offloaded // len(batch["x"]))
        return params, state, self.metrics


def free(device) -> None:
    activations.free(device)
    if device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # pinned blocks of the last batch size


# Pinned host blocks are rounded up to a power of two: budget twice the bytes offloaded.
_PINNED_SLACK = 2.0


def _host_budget() -> int:
    """Bytes of pinned host memory a trial may take: 60% of RAM (an OOM kill is not caught)."""
    return int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def trial(built, device, micro, seq, steps, warmup):
    """``activations.trial``, where running out of pinned host memory also means "no fit"."""
    _, _, step = built
    if micro * step.host_bytes_per_sample * _PINNED_SLACK > _host_budget():
        return None  # would not fit in host memory (measured at a smaller micro-batch)
    try:
        return activations.trial(built, device, micro, seq, steps, warmup)
    except RuntimeError as e:  # cudaHostAlloc failing is not always an OutOfMemoryError
        if "out of memory" not in str(e).lower():
            raise
        return None
    finally:
        free(device)


def largest(built, device, seq, max_batch):
    """``bench/activations.py``'s search, probing with this script's ``trial``."""
    return activations.largest(built, device, seq, max_batch, trial=trial)


def build(cfg: GPTConfig, device, config: str, min_offload_bytes: int):
    """The GPT and its bf16 AdamW step under ``config`` (see ``CONFIGS``)."""
    policy, offload = CONFIGS[config]
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    _, apply = fs.functional(model)

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=3e-4, weight_decay=0.1), model=model)
    step = fs.mixed_precision(step, "bf16")
    if policy is not None:
        kw = {} if offload is None else {"offload": offload, "min_offload_bytes": min_offload_bytes}
        step = fs.checkpoint_activations(step, policy=policy, **kw)
    return model, _Recording(step)


def _path(args, result) -> Path:
    out = args.out or os.environ.get("OUT")
    if out:
        path = Path(out)
        return path if path.suffix == ".json" else path / f"activation_offload-{args.model}.json"
    slug = result["device"].lower().replace(" ", "-")
    return Path(__file__).parent / "results" / f"activation_offload-{args.model}-{slug}.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b4")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--configs", default=",".join(DEFAULT), help=f"of {sorted(CONFIGS)}")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-offload-bytes", type=int, default=MIN_OFFLOAD_BYTES)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
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
        "bench": "activation_offload",
        **provenance(device),
        "model": args.model,
        "seq": seq,
        "min_offload_bytes": args.min_offload_bytes,
        "flops_per_token": flops_per_token,
        "results": rows,
    }
    path = _path(args, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    for config in configs:
        model, step = build(cfg, device, config, args.min_offload_bytes)
        built = (cfg, model, step)
        fit, log = largest(built, device, seq, args.max_batch)
        row = {"config": config, "largest_micro_batch": fit, "probes": log}
        timed = None
        while fit and timed is None:  # a longer run can still fail where two steps fit
            timed = trial(built, device, fit, seq, args.steps, args.warmup)
            fit -= timed is None
        row["largest_micro_batch"] = fit
        if fit:
            ms, peak, losses = timed
            tokens = fit * seq / (ms / 1e3)
            row.update(step_ms=ms, tokens_per_s=tokens, peak_gib=peak, losses=losses)
            row["offload_mib_per_step"] = step.metrics.get("activation_offload_bytes", 0) / 2**20
            if flops_per_token:
                row["mfu"] = flops_per_token * tokens / (args.peak_tflops * 1e12)
        rows.append(row)
        del model, step, built
        free(device)
        print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)
        path.write_text(json.dumps(result, indent=1))  # each config kept if a later one dies
    print(
        f"\n{'config':<18} {'micro':>6} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9} "
        f"{'offload MiB/step':>17}"
    )
    for r in rows:
        if r["largest_micro_batch"]:
            mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
            print(
                f"{r['config']:<18} {r['largest_micro_batch']:>6} {r['tokens_per_s']:>10.0f} "
                f"{mfu:>6} {r['peak_gib']:>9.1f} {r['offload_mib_per_step']:>17.2f}"
            )
        else:
            print(f"{r['config']:<18} {'-':>6}  (micro-batch 1 does not fit)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
