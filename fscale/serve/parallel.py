"""Tensor parallelism for the serving engine: the group, the weight shards, the requests
rank 0 hands to the other ranks.

Usage::

    tp = TensorParallel.create(2)                  # every rank of the launched world calls it
    lm = load_model(model_dir, tp=tp)              # this rank's heads / hidden units, or
    lm = shard_model(lm, tp)                       # the same from a whole model
    Decoder(lm, device=dev, tp=tp)                 # o / down outputs all-reduced over tp.group

[Note: Megatron-style serving]
Each rank of a tensor-parallel group of N holds 1/N of the attention heads (the q, k
and v rows of its heads; its KV cache stores only its KV heads) and 1/N of the MLP
hidden units (gate/up or fc rows, down columns). A layer's attention output
projection and MLP down projection each give a partial sum on every rank; one
``comm.all_reduce(op="sum")`` over the group completes it, and the biases of those two
projections are added once, after the sum. The token embedding and the LM head are
split by vocabulary (``vocab_rows``, ceil(V / N) rows per rank): a rank looks up the
tokens in its rows (zeros for the others) and one all-reduce completes the
embeddings, exactly, since every sum has one nonzero term; it multiplies by its head
rows and one all-gather assembles the logits, so every rank samples from the same
full row. Norms and position embeddings are replicated, so after each all-reduce
every rank holds the same residual stream.

[Note: replicated KV heads]
With fewer KV heads than ranks (Llama-3-70B's 8 at tensor_parallel=16, a 2-KV-head
model at 4), a KV head cannot be split. Where N is a multiple of the KV heads, each rank
holds one KV head, the one its query heads read: rank r's query heads are
[r H/N, (r + 1) H/N), which lie in one GQA group of H/KV heads (H/N <= H/KV and N/KV
ranks share each group's boundaries), the group of KV head r // (N / KV). So the N / KV
ranks of a group hold the same k/v rows and write the same values to their caches,
as vLLM does; attention on each rank is plain GQA over its one KV head.

[Note: one engine loop on every rank]
Every rank runs the same ``Engine.step()`` SPMD: the scheduler, the block manager and
the sampler are replicated and deterministic, so given the same requests in the same
order every rank schedules the same batches, writes the same cache slots and samples
the same tokens (seeded generators are equal per rank; logits are equal after the
all-reduce). Requests enter on rank 0 only: ``add_request`` / ``abort`` there also
append a message to an outbox, and each ``step()`` starts with rank 0 broadcasting the
outbox (a length, then pickled bytes when there is anything) to the group; the other
ranks apply the messages in order before scheduling. They run ``Engine.follow()``, a
loop of ``step()`` that returns when rank 0 calls ``Engine.shutdown()``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

from fscale.hw import comm
from fscale.serve.models.decoder import (
    DecoderConfig,
    LoadedModel,
    kv_heads_per_rank,
    map_params,
)


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group: ``size`` ranks, this one is ``rank`` (within the group)."""

    size: int
    rank: int
    group: object = None  # a comm process group; None is the whole world

    @staticmethod
    def create(size: int | str) -> TensorParallel:
        """The group of this rank. ``size="world"`` takes the launched world's size. A
        world of W ranks is split into W / size consecutive groups (``new_group`` is
        called for every group, on every rank, as torch requires)."""
        world = comm.world_size()
        if size == "world":
            size = world
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel must be an int >= 1 or 'world', got {size!r}.")
        if size == 1:
            return TensorParallel(1, 0, None)
        if not comm.is_initialized() or world % size:
            raise RuntimeError(
                f"tensor_parallel={size} needs a launched world whose size it divides "
                f"(this one has {world} rank(s)); start with torchrun --nproc-per-node {size} "
                "and fs.init_distributed first."
            )
        if size == world:
            return TensorParallel(size, comm.rank(), None)
        me, mine = comm.rank(), None
        for start in range(0, world, size):
            g = comm.new_group(range(start, start + size))
            if start <= me < start + size:
                mine = g
        return TensorParallel(size, me % size, mine)

    @property
    def leader(self) -> bool:
        return self.rank == 0


def check_divisible(cfg: DecoderConfig, size: int) -> None:
    """Heads and MLP hidden units must split evenly over ``size`` ranks; KV heads too,
    or ``size`` must be a multiple of them ([Note: replicated KV heads])."""
    if size == 1:
        return
    bad = [
        f"{name}={n}"
        for name, n in (("num_heads", cfg.num_heads), ("intermediate", cfg.intermediate))
        if n % size
    ]
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        bad.append(f"num_kv_heads={kv}")
    if bad:
        raise ValueError(
            f"tensor_parallel={size} does not divide {cfg.arch}'s {', '.join(bad)}: each rank "
            f"holds 1/{size} of the attention heads and MLP units, and 1/{size} of the KV "
            "heads (or one KV head, shared by several ranks, when the size is a multiple of "
            "them); pick a tensor_parallel size that fits all three."
        )


