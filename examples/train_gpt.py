"""Train a small GPT on the Python standard library's own source code, with fscale.

The data ships with every Python install: the stdlib's ``.py`` files, read in
sorted order, as raw bytes (vocabulary 256). The last 10% of the bytes (other
modules than the training ones) are held out for validation.

Run it as a world of one::

    python examples/train_gpt.py                       # ~1-2 min on 2 CPU cores
    python examples/train_gpt.py --checkpoint-activations selective   # same numbers, less memory
    python examples/train_gpt.py --curriculum 16 --random-ltd 32       # data efficiency
    python examples/train_gpt.py --compile                              # torch.compile per block
    torchrun --nproc-per-node 4 examples/train_gpt.py --experts 8 --ep 2 --tp 2  # MoE + TED
    torchrun --nproc-per-node 2 examples/train_gpt.py --compress onebit_adam  # 1-bit Adam

or data-parallel, unchanged, under torchrun (gloo on CPU, nccl on CUDA)::

    torchrun --nproc-per-node 2 examples/train_gpt.py

Every rank builds the same model from the same seed and draws the same global
batch; rank ``r`` trains on its slice ``[r * B, (r + 1) * B)``. The step's default
``reduce_grads`` averages the gradients, so a world of N with per-rank batch B
takes the same steps as a world of one with batch N * B. Only rank 0 prints,
plots and writes files.

Outputs: ``--out`` (default ``out/train_gpt_loss.png``) and a JSON of the
metrics beside it (same stem, ``.json``), written at the end. As it goes, every
``--log-every`` steps, one line of ``<log-dir>/metrics.jsonl`` and TensorBoard
scalars (``fs.MetricsLogger``: loss, lr, grad norm, tokens/s, validation loss at
evaluations), flushed at once so a crash keeps them; ``--log-dir`` defaults to
``<out stem>_logs`` beside ``--out``. Watch them with ``tensorboard --logdir DIR``.

Data efficiency (DeepSpeed's): ``--curriculum START`` warms the sequence length up
from START to the full length over the first 30% of steps (``fs.curriculum``: the
batch is cut inside the step; ``seqlen`` in the log); ``--random-ltd KEEP`` runs the
middle blocks on KEEP random tokens per sequence, rising linearly to all of them by
the last step (``fs.random_ltd``; ``random_ltd_keep`` in the log), with the LR decay
following the layer-tokens consumed (``fs.layer_token_lr``). Tokens and tokens/s
count the tokens fed, after the curriculum's cut. ``--curriculum-mode reshape`` splits
each sequence into windows of the current length instead of cutting it (lengths
dividing the full one: every step feeds the full batch's tokens).

Checkpoints: ``--save-dir DIR --save-every N`` writes ``fs.save`` checkpoints (params,
optimizer state, the loader's position, each rank's RNG states, the curve so far);
``--resume`` goes on from the latest good one, in any world size or ``--zero`` stage,
and takes the same steps the uninterrupted run takes (a rank beyond the saved world
gets a seed of its own: [Note: RNG states per rank]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import fscale as fs
from fscale.data import fixed_linear
from fscale.hw import comm
from fscale.models import GPT, GPTConfig

DATA_BYTES = 4 * 2**20  # how much of the stdlib to read (it holds ~30 MB of .py)
VAL_FRACTION = 0.1
EVAL_BATCHES = 4  # global batches per validation pass
WARMUP_FRACTION = 0.05
CURRICULUM_FRACTION = 0.3  # --curriculum: of the steps, spent growing the sequences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, per rank")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (preset's)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup-cosine)")
    p.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per step (divides batch-size)"
    )
    p.add_argument("--preset", choices=("small", "tiny"), default="small", help="GPTConfig preset")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--pg-timeout",
        type=float,
        default=None,
        help="seconds a collective waits for the other ranks before the job fails "
        "(default $FSCALE_PG_TIMEOUT_S or 600)",
    )
    p.add_argument("--out", default="out/train_gpt_loss.png", help="loss-curve PNG path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--log-dir",
        default=None,
        help="metrics.jsonl + TensorBoard event files, written as training goes "
        "(default: <out stem>_logs beside --out)",
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between logged lines")
    p.add_argument(
        "--save-dir",
        default=None,
        help="fs.save checkpoints here (step-<n>, a latest pointer, the newest 3 kept)",
    )
    p.add_argument(
        "--save-every", type=int, default=0, help="--save-dir: steps between saves (0: end only)"
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="at the end, the trained fp32 weights as DIR/model.safetensors + config.json "
        "(fs.export): `python -m fscale.serve --model DIR` serves them",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="--save-dir: continue from its latest good checkpoint (a fresh start if none)",
    )
    # --- Flags added by later issues (--zero, --precision, --offload) go here, each
    # --- mapped to a transform in build_step() below.
    p.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        default=0,
        help="ZeRO stage (fs.shard_zero): 1 optimizer state, 2 +grads, 3 +params; 0 = off",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="compute dtype: bf16/fp16 keep fp32 master weights (fs.mixed_precision)",
    )
    p.add_argument(
        "--offload",
        choices=("none", "cpu", "nvme"),
        default="none",
        help="fs.offload: fp32 masters + optimizer state in host memory (cpu) or files (nvme)",
    )
    p.add_argument("--nvme-path", default=None, help="--offload nvme: directory for swap files")
    p.add_argument(
        "--offload-params",
        action="store_true",
        help="--zero 3 --offload cpu|nvme: ZeRO-3's param shards in host memory too",
    )
    p.add_argument(
        "--delayed-update",
        action="store_true",
        help="--offload cpu: one-step delayed parameter update (ZeRO-Offload's DPU): the host "
        "update of step t runs during step t+1",
    )
    p.add_argument(
        "--compress",
        choices=("onebit_adam", "zero_one_adam", "onebit_lamb", "zeropp"),
        default=None,
        help="fs.compress_comm: 1-bit Adam / 0/1 Adam / 1-bit LAMB (plain data parallel or "
        "--zero 1/2, with or without --offload; full precision for the first 30%% of steps) "
        "or ZeRO++ (with --zero 3)",
    )
    p.add_argument(
        "--compress-warmup",
        type=int,
        default=None,
        help="--compress 1-bit methods: full-precision steps before the variance freezes "
        "(default 30%% of --steps; too few leave a poor variance estimate)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="fs.compile_units: torch.compile each block's math (ZeRO-3 gathers and "
        "collectives stay outside)",
    )
    p.add_argument(
        "--checkpoint-activations",
        choices=("unit", "selective"),
        default=None,
        help="fs.checkpoint_activations: recompute each block in backward (unit), or only its "
        "pointwise ops, keeping matmul/attention outputs (selective); default: keep everything",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="fs.checkpoint_activations(..., offload='cpu'): what backward keeps goes to host "
        "memory (with --checkpoint-activations: what that policy keeps; alone: everything "
        "the blocks save, nothing recomputed)",
    )
    p.add_argument(
        "--curriculum",
        type=int,
        default=None,
        metavar="START",
        help="fs.curriculum: sequence length from START to the full length over the first "
        f"{CURRICULUM_FRACTION:.0%}% of steps (fs.seqlen_warmup)",  # %%: argparse formats help
    )
    p.add_argument(
        "--curriculum-mode",
        choices=("truncate", "reshape"),
        default="truncate",
        help="--curriculum: cut each sequence to the length (truncate), or split it into "
        "windows of that length (reshape: lengths divide the full one; START must too)",
    )
    p.add_argument(
        "--random-ltd",
        type=int,
        default=None,
        metavar="KEEP",
        help="fs.random_ltd: the middle blocks run on KEEP random tokens per sequence, rising "
        "linearly to the full length by the last step; LR by fs.layer_token_lr",
    )
    p.add_argument(
        "--experts", type=int, default=0, help="MoE GPT: routed experts per block (0: dense)"
    )
    p.add_argument("--top-k", type=int, default=2, help="--experts: experts per token")
    p.add_argument(
        "--ep", type=int, default=1, help="fs.expert_parallel: ranks the experts are split over"
    )
    p.add_argument(
        "--tp", type=int, default=1, help="fs.tensor_parallel: ranks each block is split over"
    )
    args = p.parse_args(argv)
    if args.ep > 1 and (args.experts < 1 or args.experts % args.ep):
        p.error(f"--ep {args.ep} splits the experts: give --experts as a multiple of it")
    if args.ep < 1 or args.tp < 1:
        p.error("--ep and --tp must be >= 1")
    if args.compile and args.ep * args.tp > 1:
        p.error(
            "--compile with --ep/--tp: compile_units would trace the dispatch collectives "
            "inside each block; run model-parallel steps eagerly"
        )
    if args.delayed_update and args.offload != "cpu":
        p.error("--delayed-update is for --offload cpu")
    if args.offload_params and (args.zero != 3 or args.offload == "none"):
        p.error("--offload-params offloads ZeRO-3's param shards: use it with --zero 3 --offload")
    if (args.resume or args.save_every) and args.save_dir is None:
        p.error("--resume and --save-every need --save-dir DIR")
    if args.save_every < 0:
        p.error(f"--save-every must be >= 0, got {args.save_every}")
    if (args.offload == "nvme") != (args.nvme_path is not None):
        p.error("--offload nvme needs --nvme-path DIR (and --nvme-path is only for it)")
    for name in ("steps", "batch_size", "accumulate", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    seq_len = args.seq_len or getattr(GPTConfig, args.preset)().seq_len
    for flag, value in (("--curriculum", args.curriculum), ("--random-ltd", args.random_ltd)):
        if value is not None and not 1 <= value <= seq_len:
            p.error(f"{flag} must be in [1, {seq_len}] (the sequence length), got {value}")
    if args.curriculum_mode == "reshape" and args.curriculum is not None:
        if seq_len % args.curriculum:
            p.error(
                f"--curriculum-mode reshape keeps lengths dividing {seq_len}: --curriculum "
                f"{args.curriculum} does not"
            )
    n_layer = getattr(GPTConfig, args.preset)().n_layer
    if args.random_ltd is not None and n_layer < 3:
        p.error(
            f"--random-ltd drops tokens in the middle blocks (all but the first and the last); "
            f"--preset {args.preset} has {n_layer}: use --preset small"
        )
    if args.batch_size % args.accumulate:
        p.error(
            f"--batch-size {args.batch_size} is not divisible by --accumulate {args.accumulate}; "
            "each step splits the per-rank batch into that many micro-batches."
        )
    return args


# ----------------------------------------------------------------------------- data


def load_stdlib_bytes(limit: int = DATA_BYTES) -> torch.Tensor:
    """The first ``limit`` bytes of the stdlib's ``.py`` files in sorted path order (uint8).

    Test suites and site-packages are skipped: the former are large and repetitive,
    the latter differ between installs (the corpus must be the same on every rank).
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = sorted(
        (f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    buf = bytearray()
    for f in files:
        buf += f.read_bytes()
        if len(buf) >= limit:
            break
    if len(buf) < 1 << 16:
        raise RuntimeError(f"found only {len(buf)} bytes of Python source under {root}.")
    return torch.frombuffer(buf[:limit], dtype=torch.uint8).clone()


def get_batch(
    data: torch.Tensor,
    gen: torch.Generator,
    *,
    global_batch: int,
    seq_len: int,
    rank: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """This rank's slice of one global batch of random windows: ``{"x", "y"}`` (B, T) longs.

    Every rank draws the whole global batch from the same generator state, so the
    ranks agree on it without communicating; each keeps its own rows.
    """
    starts = torch.randint(0, len(data) - seq_len - 1, (global_batch,), generator=gen)
    mine = starts[rank * batch_size : (rank + 1) * batch_size]
    windows = torch.stack([data[s : s + seq_len + 1] for s in mine.tolist()]).long()
    windows = windows.to(device, non_blocking=True)
    return {"x": windows[:, :-1], "y": windows[:, 1:]}


# ----------------------------------------------------------------------------- distributed


def setup(device: str, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``; joins the torchrun world when launched by torchrun, with
    collectives that raise after ``timeout_s`` ([Note: how a failed rank ends the job] in
    fscale/hw/launch.py)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False.")
    return tuple(fs.init_distributed(device, timeout_s=timeout_s))


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op in a world of one); every rank must call it."""
    values = values.detach().float().clone()
    comm.all_reduce(values, op="avg")
    return values


# ----------------------------------------------------------------------------- checkpoints

# [Note: RNG states per rank]
# Each rank saves its own global RNG states in its own ``extra`` (fs.save keeps one per
# rank): torch's CPU generator and, on CUDA, its device's. On resume each rank puts back
# the states it saved, so whatever it draws (dropout, a rank-dependent draw) goes on as
# in the uninterrupted run. The loader's generator, the step and the curve are the same
# on every rank and are read from rank 0's. A rank the checkpoint has no states of (a
# resume in a bigger world) is seeded from ``fallback_seed(seed, step, rank)``:
# reproducible, and apart from the other ranks' and from a fresh start's. The example
# draws nothing from Python's ``random`` or numpy, so their states are not saved.


def rng_states(device: torch.device) -> dict:
    """This rank's global RNG states, for its ``extra`` ([Note: RNG states per rank])."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def fallback_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank that has no saved RNG states: a function of the run's seed, the
    resumed step and the rank alone."""
    return ((seed * 1_000_003 + step) * 1_000_003 + rank) % 2**63


def restore_rng_states(
    resume_from: str, rank: int, device: torch.device, *, seed: int, step: int
) -> bool:
    """Put back the RNG states ``rank`` saved ([Note: RNG states per rank]); False when
    the checkpoint has none of this rank and it was seeded by ``fallback_seed``."""
    try:
        saved = fs.load_extra(resume_from, rank=rank)
    except KeyError:  # saved by a smaller world
        torch.manual_seed(fallback_seed(seed, step, rank))  # the CPU and every CUDA device
        return False
    torch.set_rng_state(saved["torch_rng"])
    if device.type == "cuda":
        if "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        else:  # saved on CPU, resumed on CUDA
            torch.cuda.manual_seed(fallback_seed(seed, step, rank))
    return True


# ----------------------------------------------------------------------------- training


def seqlen_schedule(args: argparse.Namespace, seq_len: int):
    """``--curriculum``'s ``count -> length`` (at most 8 lengths), or None."""
    if args.curriculum is None:
        return None
    divides = seq_len if args.curriculum_mode == "reshape" else None
    return fs.seqlen_warmup(
        args.curriculum,
        seq_len,
        steps=max(1, int(CURRICULUM_FRACTION * args.steps)),
        divides=divides,
    )


def keep_schedule(args: argparse.Namespace, seq_len: int):
    """``--random-ltd``'s ``count -> tokens kept``: linear to ``seq_len`` at the last step."""
    if args.random_ltd is None:
        return None
    return fixed_linear(args.random_ltd, seq_len, steps=max(1, args.steps - 1))


def lr_schedule(args: argparse.Namespace, cfg: GPTConfig | None = None):
    warmup = max(1, int(WARMUP_FRACTION * args.steps))
    if args.random_ltd is not None:
        # The paper's LayerToken LR: the cosine follows the layer-tokens consumed, so a
        # step that drops tokens decays the LR less; it reaches the end value once the
        # run has consumed the layer-tokens of args.steps full steps (after this run).
        return fs.layer_token_lr(
            args.lr,
            keep=keep_schedule(args, cfg.seq_len),
            seq_len=cfg.seq_len,
            n_layers=cfg.n_layer,
            n_dropped=cfg.n_layer - 2,  # random_ltd's default layers
            warmup_steps=warmup,
            total_steps=args.steps,
            end=0.1 * args.lr,
        )
    return fs.optim.warmup_cosine(
        peak=args.lr, warmup_steps=warmup, decay_steps=args.steps, end=0.1 * args.lr
    )


def compression(args: argparse.Namespace):
    """The ``--compress`` method; the 1-bit ones run full precision for ``--compress-warmup``
    steps (default 30% of the run)."""
    warm = args.compress_warmup or max(1, int(0.3 * args.steps))
    if args.compress == "onebit_adam":
        return fs.onebit_adam(freeze_step=warm)
    if args.compress == "zero_one_adam":
        # The sync interval doubles every local_step_scaler steps; DeepSpeed's default
        # (2^15) suits long runs. Here it doubles about 4 times over the compressed part
        # of the run, so the example shows local steps (the cosine halves the LR in it).
        scaler = max(1, (args.steps - warm) // 4)
        return fs.zero_one_adam(var_freeze_step=warm, local_step_scaler=scaler)
    if args.compress == "onebit_lamb":
        return fs.onebit_lamb(freeze_step=warm)
    return fs.zeropp()


def parallel_mesh(args: argparse.Namespace, world: int, device: torch.device):
    """The (dp, ep, tp) mesh of --ep/--tp (None without them) and this rank's data rank."""
    if args.ep * args.tp == 1:
        return None
    if world % (args.ep * args.tp):
        raise SystemExit(f"--ep {args.ep} x --tp {args.tp} does not divide the world ({world})")
    from torch.distributed.device_mesh import init_device_mesh

    sizes = (world // (args.ep * args.tp), args.ep, args.tp)
    return init_device_mesh(device.type, sizes, mesh_dim_names=("dp", "ep", "tp"))


def build_step(
    args: argparse.Namespace, loss_fn, model=None, cfg: GPTConfig | None = None, mesh=None
):
    """The train step; later issues wrap it in transforms chosen by flags.

    ``model`` (the module, or ``fs.functional``'s apply) tells the step the model's
    units (the GPT's blocks), which ``--checkpoint-activations``, ``--offload-activations``
    and ``--random-ltd`` wrap; ``cfg`` gives ``--curriculum`` and ``--random-ltd``
    the full sequence length (and the latter the layer count).
    """
    if (args.curriculum is not None or args.random_ltd is not None) and cfg is None:
        raise ValueError("--curriculum and --random-ltd need build_step(..., cfg=GPTConfig)")
    schedule = lr_schedule(args, cfg)
    # b2=0.95 (GPT-3's): the second moment adapts fast enough for this short, high-lr run.
    if args.compress == "onebit_lamb":  # 1-bit LAMB compresses LAMB's momentum
        optimizer = fs.optim.lamb(
            lr=schedule, b2=0.95, weight_decay=0.1, mask=fs.optim.decay_mask_default
        )
    else:
        optimizer = fs.optim.adamw(
            lr=schedule, b2=0.95, weight_decay=0.1, mask=fs.optim.decay_mask_default
        )
    step = fs.train_step(
        loss_fn, optimizer, accumulate=args.accumulate, clip_norm=1.0, model=model, mesh=mesh
    )
    if args.ep > 1:  # experts split over "ep"; tokens dispatched by all_to_all
        step = fs.expert_parallel(step, dim="ep")
    if args.tp > 1:  # over expert_parallel: TED drops the tp-duplicated tokens first
        step = fs.tensor_parallel(step, dim="tp")
    if args.compile:  # the first unit transform: the others wrap the compiled blocks
        step = fs.compile_units(step)
    if args.checkpoint_activations or args.offload_activations:
        # Any position in the stack: it wraps units, not stages. Offload alone is policy
        # "none": nothing recomputed, every tensor a block saves goes to the host.
        step = fs.checkpoint_activations(
            step,
            policy=args.checkpoint_activations or "none",
            offload="cpu" if args.offload_activations else None,
        )
    if args.random_ltd is not None:  # a unit hook too: anywhere in the stack
        step = fs.random_ltd(step, keep=keep_schedule(args, cfg.seq_len), seed=args.seed)
    if args.curriculum is not None:  # cuts the batch before loss_and_grad: rank-local
        step = fs.curriculum(step, seqlen_schedule(args, cfg.seq_len), mode=args.curriculum_mode)
    # --- transforms from later flags (shard_zero, mixed_precision, offload) go here.
    if args.precision != "fp32":  # innermost: shard_zero and offload go over it
        step = fs.mixed_precision(step, args.precision)
    if args.zero:
        step = fs.shard_zero(step, args.zero, shard_dim="dp" if mesh is not None else None)
    if args.compress is not None:  # over shard_zero(3) for ZeRO++; it names the fix otherwise
        step = fs.compress_comm(step, compression(args))
    if args.offload != "none":  # outermost: each rank offloads its own shard
        what = ("optimizer", "params") if args.offload_params else ("optimizer",)
        step = fs.offload(
            step, args.offload, what=what, path=args.nvme_path, delayed_update=args.delayed_update
        )
    return step


@torch.no_grad()
def evaluate(apply, params, val: torch.Tensor, batch_kw: dict, seed: int) -> float:
    """Mean loss over ``EVAL_BATCHES`` fixed global batches of the held-out bytes.

    Every rank evaluates its slice and the means are averaged, so all ranks run
    the same collectives (ranks taking different paths is how sharded runs hang).
    """
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(EVAL_BATCHES):
        batch = get_batch(val, gen, **batch_kw)
        logits = apply(params, batch["x"])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()))
    return global_mean(torch.stack(losses).mean()).item()


def plot(path: pathlib.Path, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    train = torch.tensor(history["train_loss"])
    # The loss of step i is measured before its update: after i - 1 updates, like val's x.
    ax.plot(range(len(train)), train, lw=0.8, alpha=0.45, label="train (per step)")
    k = max(1, len(train) // 30)
    if k > 1:
        smooth = train.unfold(0, k, 1).mean(1)
        ax.plot(range(k - 1, len(train)), smooth, lw=1.6, label=f"train ({k}-step mean)")
    ax.plot(history["val_step"], history["val_loss"], "o-", lw=1.6, ms=4, label="validation")
    ax.axhline(math.log(256), color="grey", ls=":", lw=0.8, label="uniform over bytes")
    top = max(math.log(256), *history["val_loss"], train.max().item())
    ax.set_ylim(top=top + 0.15)  # keep the uniform-bytes line in view
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metrics_logger(args: argparse.Namespace, main_rank: bool) -> fs.MetricsLogger:
    """``fs.MetricsLogger`` into ``--log-dir``; TensorBoard files when it is installed."""
    log_dir = args.log_dir
    if log_dir is None:
        out = pathlib.Path(args.out)
        log_dir = out.with_name(out.stem + "_logs")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        tensorboard = None
        if main_rank:
            print(
                "tensorboard is not installed: logging metrics.jsonl only (pip install tensorboard)"
            )
    return fs.MetricsLogger(log_dir, tensorboard=tensorboard is not None)


@record  # under torchrun, a rank's traceback appears in the job's failure summary
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup(args.device, args.pg_timeout)
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)

    cfg = getattr(GPTConfig, args.preset)()
    if args.seq_len is not None:
        cfg = cfg.replace(seq_len=args.seq_len)
    if args.experts:
        cfg = cfg.replace(experts=args.experts, top_k=args.top_k)
    mesh = parallel_mesh(args, world, device)
    # Ranks of one tensor-parallel group (the innermost mesh dim) read the same batch.
    data_rank, data_world = rank // args.tp, world // args.tp
    torch.manual_seed(args.seed)  # same init on every rank: no broadcast needed
    model = GPT(cfg).to(device)

    data = load_stdlib_bytes()
    n_train = int(len(data) * (1 - VAL_FRACTION))
    train, val = data[:n_train], data[n_train:]
    batch_kw = dict(
        global_batch=args.batch_size * data_world,
        seq_len=cfg.seq_len,
        rank=data_rank,
        batch_size=args.batch_size,
        device=device,
    )
    tokens_per_step = args.batch_size * data_world * cfg.seq_len

    params, apply = fs.functional(model)

    def loss_fn(params, batch):
        logits = apply(params, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    step = build_step(args, loss_fn, model=apply, cfg=cfg, mesh=mesh)
    plan_text = fs.explain(step, params)  # from the full params, before init shards them
    resume_from = fs.latest(args.save_dir) if args.resume else None
    if resume_from is None:
        params, state = step.init(params)
    else:  # laid out by step.init, filled from the checkpoint (any world size or stack)
        params, state = fs.load(resume_from, step, params)
        log(f"resuming from {resume_from}")

    log(
        f"GPT {args.preset}: {model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers x "
        f"d={cfg.d_model}, seq {cfg.seq_len} | data: {len(train) / 1e6:.1f} MB train, "
        f"{len(val) / 1e6:.2f} MB val (stdlib .py bytes) | world {world} on {device} | global "
        f"batch {args.batch_size * data_world} x {cfg.seq_len} = {tokens_per_step} tokens/step"
    )
    eval_every = max(1, args.steps // 10)
    eval_seed = args.seed + 1
    gen = torch.Generator().manual_seed(args.seed)
    history = {"train_loss": [], "val_step": [0], "val_loss": []}
    schedule = lr_schedule(args, cfg)
    seqlen = seqlen_schedule(args, cfg.seq_len)

    def tokens_fed(a: int, b: int) -> int:
        """Tokens steps a+1..b feed the model (the curriculum's cut tails not counted)."""
        if seqlen is None:
            return (b - a) * tokens_per_step
        reshape = args.curriculum_mode == "reshape"  # T // L windows of L per sequence

        def per_sequence(L: int) -> int:
            return cfg.seq_len // L * L if reshape else L

        return args.batch_size * data_world * sum(per_sequence(seqlen(c)) for c in range(a, b))

    logger = metrics_logger(args, main_rank)  # rank 0 writes; the others' log() is a no-op
    losses = []  # 0-d tensors; read back only when logging (no per-step host sync on GPU)
    first = 1
    if resume_from is None:
        full = fs.gather_params(params, state, mesh=step.mesh)  # whole fp32 masters
        history["val_loss"].append(evaluate(apply, full, val, batch_kw, eval_seed))
        logger.log(0, {"val_loss": history["val_loss"][0]})
    else:
        # The loader position, RNG states and curve so far: the run goes on exactly as if
        # it had never stopped. The loader and the curve are the same on every rank (the
        # ranks draw the same global batches; the curve is the global mean), so rank 0's
        # serve any world size; each rank's own RNG states are its own extra's.
        extra = fs.load_extra(resume_from, rank=0)
        first = extra["step"] + 1
        gen.set_state(extra["loader_rng"])
        seed = extra.get("seed", args.seed)  # older checkpoints did not save it
        restore_rng_states(resume_from, rank, device, seed=seed, step=extra["step"])
        history = extra["history"]
        losses = [torch.tensor(v) for v in extra["losses"]]

    bar = tqdm(
        range(first, args.steps + 1),
        initial=first - 1,
        total=args.steps,
        disable=not main_rank,
        unit="step",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    eval_time = 0.0  # subtracted: tokens/s is training throughput
    last_it, last_time = first - 1, 0.0  # the previous logged step, for the interval's tokens/s
    for it in bar:
        batch = get_batch(train, gen, **batch_kw)
        params, state, metrics = step(params, state, batch)  # inputs donated: always rebind
        losses.append(torch.as_tensor(metrics["loss"]).detach().reshape(()))
        record = None
        if it % args.log_every == 0 or it == args.steps:
            # The global-batch mean (every rank calls it); its .item() syncs the device,
            # so the clock below is honest.
            loss = global_mean(losses[-1]).item()
            train_time = time.perf_counter() - start - eval_time
            tok_s = tokens_fed(last_it, it) / (train_time - last_time)
            last_it, last_time = it, train_time
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            # Every scalar the step reports (grad_norm, and lr, skipped_steps... where the
            # step has them); tensors are read back in one copy by the logger.
            record = {**metrics, "loss": loss, "tokens_per_s": tok_s}
            if "lr" not in record:
                record["lr"] = schedule(it - 1)  # the update of step it used count it - 1
        if it % eval_every == 0 or it == args.steps:
            t0 = time.perf_counter()
            history["val_step"].append(it)
            full = fs.gather_params(params, state, mesh=step.mesh)  # whole fp32 masters
            history["val_loss"].append(evaluate(apply, full, val, batch_kw, eval_seed))
            eval_time += time.perf_counter() - t0
            record = {**(record or {}), "val_loss": history["val_loss"][-1]}
            if main_rank:
                bar.write(f"step {it:5d}  val loss {history['val_loss'][-1]:.3f}")
        if record is not None:
            logger.log(it, record)
        if args.save_dir and ((args.save_every and it % args.save_every == 0) or it == args.steps):
            extra = {
                "step": it,
                "seed": args.seed,
                "loader_rng": gen.get_state(),
                **rng_states(device),  # this rank's own ([Note: RNG states per rank])
                "history": history,
                "losses": global_mean(torch.stack(losses)).tolist(),  # a collective
                "gpt_config": dataclasses.asdict(cfg),  # the model, for serve_gpt.py
            }
            fs.save(args.save_dir, params, state, at=it, keep=3, extra=extra, mesh=step.mesh)
    bar.close()
    logger.close()
    if args.export:  # a collective: every rank gathers, rank 0 writes
        full = fs.gather_params(params, state, mesh=step.mesh)
        fs.export(args.export, full, model=model)
    wall = time.perf_counter() - start
    train_time = wall - eval_time

    # One collective for the whole curve: each entry becomes the global-batch mean loss,
    # the number a world of one with the same global batch would have reported.
    history["train_loss"] = global_mean(torch.stack(losses)).tolist()
    tail = history["train_loss"][-max(1, args.steps // 20) :]
    summary = {
        "preset": args.preset,
        "params": model.num_params(),
        "world": world,
        "device": str(device),
        "steps": args.steps,
        "global_batch": args.batch_size * data_world,
        "seq_len": cfg.seq_len,
        "accumulate": args.accumulate,
        "checkpoint_activations": args.checkpoint_activations,
        "offload_activations": args.offload_activations,
        "curriculum": args.curriculum,
        "curriculum_mode": args.curriculum_mode if args.curriculum is not None else None,
        "random_ltd": args.random_ltd,
        "lr": args.lr,
        "seed": args.seed,
        "tokens": tokens_fed(0, args.steps),
        "first_train_loss": history["train_loss"][0],
        "final_train_loss": sum(tail) / len(tail),
        "final_val_loss": history["val_loss"][-1],
        "tokens_per_s": tokens_fed(first - 1, args.steps) / train_time,
        "train_time_s": train_time,
        "wall_time_s": wall,
        "flops_per_token": model.flops_per_token(),
    }
    summary["achieved_gflops"] = summary["tokens_per_s"] * summary["flops_per_token"] / 1e9
    if main_rank:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        title = f"GPT {args.preset} on stdlib bytes, world {world}"
        plot(out, history, title)
        out.with_suffix(".json").write_text(json.dumps({**summary, **history}, indent=1) + "\n")
        print(plan_text)
        print(
            f"done in {wall:.1f}s: train loss {summary['first_train_loss']:.3f} -> "
            f"{summary['final_train_loss']:.3f} (mean of last {len(tail)} steps), val loss "
            f"{history['val_loss'][0]:.3f} -> {summary['final_val_loss']:.3f} | "
            f"{summary['tokens_per_s']:,.0f} tokens/s ({summary['achieved_gflops']:.1f} GFLOP/s) "
            f"| wrote {out}, {out.with_suffix('.json')} and {logger.log_dir}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
