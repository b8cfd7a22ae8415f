"""The error-compensated 1-bit all-reduce (mean) of 1-bit Adam / 0/1 Adam / 1-bit LAMB.

Each of N ranks holds a flat fp32 vector ``x`` (the momentum). Rank ``i`` is the
"server" of chunk ``i`` of N:

1. worker: ``y = x + e_w``; compress ``y`` (signs + one scale per chunk row,
   ``fscale.kernels.onebit``, the scales sent as fp32 or as 8-bit codes); keep
   ``e_w = y - C(y)``;
2. ``all_to_all``: every rank sends server ``i`` its compressed chunk ``i``;
3. server: ``z = mean of the N decompressed chunks + e_s``; compress; keep
   ``e_s = z - C(z)``;
4. ``all_gather`` of the servers' compressed chunks; everyone decompresses the same
   vector, so the result is bitwise equal on every rank.

[Note: wire format and bytes]
A message is ``[packed signs | scales as bytes]`` (uint8), one per destination:
``n/8 + b * rows`` bytes go through the all_to_all and ``n/(8N) + b * rows/N``
through the all_gather (``b``: 4 for fp32 scales, 1 for codes), against ``4 n`` for
an fp32 all-reduce: a ratio of about ``(1 + 1/N) / 32`` plus scales. Both
collectives run through ``ctx.comm`` under one tag (``"compress.momentum"``), so the
step's ``comm_bytes_by_tag`` shows exactly this.

[Note: 8-bit scale codes]
The 1-bit optimizers' layout (``plan_momentum_layout``) has one scale per 32
elements, each sent as one byte ``c``: 0 for a zero scale, else ``2^((c - 128) /
4)`` (1 <= c <= 255: 2^-31.75 .. 2^31.75, a quarter octave apart). The sender rounds
``mean |y|`` to the nearest code in log2 and subtracts the *decoded* values, so the
error feedback keeps the rounding with the sign error, and every rank decodes the
same bits. Rounding moves a scale by a factor of at most ``2^(1/8)``, which keeps the
residual's contraction ([Note: the scale is mean |x|] in ``fscale/kernels/onebit.py``):
``||y - q sign(y)||^2 = ||y||^2 - n mu^2 (2 r - r^2)``, ``r = q / mu``, and ``2 r -
r^2 >= 0.99``. Bytes: ``(1/8 + 1/32)(1 + 1/N)`` per element, under 1/16 of fp32's 4
for every N >= 2, the same as fp32 scales per 128 elements; but 4x finer scales.
Why finer: one scale is the magnitude of every element of its chunk, and magnitudes
differ between neighbouring rows of a weight. Measured on tests/transforms/
test_onebit.py's text GPT (world 4, 80 steps, seeds 1-3), scales per 16/32/64/128/512
elements (fp32): 1-bit LAMB -1.2/-0.8/+1.6/+4.5/+10.0% above LAMB (mean of seeds),
1-bit Adam +1.2/+1.3/+1.8/+2.0/+2.5% above Adam; with the codes at 32, 1-bit LAMB
-0.2% and 1-bit Adam +1.3%. The generic ``plan_layout`` keeps exact fp32 scales.

Usage::

    lay = plan_momentum_layout(n, world)      # the 1-bit optimizers' (coded scales)
    lay = plan_layout(n, world)               # fp32 scales
    out = compressed_mean(ctx.comm, "compress.momentum", group, x, e_w, e_s, lay)
    outs = simulate_mean(xs, e_ws, e_ss, lay)        # the same maths, N ranks in one process
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fscale.hw import dispatch
from fscale.kernels import onebit_cpu
from fscale.kernels.onebit import (
    PACK,
    UNPACK,
    pack_reference,
    pack_residual_,
    server_mean_,
    unpack_,
    unpack_reference,
)

#: Largest chunk (elements) sharing one fp32 scale. Finer scales track layers of
#: different magnitude (a tiny GPT's loss after 60 steps: 15% above Adam's with 4096,
#: within 1% with 128) for 4 bytes per 128 elements: (1/8 + 1/32)(1 + 1/N) bytes per
#: element in all, under 1/16 of fp32's 4 for every N >= 2.
MAX_CHUNK = 128
#: Largest chunk sharing one 8-bit scale code ([Note: 8-bit scale codes]): the same
#: bytes as fp32 scales per MAX_CHUNK.
CODED_CHUNK = 32
#: Scale codes per octave, and the code of 2^0 ([Note: 8-bit scale codes]).
CODE_STEPS = 4
CODE_ONE = 128
_CODE_TABLES: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Layout:
    """``n`` real elements padded to ``world * rows * chunk``; server ``i`` owns ``rows``
    consecutive chunks (``rows * chunk`` elements) of the padded vector; ``codes``:
    scales sent as 8-bit codes, else fp32 ([Note: 8-bit scale codes])."""

    n: int
    world: int
    rows: int
    chunk: int
    codes: bool = False

    @property
    def server(self) -> int:
        return self.rows * self.chunk

    @property
    def padded(self) -> int:
        return self.world * self.server

    @property
    def message(self) -> int:
        """Bytes of one destination's message: packed signs + scales (fp32 or codes)."""
        return self.server // 8 + (1 if self.codes else 4) * self.rows


