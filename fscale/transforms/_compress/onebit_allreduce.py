"""The error-compensated 1-bit all-reduce (mean) of 1-bit Adam / 0/1 Adam / 1-bit LAMB.

Each of N ranks holds a flat fp32 vector ``x`` (the momentum). Rank ``i`` is the
"server" of chunk ``i`` of N:

1. worker: ``y = x + e_w``; compress ``y`` (signs + one scale per chunk row,
   ``fscale.kernels.onebit``); keep ``e_w = y - C(y)``;
2. ``all_to_all``: every rank sends server ``i`` its compressed chunk ``i``;
3. server: ``z = mean of the N decompressed chunks + e_s``; compress; keep
   ``e_s = z - C(z)``;
4. ``all_gather`` of the servers' compressed chunks; everyone decompresses the same
   vector, so the result is bitwise equal on every rank.

[Note: wire format and bytes]
A message is ``[packed signs | fp32 scales as bytes]`` (uint8), one per destination:
``n/8 + 4 * rows`` bytes go through the all_to_all and ``n/(8N) + 4 * rows/N``
through the all_gather, against ``4 n`` for an fp32 all-reduce: a ratio of about
``(1 + 1/N) / 32`` plus scales (one per ``<= 4096`` elements). Both collectives run
through ``ctx.comm`` under one tag (``"compress.momentum"``), so the step's
``comm_bytes_by_tag`` shows exactly this.

Usage::

    lay = plan_layout(n, world)
    out = compressed_mean(ctx.comm, "compress.momentum", group, x, e_w, e_s, lay)
    outs = simulate_mean(xs, e_ws, e_ss, lay)        # the same maths, N ranks in one process
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fscale.kernels.onebit import onebit_pack, onebit_unpack

#: Largest chunk (elements) sharing one scale. Finer scales track layers of different
#: magnitude (a tiny GPT's loss after 60 steps: 15% above Adam's with 4096, within 1%
#: with 128) for 4 bytes per 128 elements: (1/8 + 1/32)(1 + 1/N) bytes per element in
#: all, under 1/16 of fp32's 4 for every N >= 2.
MAX_CHUNK = 128


@dataclass(frozen=True)
class Layout:
    """``n`` real elements padded to ``world * rows * chunk``; server ``i`` owns ``rows``
    consecutive chunks (``rows * chunk`` elements) of the padded vector."""

    n: int
    world: int
    rows: int
    chunk: int

    @property
    def server(self) -> int:
        return self.rows * self.chunk

    @property
    def padded(self) -> int:
        return self.world * self.server

    @property
    def message(self) -> int:
        """Bytes of one destination's message: packed signs + fp32 scales."""
        return self.server // 8 + 4 * self.rows


def plan_layout(n: int, world: int, max_chunk: int = MAX_CHUNK) -> Layout:
    """The padding and chunking of an ``n``-element vector over ``world`` servers."""
    if n < 1 or world < 1:
        raise ValueError(f"plan_layout: n and world must be >= 1, got n={n}, world={world}.")
    per_server = math.ceil(n / world)
    rows = math.ceil(per_server / max_chunk)
    chunk = 8 * math.ceil(math.ceil(per_server / rows) / 8)  # whole bytes of signs
    return Layout(n, world, rows, chunk)


def _compress(y: torch.Tensor, rows: int, chunk: int):
    bits, scales = onebit_pack(y.view(rows, chunk))
    return bits, scales, onebit_unpack(bits, scales).view(-1)


def _wire(bits: torch.Tensor, scales: torch.Tensor, world: int) -> torch.Tensor:
    scales = scales.reshape(world, -1).contiguous().view(torch.uint8)
    return torch.cat([bits.reshape(world, -1), scales], dim=1)


def _unwire(buf: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    buf = buf.view(-1, lay.message)
    nbits = lay.server // 8
    bits = buf[:, :nbits].reshape(-1, lay.chunk // 8)
    # clone: a one-row slice is "contiguous" at an odd byte offset, which view() refuses.
    scales = buf[:, nbits:].reshape(-1).clone().view(torch.float32)
    return bits, scales


@torch.no_grad()
def worker_step(x: torch.Tensor, worker_error: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Compress ``x + e_w`` (``x`` padded), update ``e_w`` in place; the outgoing
    messages, ``(world, message)`` uint8, row ``i`` for server ``i``."""
    y = x + worker_error
    bits, scales, approx = _compress(y, lay.world * lay.rows, lay.chunk)
    torch.sub(y, approx, out=worker_error)
    return _wire(bits, scales, lay.world)


@torch.no_grad()
def server_step(received: torch.Tensor, server_error: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Average the N received messages, add ``e_s``, recompress (``e_s`` updated in
    place); the message to all-gather, ``(message,)`` uint8."""
    bits, scales = _unwire(received, lay)
    pieces = onebit_unpack(bits, scales).view(lay.world, lay.server)
    z = pieces.mean(dim=0).add_(server_error)
    bits, scales, approx = _compress(z, lay.rows, lay.chunk)
    torch.sub(z, approx, out=server_error)
    return _wire(bits, scales, 1).view(-1)


@torch.no_grad()
def decode(gathered: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The all-gathered messages of every server -> the ``n``-element mean."""
    bits, scales = _unwire(gathered, lay)
    return onebit_unpack(bits, scales).view(-1)[: lay.n]


def _padded(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    if x.numel() != lay.n:
        raise ValueError(f"compressed mean: x has {x.numel()} elements, the layout {lay.n}.")
    out = x.new_zeros(lay.padded, dtype=torch.float32)
    out[: lay.n] = x.reshape(-1)
    return out


@torch.no_grad()
def compressed_mean(comm, tag: str, group, x, worker_error, server_error, lay: Layout):
    """The mean of ``x`` over ``group`` by 1-bit compression with error feedback.

    Args:
      comm: the step's tagged collectives (``ctx.comm``).
      tag: the tag both collectives are counted under.
      group: the data-parallel process group (``lay.world`` ranks).
      x: this rank's vector, ``lay.n`` elements.
      worker_error: fp32 ``(lay.padded,)``, this rank's worker error (updated in place).
      server_error: fp32 ``(lay.server,)``, this rank's server error (updated in place).
      lay: from ``plan_layout(n, world)``.

    Returns:
      The ``lay.n``-element fp32 estimate of the mean, equal on every rank.
    """
    send = worker_step(_padded(x, lay), worker_error, lay)
    received = comm.all_to_all(tag, send.view(-1), group=group)
    mine = server_step(received, server_error, lay)
    return decode(comm.all_gather(tag, mine, group=group), lay)


@torch.no_grad()
def simulate_mean(xs: list, worker_errors: list, server_errors: list, lay: Layout) -> torch.Tensor:
    """``compressed_mean`` for ``len(xs)`` ranks in one process (tests, analysis)."""
    sends = [worker_step(_padded(x, lay), e, lay) for x, e in zip(xs, worker_errors, strict=True)]
    # all_to_all: server i receives row i of every rank's messages, in rank order.
    mine = [
        server_step(torch.stack([s[i] for s in sends]), server_errors[i], lay)
        for i in range(lay.world)
    ]
    return decode(torch.cat(mine), lay)
