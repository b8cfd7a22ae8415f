"""Differentiable tagged collectives: each forward collective with its transpose as backward.

Model-parallel transforms (tensor and expert parallel) put collectives *inside* the
forward, so autograd must run their transposes in backward (JAX's transpose rules:
the transpose of all_gather is reduce-scatter, of all_to_all the all_to_all with
the splits swapped). Each op takes the step call's collectives (``ctx.comm``, so
bytes are counted per tag and a transform may replace a tag's lowering) and the
group of one mesh dim.

=================  ============================  ==========================================
op                 forward                       backward
=================  ============================  ==========================================
``copy_to``        identity                      all-reduce (sum) over the group
``reduce_from``    all-reduce (sum)              identity
``split_to``       this rank's rows              all-gather of every rank's rows
``gather_from``    all-gather of every rank's    this rank's rows
                   rows
``all_to_all``     all_to_all_single             all_to_all_single, splits swapped
=================  ============================  ==========================================

``copy_to``/``reduce_from`` are Megatron's f/g pair around a column- then
row-parallel linear; ``split_to``/``gather_from`` move between a replicated tensor
and rank-owned rows of it (rows may differ in count per rank: ``sizes``).

Usage::

    x = grad_comm.copy_to(comm, "tp.activations", group, x)        # before a colwise linear
    y = grad_comm.reduce_from(comm, "tp.activations", group, y)    # after a rowwise one
"""

from __future__ import annotations

import torch

from fscale.hw import comm as comm_table


def copy_to(comm, tag: str, group, x: torch.Tensor) -> torch.Tensor:
    """Identity; backward sums the grads of every rank of ``group``."""
    return _CopyTo.apply(x, comm, tag, group)


def reduce_from(comm, tag: str, group, x: torch.Tensor) -> torch.Tensor:
    """The sum over ``group`` of every rank's ``x``; backward is the identity."""
    return _ReduceFrom.apply(x, comm, tag, group)


def split_to(comm, tag: str, group, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's rows of a replicated ``x`` (rank ``r`` owns ``sizes[r]`` rows, in order)."""
    return _SplitTo.apply(x, comm, tag, group, tuple(sizes))


def gather_from(comm, tag: str, group, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (``x`` holds ``sizes[rank]`` rows)."""
    return _GatherFrom.apply(x, comm, tag, group, tuple(sizes))


def all_to_all(comm, tag: str, group, x, out_splits: list[int], in_splits: list[int]):
    """``all_to_all_single`` with uneven splits; backward swaps them."""
    return _AllToAll.apply(x, comm, tag, group, list(out_splits), list(in_splits))


# ----------------------------------------------------------------------------- helpers


def _all_reduce(comm, tag, group, t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().clone()
    comm.all_reduce(tag, t, op="sum", group=group)
    return t


def _gather_rows(comm, tag, group, x: torch.Tensor, sizes) -> torch.Tensor:
    """All-gather of uneven row counts: pad every rank's rows to the largest count."""
    most = max(sizes)
    pad = most - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    gathered = comm.all_gather(tag, x.contiguous(), group=group)
    parts = gathered.view(len(sizes), most, *x.shape[1:])
    return torch.cat([parts[r, :n] for r, n in enumerate(sizes)])


def _own_rows(x: torch.Tensor, sizes, group) -> torch.Tensor:
    rank = comm_table.rank(group) if len(sizes) > 1 else 0
    start = sum(sizes[:rank])
    return x.narrow(0, start, sizes[rank])


# ----------------------------------------------------------------------------- autograd


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(x, comm, tag, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.tag, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(ctx.comm, ctx.tag, ctx.group, grad), None, None, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(x, comm, tag, group):
        return _all_reduce(comm, tag, group, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _SplitTo(torch.autograd.Function):
    @staticmethod
    def forward(x, comm, tag, group, sizes):
        return _own_rows(x, sizes, group).clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.tag, ctx.group, ctx.sizes = inputs

    @staticmethod
    def backward(ctx, grad):
        full = _gather_rows(ctx.comm, ctx.tag, ctx.group, grad, ctx.sizes)
        return full, None, None, None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(x, comm, tag, group, sizes):
        return _gather_rows(comm, tag, group, x, sizes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, _, ctx.group, ctx.sizes = inputs

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.sizes, ctx.group).clone(), None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(x, comm, tag, group, out_splits, in_splits):
        return comm.all_to_all(
            tag,
            x.contiguous(),
            output_split_sizes=out_splits,
            input_split_sizes=in_splits,
            group=group,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.comm, ctx.tag, ctx.group, ctx.out_splits, ctx.in_splits = inputs

    @staticmethod
    def backward(ctx, grad):
        back = ctx.comm.all_to_all(
            ctx.tag,
            grad.contiguous(),
            output_split_sizes=ctx.in_splits,
            input_split_sizes=ctx.out_splits,
            group=ctx.group,
        )
        return back, None, None, None, None, None
