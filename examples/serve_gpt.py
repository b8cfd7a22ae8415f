"""Serve the GPT that ``examples/train_gpt.py`` trains, over the OpenAI API, and query it.

The model reads and writes raw bytes of Python source (vocabulary 256: the engine's byte
tokenizer). With ``--checkpoint`` the weights come from a ``train_gpt.py --save-dir`` run
(``fs.load`` into a plain step, any world size or ``--zero`` stage it was saved with);
without it this script trains the same model on the same data for ``--steps`` steps
first (train_gpt's helpers, imported). Then it builds ``Engine(model)`` on the module,
starts the HTTP server in-process on a free port, sends a few ``/v1/completions``
requests with httpx (one of them streamed, token by token) and prints the completions::

    python examples/serve_gpt.py                                    # ~25 s on 2 CPU cores
    python examples/train_gpt.py --save-dir out/train_gpt_ckpt      # or: train it fully
    python examples/serve_gpt.py --checkpoint out/train_gpt_ckpt    # ... and serve that

To keep serving instead (curl, the ``openai`` client), run ``--keep-serving --port 8000``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import httpx
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_gpt  # noqa: E402  (the sibling example: data, step and batch helpers)

import fscale as fs  # noqa: E402
from fscale.models import GPT, GPTConfig  # noqa: E402

PROMPTS = ["def __init__(self", "import os\nimport ", "    for i in range(", "class "]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a train_gpt.py --save-dir run directory")
    p.add_argument("--preset", choices=("small", "tiny"), default="small", help="GPTConfig preset")
    p.add_argument("--steps", type=int, default=200, help="training steps without --checkpoint")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup-cosine)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--keep-serving", action="store_true", help="serve until Ctrl-C afterwards")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.max_tokens < 1:
        p.error("--steps and --max-tokens must be >= 1")
    return args


def saved_config(run_dir: str) -> GPTConfig | None:
    """The GPT config a train_gpt.py run saved with its latest checkpoint (its preset,
    --seq-len, --experts), or None for a checkpoint without one (then --preset)."""
    where = fs.latest(run_dir) or run_dir
    saved = fs.load_extra(where, rank=0)
    config = saved.get("gpt_config") if isinstance(saved, dict) else None
    return GPTConfig(**config) if config else None


def trained_model(args: argparse.Namespace) -> GPT:
    """The GPT with train_gpt's weights: loaded from ``--checkpoint`` or trained here."""
    torch.manual_seed(args.seed)
    cfg = saved_config(args.checkpoint) if args.checkpoint else None
    cfg = cfg or getattr(GPTConfig, args.preset)()
    if cfg.experts:
        raise SystemExit(
            f"{args.checkpoint}: a mixture-of-experts GPT ({cfg.experts} experts); fscale.serve "
            "serves dense GPTs: train one without --experts."
        )
    model = GPT(cfg)
    params, apply = fs.functional(model)

    def loss_fn(params, batch):
        return F.cross_entropy(apply(params, batch["x"]).flatten(0, 1), batch["y"].flatten())

    targs = train_gpt.parse_args(
        ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--preset", args.preset,
         "--lr", str(args.lr)]
    )  # fmt: skip
    step = train_gpt.build_step(targs, loss_fn, model=apply, cfg=cfg)
    if args.checkpoint:
        params, state = fs.load(args.checkpoint, step, params)  # a run dir: its latest
        print(f"loaded {args.checkpoint}")
    else:
        data = train_gpt.load_stdlib_bytes()
        train = data[: int(len(data) * (1 - train_gpt.VAL_FRACTION))]
        kw = dict(
            global_batch=args.batch_size,
            seq_len=cfg.seq_len,
            rank=0,
            batch_size=args.batch_size,
            device=torch.device("cpu"),
        )
        params, state = step.init(params)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        for it in range(1, args.steps + 1):
            params, state, metrics = step(params, state, train_gpt.get_batch(train, gen, **kw))
            if it % 25 == 0 or it == args.steps:
                loss = float(metrics["loss"])
                print(f"train step {it:4d}  loss {loss:.3f}  ({time.perf_counter() - t0:.0f} s)")
    fs.load_params(model, fs.gather_params(params, state))  # full fp32 weights into the module
    return model.eval()


def query(url: str, args: argparse.Namespace) -> list[str]:
    """A few completions, the first one streamed; returns their texts."""
    texts = []
    with httpx.Client(base_url=url, timeout=120) as client:
        print(f"GET /v1/models -> {client.get('/v1/models').json()['data'][0]['id']}")
        body = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        print(f"\n--- streamed: {PROMPTS[0]!r}")
        print(PROMPTS[0], end="", flush=True)
        pieces = []
        with client.stream(
            "POST",
            "/v1/completions",
            json={**body, "prompt": PROMPTS[0], "stream": True, "seed": args.seed},
        ) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    piece = json.loads(line[6:])["choices"][0]["text"]
                    pieces.append(piece)
                    print(piece, end="", flush=True)
        texts.append("".join(pieces))
        # The rest in one batched request (one choice per prompt, run concurrently); no
        # seed: each draws from the engine's generator (seeded by Engine(seed=)).
        r = client.post("/v1/completions", json={**body, "prompt": PROMPTS[1:]})
        r.raise_for_status()
        out = r.json()
        for prompt, choice in zip(PROMPTS[1:], out["choices"], strict=True):
            print(f"\n\n--- {prompt!r} ({choice['finish_reason']})\n{prompt}{choice['text']}")
            texts.append(choice["text"])
        print(f"\n\nusage: {out['usage']}")
    return texts


def main(argv: list[str] | None = None) -> list[str]:
    from fscale.serve.engine import Engine
    from fscale.serve.server import build_app, start_server

    args = parse_args(argv)
    t0 = time.perf_counter()
    model = trained_model(args)
    engine = Engine(model, max_tokens_per_step=256, seed=args.seed)
    with start_server(build_app(engine, served_model_name="train_gpt"), port=args.port) as srv:
        print(f"serving at {srv.url} ({time.perf_counter() - t0:.0f} s so far)")
        texts = query(srv.url, args)
        if args.keep_serving:
            print(f"serving at {srv.url} until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return texts


if __name__ == "__main__":
    main()