def plan_layout(n: int, world: int, max_chunk: int = MAX_CHUNK, *, codes: bool = False) -> Layout:
    """The padding and chunking of an ``n``-element vector over ``world`` servers."""
    if n < 1 or world < 1:
        raise ValueError(f"plan_layout: n and world must be >= 1, got n={n}, world={world}.")
    per_server = math.ceil(n / world)
    rows = math.ceil(per_server / max_chunk)
    chunk = 8 * math.ceil(math.ceil(per_server / rows) / 8)  # whole bytes of signs
    return Layout(n, world, rows, chunk, codes)


def plan_momentum_layout(n: int, world: int) -> Layout:
    """The 1-bit optimizers' layout: 8-bit scale codes per ``CODED_CHUNK`` elements."""
    return plan_layout(n, world, CODED_CHUNK, codes=True)


#: Elements compressed per block on a CPU ([Note: compressing in blocks on a CPU]).
CPU_BLOCK = 1 << 18
#: The smallest full block that takes the compiled CPU loop ([Note: signs and residual
#: in one CPU loop] in ``fscale/kernels/onebit.py``): short vectors are not worth a compile.
FUSED_MIN = 1 << 16

# [Note: compressing in blocks on a CPU]
# Every pass of the compression (|y| and its row means, the signs, the packed bytes,
# the +-scale values, the error update) reads and writes the whole vector. On a CPU a
# fresh model-sized temporary costs its page faults on every step (glibc serves tensors
# above 32 MiB by mmap: 84 MB of fp32 ~ 30 ms to fault in, more than the pass itself),
# and the passes run at DRAM speed. So on a CPU ``_compress_``, ``server_step`` and
# ``decode`` walk the rows in blocks of ``CPU_BLOCK`` elements (1 MiB of fp32): the
# temporaries stay in cache and on the heap, and the loop is ~80 iterations for 21M
# elements. Rows are independent (one scale per row), so the blocks give the same bits
# as one pass. The error buffers double as the vectors being compressed (``y = x +
# e_w`` is formed in ``e_w``, ``z = mean + e_s`` in ``e_s``), which removes two
# model-sized allocations. On CUDA the block is the whole vector: one kernel launch.


def _kernels(t: torch.Tensor):
    """The kernel table's pack and unpack for ``t``'s device, resolved once per call."""
    return dispatch.resolve(PACK, t).impl, dispatch.resolve(UNPACK, t.device, torch.float32).impl


def _code_table(device: torch.device) -> torch.Tensor:
    """(256,) fp32: the scale of each code ([Note: 8-bit scale codes])."""
    table = _CODE_TABLES.get(device)
    if table is None:
        c = torch.arange(256, dtype=torch.float64)
        table = torch.exp2((c - CODE_ONE) / CODE_STEPS).float()
        table[0] = 0.0
        _CODE_TABLES[device] = table = table.to(device)
    return table