def first_kv_head(cfg: DecoderConfig, tp: TensorParallel) -> int:
    """The first KV head of rank ``tp.rank`` ([Note: replicated KV heads])."""
    kv = cfg.num_kv_heads
    if kv >= tp.size:
        return tp.rank * (kv // tp.size)
    return tp.rank // (tp.size // kv)


#: Param names (suffixes) that ``shard_param`` slices along K, their input features:
#: each rank holds every row, a part of each (the group sums their products).
ROW_PARALLEL = (".o.weight", ".down.weight")


def shard_model(lm: LoadedModel, tp: TensorParallel) -> LoadedModel:
    """This rank's slice of ``lm`` (see [Note: Megatron-style serving]); the config stays
    the whole model's. Plain tensors only: quantize after sharding."""
    if tp.size == 1:
        return lm
    check_divisible(lm.config, tp.size)
    out = map_params(lm.params, lambda k, v: shard_param(lm.config, tp, k, v))
    return LoadedModel(lm.config, out, lm.name, lm.tokenizer_path, dict(lm.extra))


def shard_param(cfg: DecoderConfig, tp: TensorParallel, name: str, t: torch.Tensor):
    """This rank's slice of the param ``name`` (the decoder's names) of a model of
    ``cfg``, whose sizes ``check_divisible`` has accepted: q/k/v rows of its heads,
    gate/up or fc rows and down columns of its units, o columns of its heads, the
    head's and the token embedding's rows of its vocabulary slice (``vocab_rows``);
    the rest (position embeddings, norms, o / down biases) whole. A head tied to the
    embedding is the embedding's slice."""
    if tp.size == 1:
        return t
    if name in ("head.weight", "embed.weight") and t.shape[0] == cfg.vocab_size:
        lo, hi, _ = vocab_rows(cfg.vocab_size, tp)
        return t[lo:hi].contiguous()
    if not name.startswith("layers."):
        return t
    n, r, D = tp.size, tp.rank, cfg.head_dim
    hq, hkv, inter = cfg.num_heads // n, kv_heads_per_rank(cfg, n), cfg.intermediate // n
    q_size, kv_size = cfg.num_heads * D, cfg.num_kv_heads * D
    k0 = first_kv_head(cfg, tp) * D  # this rank's k (and v) rows start here

    def rows(spans) -> torch.Tensor:
        return torch.cat([t[a:b] for a, b in spans], dim=0).contiguous()

    kind = name.split(".", 2)[2]
    if kind in ("qkv.weight", "qkv.bias"):
        return rows(
            [
                (r * hq * D, (r + 1) * hq * D),
                (q_size + k0, q_size + k0 + hkv * D),
                (q_size + kv_size + k0, q_size + kv_size + k0 + hkv * D),
            ]
        )
    if kind in ("gate_up.weight", "gate_up.bias"):
        mine = (r * inter, (r + 1) * inter)
        return rows([mine, (cfg.intermediate + mine[0], cfg.intermediate + mine[1])])
    if kind in ("fc.weight", "fc.bias"):
        return rows([(r * inter, (r + 1) * inter)])
    if kind == "o.weight":
        return t[:, r * hq * D : (r + 1) * hq * D].contiguous()
    if kind == "down.weight":
        return t[:, r * inter : (r + 1) * inter].contiguous()
    return t  # norms, o / down biases (added once after the all-reduce)


def vocab_rows(vocab: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(first, end, per): the head rows (vocabulary entries) this rank computes logits
    for, ``per = ceil(vocab / size)`` per rank; the last rank's slice may be shorter
    (the decoder pads it to ``per`` for the gather)."""
    per = -(-vocab // tp.size)
    lo = min(vocab, tp.rank * per)
    return lo, min(vocab, lo + per), per


def broadcast_messages(tp: TensorParallel, outbox: list, device: torch.device) -> list:
    """Rank 0's ``outbox`` on every rank of the group (a length, then the pickled bytes
    when there are any); rank 0 gets its own list back."""
    data = pickle.dumps(outbox) if tp.leader and outbox else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    comm.broadcast(size, src=0, group=tp.group, tag="serve.requests")
    n = int(size.item())
    if n == 0:
        return []
    if tp.leader:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
    comm.broadcast(buf, src=0, group=tp.group, tag="serve.requests")
    return outbox if tp.leader else pickle.loads(buf.cpu().numpy().tobytes())


def agree_min(tp: TensorParallel, value: int, device: torch.device) -> int:
    """The smallest ``value`` over the group (e.g. KV blocks that fit on every rank)."""
    if tp.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    comm.all_reduce(t, op="min", group=tp.group, tag="serve.sizing")
    return int(t.item())
