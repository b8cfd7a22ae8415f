"""tensor_parallel on gloo worlds equals the world of one on the same global batch.

A tensor-parallel group sees one batch; the data dims split the global batch. The
split params are put back together from the ranks of a group (chunk by chunk for
the fused qkv) and compared with the world of one's. In float64: a split matmul
sums in another order, and over a few AdamW steps fp32 rounding of near-zero grads
(a key bias has none in exact arithmetic) grows to 1e-4 (with SGD it stays 1e-6);
float64 shows the maths is the same to 1e-9.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fscale as fs
from fscale.models import GPT, GPTConfig, gpt_loss
from fscale.transforms.tensor_parallel import Colwise, Rowwise, _slice
from tests.dist import run_world
from tests.helpers import error_text, max_rel_error

STEPS, SEQ, PER_GROUP = 3, 8, 2
OPT = lambda: fs.optim.adamw(1e-2, weight_decay=0.1)
transformers = pytest.importorskip("transformers")


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig.tiny(n_head=4, seq_len=SEQ)).double()
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double()


def _loss(kind: str, apply):
    if kind == "gpt":
        return gpt_loss(apply)
    return lambda p, b: apply(p, input_ids=b["x"], labels=b["x"]).loss


def _batches(kind: str, data_ranks: int):
    g = torch.Generator().manual_seed(7)
    vocab = 256 if kind == "gpt" else 61
    n = PER_GROUP * data_ranks
    return [
        {k: torch.randint(0, vocab, (n, SEQ), generator=g) for k in ("x", "y")}
        for _ in range(STEPS)
    ]


def _train(kind: str, mesh=None, data_rank: int = 0, data_ranks: int = 1, precision=None):
    model = _model(kind)
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(
        _loss(kind, apply), OPT(), mesh=mesh, model=apply,
        clip_norm=0.5,
    )  # fmt: skip
    if mesh is not None:
        step = fs.tensor_parallel(step, dim="tp")
    if precision:
        step = fs.mixed_precision(step, precision)
    params, state = step.init(params)
    layouts = {k: getattr(v, "_fscale_placement", None) for k, v in params.items()}
    losses = []
    for batch in _batches(kind, data_ranks):
        per = PER_GROUP
        local = {k: v[per * data_rank : per * (data_rank + 1)] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        losses.append(float(metrics["loss"]))
    return {k: v.detach().clone() for k, v in params.items()}, losses, layouts, metrics


def _rank(rank, world, kind, shapes):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for names, sizes in shapes:
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
        dp = sizes[0] if names[0] == "dp" else 1
        data_rank = mesh["dp"].get_local_rank() if "dp" in names else 0
        params, losses, layouts, metrics = _train(kind, mesh, data_rank, dp)
        out[names] = (params, losses, layouts, metrics["comm_bytes_by_tag"])
    return out


def _unsplit(pieces: list[torch.Tensor], placement) -> torch.Tensor:
    """The full tensor from every tp rank's piece (each holds its part of every chunk)."""
    chunked = [p.chunk(placement.chunks, dim=placement.dim) for p in pieces]
    return torch.cat(
        [torch.cat([c[i] for c in chunked], dim=placement.dim) for i in range(placement.chunks)],
        dim=placement.dim,
    )


@pytest.mark.parametrize(
    "kind,world,shapes",
    [
        ("gpt", 4, [(("dp", "tp"), (2, 2)), (("tp",), (4,))]),
        ("llama", 2, [(("tp",), (2,))]),
    ],
)
def test_tensor_parallel_equals_world_of_one(kind, world, shapes):
    results = run_world(_rank, world, kind, shapes)
    for names, sizes in shapes:
        dp = sizes[0] if names[0] == "dp" else 1
        expected, expected_losses, _, _ = (
            _train(kind, None, 0, 1) if dp == 1 else _reference(kind, dp)
        )
        tp = sizes[names.index("tp")]
        first = results[0][names]
        assert "tp.activations" in first[3]
        for rank in range(world):
            assert results[rank][names][1] == pytest.approx(expected_losses, rel=1e-12)
        full = {}
        for name, placement in first[2].items():
            if placement is None or not placement.sharded:
                full[name] = first[0][name]
            else:
                assert first[0][name].shape[placement.dim] * tp == placement.shape[placement.dim]
                full[name] = _unsplit([results[r][names][0][name] for r in range(tp)], placement)
        assert any(p is not None and p.sharded for p in first[2].values())
        assert max_rel_error(full, expected) <= 1e-9


def _reference(kind, dp):
    return _train(kind, None, 0, 1) if dp == 1 else _train_global(kind, dp)


def _train_global(kind, dp):
    """The world of one on the whole global batch (dp groups' batches stacked)."""
    model = _model(kind)
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(_loss(kind, apply), OPT(), model=apply, clip_norm=0.5)
    params, state = step.init(params)
    losses = []
    for batch in _batches(kind, dp):
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    return params, losses, None, None


def test_slice_takes_a_part_of_every_chunk():
    t = torch.arange(12).view(12, 1)  # three fused blocks of four rows
    assert _slice(t, 0, 3, 1, 2).flatten().tolist() == [2, 3, 6, 7, 10, 11]


def _errors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = GPT(GPTConfig.tiny(n_head=2, d_model=30))  # 2 heads of 15: no split over 4
    params, apply = fs.functional(model)
    step = fs.train_step(gpt_loss(apply), fs.optim.sgd(0.1), mesh=mesh, model=apply)
    heads = error_text(lambda: fs.tensor_parallel(step))
    nothing = error_text(lambda: fs.tensor_parallel(step, plan={"blocks.*.nope": Colwise()}))
    bad_style = error_text(lambda: fs.tensor_parallel(step, plan={"blocks.*.attn.proj": "row"}))
    no_dim = error_text(lambda: fs.tensor_parallel(step, dim="model"))
    outside = error_text(lambda: fs.tensor_parallel(step, plan={"head": Rowwise()}))
    return heads, nothing, bad_style, no_dim, outside


def test_build_errors():
    heads, nothing, bad_style, no_dim, outside = run_world(_errors, 4)[0]
    assert "do not split over the 4 ranks" in heads and "a head" in heads
    assert "'blocks.*.nope' names no module" in nothing
    assert "Colwise()" in bad_style
    assert "no dim 'model'" in no_dim
    assert "outside the model's units" in outside