def encode_scales(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales -> uint8 codes, the nearest in log2 (0 for a scale that is not > 0)."""
    c = torch.log2(scales).mul_(CODE_STEPS).round_().add_(CODE_ONE).clamp_(1, 255)
    return torch.where(scales > 0, c, 0.0).to(torch.uint8)


def decode_scales(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> their fp32 scales (a table lookup: equal bits on every rank)."""
    return torch.index_select(_code_table(codes.device), 0, codes.reshape(-1).to(torch.int32))


def _block_rows(t: torch.Tensor, rows: int, chunk: int) -> int:
    if t.device.type != "cpu":
        return max(rows, 1)
    return max(1, CPU_BLOCK // chunk)


def _compress_(
    y: torch.Tensor, pack, unpack, bits: torch.Tensor, scales: torch.Tensor, mag=None
) -> None:
    """Compress ``y`` (rows, chunk) into ``bits`` / ``scales`` (fp32, or uint8 codes),
    and leave the error feedback ``y - C(y)`` in ``y`` (``C`` with the scales sent);
    ``mag``: ``|y|`` when the caller has it already."""
    if pack is pack_reference:  # a CPU: signs and residual in one pass
        mag = y.abs() if mag is None else mag
        s = _sent_scales(mag.mean(dim=1), scales)  # pack_reference's scales
        # [Note: signs and residual in one CPU loop], on the full blocks of long vectors.
        fused = y.shape[0] == _block_rows(y, 0, y.shape[1]) and y.numel() >= FUSED_MIN
        bits.copy_(pack_residual_(y, s, fused=fused))
        return
    b, s = pack(y)
    s = _sent_scales(s, scales)
    bits.copy_(b)
    y.sub_(unpack(b, s))


def _fused(rows: int, step: int, chunk: int) -> bool:
    """A full CPU block of a long vector: the compiled loops' shapes ([Note: signs and
    residual in one CPU loop], [Note: unpacking in one CPU loop])."""
    return rows == step and rows * chunk >= FUSED_MIN


def _unpack(unpack, bits: torch.Tensor, scales: torch.Tensor, fused: bool) -> torch.Tensor:
    if unpack is unpack_reference:
        return unpack_(bits, scales, fused=fused)
    return unpack(bits, scales)


def _mean_of(pieces: torch.Tensor) -> torch.Tensor:
    """``pieces.mean(dim=0)`` of a (world, k) CPU tensor, the same bits, without the
    reduction kernel (~0.45 ms per 2^18 elements of two pieces, against ~0.3): the
    sum in rank order, as torch's, from +0.0 (a sum of -0.0s is +0.0 there), then
    divided by the count."""
    total = pieces[0] + pieces[1] if pieces.shape[0] > 1 else pieces[0] + 0.0
    for r in range(2, pieces.shape[0]):
        total.add_(pieces[r])
    return total.add_(0.0).div_(pieces.shape[0])


def _sent_scales(s: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Write ``s`` into ``scales`` as sent (fp32, or uint8 codes); returns the scales the
    receivers will decode, which the error feedback must use."""
    if scales.dtype != torch.uint8:
        scales.copy_(s)
        return s
    codes = encode_scales(s)  # [Note: 8-bit scale codes]
    scales.copy_(codes)
    return decode_scales(codes)


def _scales(rows: int, lay: Layout, device) -> torch.Tensor:
    dtype = torch.uint8 if lay.codes else torch.float32
    return torch.empty((rows,), dtype=dtype, device=device)


def _wire(bits: torch.Tensor, scales: torch.Tensor, world: int) -> torch.Tensor:
    scales = scales.reshape(world, -1).contiguous().view(torch.uint8)
    return torch.cat([bits.reshape(world, -1), scales], dim=1)


def _unwire(buf: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits and fp32 scales (codes decoded) of the messages in ``buf``."""
    buf = buf.view(-1, lay.message)
    nbits = lay.server // 8
    bits = buf[:, :nbits].reshape(-1, lay.chunk // 8)
    if lay.codes:
        return bits, decode_scales(buf[:, nbits:])
    # clone: a one-row slice is "contiguous" at an odd byte offset, which view() refuses.
    scales = buf[:, nbits:].reshape(-1).clone().view(torch.float32)
    return bits, scales


@torch.no_grad()
def worker_step(x, worker_error: torch.Tensor, lay: Layout, *, by_block=False) -> torch.Tensor:
    """Compress ``x + e_w`` (``x``: ``lay.n`` elements, padded with zeros, or a function
    that adds them into the ``(lay.n,)`` head of ``e_w`` it is given), update ``e_w`` in
    place; the outgoing messages, ``(world, message)`` uint8, row ``i`` for server ``i``.
    ``by_block``: ``x(part, lo, hi)`` adds elements ``lo:hi`` into ``part`` (``e_w[lo:hi]``)
    just before their block is compressed, while the block is in cache."""
    y = worker_error  # y = x + e_w, formed in place ([Note: compressing in blocks on a CPU])
    if by_block:  # x adds each block's elements in the loop below
        if not callable(x):
            raise TypeError("compressed mean: by_block needs x(part, lo, hi), a function.")
    elif callable(x):
        x(y[: lay.n])
    elif x.numel() != lay.n:
        raise ValueError(f"compressed mean: x has {x.numel()} elements, the layout {lay.n}.")
    else:
        y[: lay.n].add_(x.reshape(-1))
    rows, chunk = lay.world * lay.rows, lay.chunk
    y = y.view(rows, chunk)
    pack, unpack = _kernels(y)
    bits = torch.empty((rows, chunk // 8), dtype=torch.uint8, device=y.device)
    scales = _scales(rows, lay, y.device)
    step = _block_rows(y, rows, chunk)
    flat = y.view(-1)
    for r in range(0, rows, step):
        lo, hi = r * chunk, min((r + step) * chunk, lay.n)
        if by_block and lo < hi:
            x(flat[lo:hi], lo, hi)
        _compress_(y[r : r + step], pack, unpack, bits[r : r + step], scales[r : r + step])
    return _wire(bits, scales, lay.world)


@torch.no_grad()
def server_step(received: torch.Tensor, server_error: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Average the N received messages, add ``e_s``, recompress (``e_s`` updated in
    place); the message to all-gather, ``(message,)`` uint8."""
    world, rows, chunk = lay.world, lay.rows, lay.chunk
    bits_in, scales_in = _unwire(received, lay)
    bits_in = bits_in.view(world, rows, chunk // 8)
    scales_in = scales_in.view(world, rows)
    z = server_error.view(rows, chunk)  # z = mean + e_s, formed in place
    pack, unpack = _kernels(z)
    bits = torch.empty((rows, chunk // 8), dtype=torch.uint8, device=z.device)
    scales = _scales(rows, lay, z.device)
    step = _block_rows(z, rows, chunk)
    # The CPU loops: the reference kernels on a CPU (a GPU with FSCALE_KERNELS=reference
    # takes the torch ops below).
    cpu = unpack is unpack_reference and z.device.type == "cpu"
    mag = torch.empty((min(step, rows), chunk), dtype=torch.float32) if cpu else None
    for r in range(0, rows, step):
        k = min(step, rows - r)
        zb = z[r : r + k]
        # [Note: the server's mean in one CPU loop]; the C loop takes any block.
        if cpu and (_fused(k, step, chunk) or onebit_cpu.loops() is not None):
            server_mean_(bits_in[:, r : r + k], scales_in[:, r : r + k], zb, mag[:k], fused=True)
            _compress_(zb, pack, unpack, bits[r : r + k], scales[r : r + k], mag[:k])
            continue
        piece_bits = bits_in[:, r : r + k].reshape(world * k, chunk // 8)
        pieces = _unpack(unpack, piece_bits, scales_in[:, r : r + k].reshape(-1), False)
        pieces = pieces.view(world, k * chunk)
        zb.view(-1).add_(_mean_of(pieces) if cpu else pieces.mean(dim=0))
        _compress_(zb, pack, unpack, bits[r : r + k], scales[r : r + k])
    return _wire(bits, scales, 1).view(-1)


@torch.no_grad()
def decode(gathered: torch.Tensor, lay: Layout, into: list | None = None, each=None, packed=None):
    """The all-gathered messages of every server -> the ``n``-element mean; written
    into the contiguous fp32 tensors ``into`` (their elements in order, ``n`` in all)
    and ``into`` returned, when given ([Note: decoding into the destination]); or
    handed block by block, in order, to ``each(vals, lo, hi)`` (``vals``: elements
    ``lo:hi`` of the mean, a temporary valid during the call; returns None), which
    writes them where they go on the pass it makes over them while they are in cache;
    or, with ``packed``, hands the packed mean to ``packed(bits, scales)`` (contiguous
    ``(rows, chunk // 8)`` uint8 and fp32 ``(rows,)``; its first ``n`` elements are the
    mean) for a caller that unpacks it in its own loop."""
    bits, scales = _unwire(gathered, lay)
    if packed is not None:
        return packed(bits.contiguous(), scales.float().contiguous())
    rows, chunk = bits.shape[0], lay.chunk
    _, unpack = _kernels(bits)
    if into is None and each is None:
        out = torch.empty((rows, chunk), dtype=torch.float32, device=bits.device)
        step = _block_rows(out, rows, chunk)
        for r in range(0, rows, step):
            fused = _fused(min(step, rows - r), step, chunk)
            out[r : r + step] = _unpack(unpack, bits[r : r + step], scales[r : r + step], fused)
        return out.view(-1)[: lay.n]
    dests = [] if into is None else _flat_dests(into, lay.n)
    step = _block_rows(bits, rows, chunk)
    j = 0  # the first destination not yet filled
    for r in range(0, rows, step):
        fused = _fused(min(step, rows - r), step, chunk)
        vals = _unpack(unpack, bits[r : r + step], scales[r : r + step], fused).view(-1)
        lo, hi = r * chunk, min((r + step) * chunk, lay.n)
        if each is not None:
            if lo < hi:
                each(vals[: hi - lo], lo, hi)
            continue
        while j < len(dests) and dests[j][0] < hi:
            start, flat = dests[j]
            a, b = max(lo, start), min(hi, start + flat.numel())
            flat[a - start : b - start].copy_(vals[a - lo : b - lo])
            if b < start + flat.numel():
                break  # the rest of this destination is in the next block
            j += 1
    return into


# [Note: decoding into the destination]
# The decoded mean is the caller's next value of its momentum (or grads), leaf by leaf.
# Unpacking block by block straight into those leaves skips a model-sized output
# (on a CPU, 84 MB of fresh pages at 21M params: their faults cost more than the copy)
# and the caller's copy of it into the leaves; the bits are the same.


def _flat_dests(into: list, n: int) -> list:
    """``(start, flat view)`` of each destination; they must cover ``n`` elements."""
    dests, start = [], 0
    for t in into:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"decode: destinations must be contiguous fp32 tensors, got {t.dtype} "
                f"contiguous={t.is_contiguous()}; decode into a flat vector and copy instead."
            )
        dests.append((start, t.view(-1)))
        start += t.numel()
    if start != n:
        raise ValueError(f"decode: destinations hold {start} elements, the layout {n}.")
    return dests


@torch.no_grad()
def compressed_mean(
    comm,
    tag: str,
    group,
    x,
    worker_error,
    server_error,
    lay: Layout,
    *,
    into=None,
    each=None,
    by_block=False,
    packed=None,
):
    """The mean of ``x`` over ``group`` by 1-bit compression with error feedback.

    Args:
      comm: the step's tagged collectives (``ctx.comm``).
      tag: the tag both collectives are counted under.
      group: the data-parallel process group (``lay.world`` ranks).
      x: this rank's vector, ``lay.n`` elements, or a function that adds it into the
        ``(lay.n,)`` tensor it is given (the head of ``worker_error``).
      worker_error: fp32 ``(lay.padded,)``, this rank's worker error (updated in place).
      server_error: fp32 ``(lay.server,)``, this rank's server error (updated in place).
      lay: from ``plan_momentum_layout(n, world)`` or ``plan_layout(n, world)``.
      into: contiguous fp32 tensors, ``lay.n`` elements in all, to write the mean into
        ([Note: decoding into the destination]).
      by_block: ``x`` is called per block as ``x(part, lo, hi)`` (see ``worker_step``).
      each: instead of ``into``, ``each(vals, lo, hi)`` with each decoded block of the
        mean (see ``decode``).
      packed: instead, ``packed(bits, scales)`` with the packed mean (see ``decode``).

    Returns:
      The ``lay.n``-element fp32 estimate of the mean, equal on every rank (``into``
      when given; None with ``each``).
    """
    send = worker_step(x, worker_error, lay, by_block=by_block)
    received = comm.all_to_all(tag, send.view(-1), group=group)
    mine = server_step(received, server_error, lay)
    return decode(comm.all_gather(tag, mine, group=group), lay, into, each, packed)


@torch.no_grad()
def simulate_mean(xs: list, worker_errors: list, server_errors: list, lay: Layout) -> torch.Tensor:
    """``compressed_mean`` for ``len(xs)`` ranks in one process (tests, analysis)."""
    sends = [worker_step(x, e, lay) for x, e in zip(xs, worker_errors, strict=True)]
    # all_to_all: server i receives row i of every rank's messages, in rank order.
    mine = [
        server_step(torch.stack([s[i] for s in sends]), server_errors[i], lay)
        for i in range(lay.world)
    ]
    return decode(torch.cat(mine), lay)
