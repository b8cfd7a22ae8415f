"""Serve a model directory over HTTP with an OpenAI-compatible API.

Usage::

    python -m fscale.serve --model path/to/hf_dir --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'

    # tensor parallel: rank 0 serves HTTP, the other ranks follow its steps
    torchrun --nproc-per-node 2 -m fscale.serve --model path/to/hf_dir --tensor-parallel 2
    kill -TERM <rank 0's pid>       # (printed when ready) every rank then exits 0

With a world of W ranks and ``--tensor-parallel N < W``, each of the W/N groups serves
on its own port: group g (ranks gN..gN+N-1) on ``--port`` + g.
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fscale.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory (config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as model")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quantize", default=None, help="an fs.quantize format, e.g. e3m2, int8")
    p.add_argument(
        "--quantize-head", action="store_true", help="quantize the output head too (--quantize)"
    )
    p.add_argument("--max-tokens-per-step", type=int, default=1024, help="SplitFuse token budget")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size in GiB")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (instead of GiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests decoded at once")
    p.add_argument("--max-waiting", type=int, default=1024, help="engine queue before 503s")
    p.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=2.0,
        help="how long a request waits for room in a full engine before answering 503",
    )
    p.add_argument(
        "--max-start-wait-s",
        type=float,
        default=300.0,
        help="how long a request may wait in all for the engine to start it (KV cache or "
        "seats full) before it is dropped with a 503; a large value (or inf) waits without "
        "limit",
    )
    p.add_argument(
        "--tensor-parallel",
        type=_tp_size,
        default=1,
        help="ranks that split each layer (under torchrun): an int dividing the world, or "
        "'world'; rank 0 of each group serves HTTP, the others follow it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", help="uvicorn's: debug, info, warning...")
    args = p.parse_args(argv)
    for name in ("max_tokens_per_step", "max_num_seqs", "max_waiting"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.max_start_wait_s >= 0:  # NaN too
        p.error(f"--max-start-wait-s must be >= 0, got {args.max_start_wait_s}")
    if args.kv_cache_gib is not None and args.num_blocks is not None:
        p.error("give --kv-cache-gib or --num-blocks, not both")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.tensor_parallel == 1:
        p.error(
            f"launched as {world} ranks (WORLD_SIZE={world}) but --tensor-parallel is 1: each "
            f"rank would serve a whole model on the same port; pass --tensor-parallel {world} "
            "(or 'world'), or start one process"
        )
    return args


def _tp_size(text: str):
    if text == "world":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'world', got {text!r}")
    return n


def main(argv: list[str] | None = None) -> None:
    import torch

    from fscale.serve.engine import Engine
    from fscale.serve.server import serve

    args = parse_args(argv)
    short = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    dtype = None if args.dtype is None else getattr(torch, short.get(args.dtype, args.dtype))
    device, port = args.device, args.port
    if args.tensor_parallel != 1:
        from fscale.hw.launch import init_distributed

        want = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _, _, joined = init_distributed("cuda" if want.startswith("cuda") else "cpu")
        device = joined
    engine = Engine(
        args.model,
        dtype=dtype,
        device=device,
        quantize=args.quantize,
        quantize_head=args.quantize_head,
        max_tokens_per_step=args.max_tokens_per_step,
        kv_cache_gib=args.kv_cache_gib,
        num_blocks=args.num_blocks,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        seed=args.seed,
        tensor_parallel=args.tensor_parallel,
    )
    tp = engine.tp
    if tp.size > 1:
        from fscale.hw import comm

        group = comm.rank() // tp.size
        if port and group:
            port += group  # one port per tensor-parallel group (see the module doc)
        if not tp.leader:
            print(
                f"fscale.serve: rank {comm.rank()} (pid {os.getpid()}) follows its group's rank 0",
                flush=True,
            )

    def ready(url: str) -> None:
        where = f"; tensor parallel {tp.size}, pid {os.getpid()}" if tp.size > 1 else ""
        print(
            f"fscale.serve: serving {args.model} at {url} (OpenAI API under /v1{where})",
            flush=True,
        )

    try:
        serve(
            engine,
            args.host,
            port,
            served_model_name=args.served_model_name,
            max_queue_wait_s=args.max_queue_wait_s,
            max_start_wait_s=args.max_start_wait_s,
            log_level=args.log_level,
            on_ready=ready,
        )
    finally:
        if args.tensor_parallel != 1:
            _leave_job()


def _leave_job() -> None:
    """Destroy the process group before the interpreter exits. Left to the exit's own
    teardown, the backend's threads could still be joinable when their owners were
    destroyed, which aborted rank 0 ("terminate called without an active exception")
    about one shutdown in six after SIGTERM."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
