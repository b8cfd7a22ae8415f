"""ZeRO++'s quantized collectives, as lowerings of ZeRO-3's tagged collectives.

- ``quantized_all_gather``: qwZ. Each rank block-quantizes its shard to int8, one
  all-gather moves codes and scales (one byte buffer), every rank dequantizes all
  of it -- its own piece included, so every rank computes with the same weights.
- ``quantized_reduce_scatter``: qgZ. Each rank quantizes the chunk destined to each
  *peer* to int4, one all_to_all exchanges them, and the owner dequantizes and sums
  in fp32 with its own chunk, which never leaves the rank and stays exact (a
  reduce-scatter's self chunk does not travel either).
- ``quantized_all_reduce``: the same exchange, then an int8 all-gather of the
  reduced pieces (every rank, the owner too, keeps the dequantized values so that
  replicas stay identical). Under HSDP ZeRO-3 reduce-scatters in the shard group
  (intra-node) and all-reduces the shard over replicas (inter-node): both
  quantized, that is ZeRO++'s hierarchical qgZ.

[Note: qgZ error feedback]
With ``error_feedback`` a rank keeps, per exchange, what quantization dropped from
each peer chunk it sent (fp32, ``(n-1)/n`` of the unit's grads) and adds it to the
next step's chunk (Seide et al. 2014; Karimireddy et al. 2019), so the error does
not accumulate in the params. Exchanges are keyed by their order in the step
(``cursor``, reset at each ``loss_and_grad``): ZeRO-3 reduces units in backward
order, the same every step, so an exchange's buffer always has its shape (a buffer
that does not is an error: it came from a checkpoint of another mesh).

The buffers live in the method's state slot (``call.state["error"]``, an
``ErrorBuffers``) and are checkpointed: each rank's buffer of exchange ``i`` is row
``rank`` of a ``(mesh size, n-1, k)`` tensor sharded over every mesh dim, so
``fs.save`` writes every rank's and ``fs.load`` reads each rank its own. They are
made at the first exchange (the sizes are ZeRO-3's unit layout, known only then),
so ``fs.load`` asks the slot to make them first (``ErrorBuffers.make_entries``,
[Note: what load fills] in ``fscale/checkpoint.py``): a resumed run equals the
uninterrupted one bit for bit. A checkpoint of another world size is refused (a
rank's residuals are of the chunks it sent to its peers: they mean nothing on
another world). A checkpoint without them (saved without error feedback, or by an
fscale that did not restore them) warns once and the buffers start from zero;
the slot's plain metadata (``exchanges``, ``error_feedback``) is what tells.

Usage::

    lowerings = {"zero.params": partial(quantized_all_gather, fmt),
                 "zero.grads": partial(quantized_reduce, fmt)}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from fscale.hw import comm
from fscale.kernels import blockq
from fscale.placement import Placement, place


@dataclass(frozen=True)
class WireFormat:
    """How one collective travels: ``bits`` per code, ``block`` codes per scale."""

    bits: int
    block: int
    scale_dtype: torch.dtype = torch.float32
    error_feedback: bool = False
    mesh_dims: tuple[str, ...] = ()  # placement of error buffers (per rank)
    mesh_size: int = 1


def _code_bytes(cols: int, bits: int) -> int:
    return -(-cols * bits // 8)


def _pack(x: torch.Tensor, cols: int, fmt: WireFormat) -> torch.Tensor:
    """fp32 ``x`` (rows, cols padded to blocks) -> uint8 (rows, codes + scales).

    Only the codes of the ``cols`` real elements travel (the padded tail of the last
    block is rebuilt on arrival); the scales follow as raw bytes, one buffer per row.
    """
    rows = x.shape[0]
    codes, scales = blockq.quantize(x, fmt.bits, fmt.block, fmt.scale_dtype)
    codes = codes.view(torch.uint8).view(rows, -1)[:, : _code_bytes(cols, fmt.bits)]
    return torch.cat((codes, scales.view(torch.uint8).view(rows, -1)), dim=1)


def _unpack(payload: torch.Tensor, cols: int, fmt: WireFormat) -> torch.Tensor:
    """uint8 (rows, ...) from ``_pack`` -> fp32 (rows, cols) dequantized."""
    rows, nbytes = payload.shape[0], _code_bytes(cols, fmt.bits)
    codes = payload.new_zeros((rows, _padded(cols, fmt.block) * fmt.bits // 8))
    codes[:, :nbytes] = payload[:, :nbytes]
    codes = codes.view(-1)
    if fmt.bits == 8:
        codes = codes.view(torch.int8)
    # clone: a one-row slice counts as contiguous at an odd byte offset, which a
    # view as fp32 refuses.
    scales = payload[:, nbytes:].reshape(-1).clone().view(fmt.scale_dtype)
    out = blockq.dequantize(
        codes, scales, bits=fmt.bits, block=fmt.block, numel=codes.numel() * 8 // fmt.bits
    )
    return out.view(rows, -1)[:, :cols]


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


# ----------------------------------------------------------------------------- qwZ


def quantized_all_gather(fmt: WireFormat, call, t: torch.Tensor, *, group=None, async_op=False):
    """qwZ: int8 all-gather of ``t`` (this rank's flat shard); see the module doc."""
    if call.op != "all_gather" or comm.world_size(group) == 1 or t.dim() != 1:
        return call.default(t, group=group, async_op=async_op)
    n, k = comm.world_size(group), t.numel()
    kp = _padded(k, fmt.block)
    mine = t.new_zeros(kp, dtype=torch.float32)
    mine[:k] = t
    payload = _pack(mine.view(1, kp), k, fmt)
    handle = call.default(payload.view(-1), group=group, async_op=True)

    dtype = t.dtype

    def finish(gathered: torch.Tensor) -> torch.Tensor:
        return _unpack(gathered.view(n, -1), k, fmt).reshape(-1).to(dtype)

    return handle.then(finish) if async_op else finish(handle.wait())


# ----------------------------------------------------------------------------- qgZ


def _exchange(fmt: WireFormat, call, chunks: torch.Tensor, group) -> comm.Handle:
    """Sum over ranks of ``chunks[r]`` (rank r's chunk, (n, k)), fp32, on its owner.

    Peer chunks travel as int4 in one all_to_all (async: backward goes on while it
    runs); the own chunk stays exact. ``wait()`` gives the sum.
    """
    n, r = comm.world_size(group), comm.rank(group)
    k = chunks.shape[1]
    kp = _padded(k, fmt.block)
    peers = [j for j in range(n) if j != r]
    send = chunks.new_zeros((n - 1, kp), dtype=torch.float32)
    send[:, :k] = chunks[peers]
    error = _error_buffer(fmt, call, send[:, :k])[0] if fmt.error_feedback else None
    if error is not None:
        send[:, :k] += error
    payload = _pack(send, k, fmt)
    if error is not None:  # what this exchange drops, added back next step
        error.copy_(send[:, :k] - _unpack(payload, k, fmt))
    splits = [0 if j == r else 1 for j in range(n)]
    # comm.* with the call's tag, not call.default: that runs the op being lowered.
    handle = comm.all_to_all(
        payload,
        output_split_sizes=splits,
        input_split_sizes=splits,
        group=group,
        async_op=True,
        tag=call.tag,
    )
    own = chunks[r].to(torch.float32, copy=True)  # not a view: keeps 1/n of the buffer alive
    return handle.then(lambda got: _unpack(got, k, fmt).sum(dim=0) + own)


def quantized_reduce(fmt: WireFormat, call, t: torch.Tensor, *, op="sum", group=None, **kw):
    """qgZ lowering of ``"zero.grads"``: its reduce-scatter and (HSDP) all-reduce."""
    n = comm.world_size(group)
    if call.op not in ("reduce_scatter", "all_reduce") or op not in ("sum", "avg") or n == 1:
        return call.default(t, op=op, group=group, **kw)
    if call.op == "reduce_scatter":
        shape = (t.shape[0] // n, *t.shape[1:])
        handle = _exchange(fmt, call, t.reshape(n, -1), group).then(lambda out: out.view(shape))
    else:  # synchronous: HSDP calls it from the reduce-scatter's wait()
        handle = comm.Handle(_all_reduce(fmt, call, t.reshape(-1), group).view(t.shape))
    dtype = t.dtype  # not t: the closure would keep the whole input alive until wait()
    handle = handle.then(lambda out: (out / n if op == "avg" else out).to(dtype))
    return handle if kw.get("async_op", False) else handle.wait()


def _all_reduce(fmt: WireFormat, call, flat: torch.Tensor, group) -> torch.Tensor:
    """Quantized all-reduce: int4 exchange of 1/n pieces, then an int8 all-gather."""
    n = comm.world_size(group)
    size = flat.numel()
    k = -(-size // n)
    chunks = flat.new_zeros(n * k, dtype=torch.float32)
    chunks[:size] = flat
    mine = _exchange(fmt, call, chunks.view(n, k), group).wait()
    kp = _padded(k, fmt.block)
    piece = mine.new_zeros(kp)
    piece[:k] = mine
    gather_fmt = WireFormat(8, fmt.block, fmt.scale_dtype)
    payload = _pack(piece.view(1, kp), k, gather_fmt)
    gathered = comm.all_gather(payload.view(-1), group=group, tag=call.tag)
    return _unpack(gathered.view(n, -1), k, gather_fmt).reshape(-1)[:size]


# ----------------------------------------------------------------------------- error feedback


@dataclass(frozen=True)
class ErrorBuffers:
    """qgZ's error-feedback buffers by exchange index ([Note: qgZ error feedback]).

    Each buffer is this rank's ``(1, n-1, k)`` row of a ``(mesh_size, n-1, k)`` tensor
    sharded over ``mesh_dims``. Frozen: an exchange that makes a buffer returns a new
    ``ErrorBuffers`` (a skipped step returns the old slot, as for any state).
    """

    enabled: bool = False
    mesh_dims: tuple[str, ...] = ()
    mesh_size: int = 1
    buffers: dict = field(default_factory=dict)

    def describe_state(self) -> dict:
        return dict(self.buffers)

    def with_buffer(self, index: str, buf: torch.Tensor) -> ErrorBuffers:
        return ErrorBuffers(
            self.enabled, self.mesh_dims, self.mesh_size, {**self.buffers, index: buf}
        )

    def make_buffer(self, shape, dtype, device) -> torch.Tensor:
        """Zeros of this rank's ``shape`` ((1, n-1, k)), placed per rank."""
        buf = torch.zeros(shape, dtype=dtype, device=device)
        place(buf, Placement((self.mesh_size, *shape[1:]), self.mesh_dims))
        return buf

    def make_entries(self, saved: dict) -> None:
        """``fs.load``'s hook: make the checkpoint's buffers (zeros, filled by DCP next)."""
        if not self.enabled:
            return  # error feedback is off in this step: the saved buffers are not needed
        for index, (shape, dtype) in saved.items():
            if len(shape) != 3:
                continue  # not this layout: the first exchange warns that they restart
            if shape[0] != self.mesh_size:
                raise ValueError(
                    f"zeropp(error_feedback=True): the checkpoint's error-feedback buffer "
                    f"{index!r} was saved by a world of {shape[0]} ranks, but this step runs "
                    f"on {self.mesh_size}. Each rank's buffer holds what int4 dropped from "
                    f"the chunks it sent to its {shape[1]} peers, which means nothing on "
                    "another world; resume on the world that saved it, or load with "
                    "zeropp(error_feedback=False)."
                )
            # In place: fs.load calls it on the state step.init just made.
            self.buffers[index] = self.make_buffer((1, *shape[1:]), dtype, torch.device("cpu"))


def _error_buffer(fmt: WireFormat, call, like: torch.Tensor) -> torch.Tensor:
    """This exchange's error buffer ``(1, *like.shape)`` ([Note: qgZ error feedback])."""
    slot = call.state
    cursor = slot["cursor"]
    index = str(cursor)
    errors: ErrorBuffers = slot["error"]
    buf = errors.buffers.get(index)
    seen = slot.get("exchanges", 0)  # plain metadata: restored by fs.load
    if buf is not None and buf.shape[1:] != like.shape:
        raise ValueError(
            f"zeropp(error_feedback=True): exchange {cursor} of the step sends chunks of "
            f"shape {tuple(like.shape)}, but its error-feedback buffer holds "
            f"{tuple(buf.shape[1:])}: it was loaded from a checkpoint of another mesh "
            "(another shard/replicate split of the same ranks). Resume on the mesh that "
            "saved it, or load with zeropp(error_feedback=False)."
        )
    if buf is None:
        if cursor == 0 and not errors.buffers and (seen or not slot.get("error_feedback", True)):
            warnings.warn(
                "zeropp(error_feedback=True): the checkpoint this run was loaded from has no "
                "error-feedback buffers (it was saved without error feedback, or by an older "
                "fscale); they restart from zero.",
                stacklevel=2,
            )
        buf = errors.make_buffer((1, *like.shape), like.dtype, like.device)
        errors = errors.with_buffer(index, buf)
    elif buf.device != like.device:  # fs.load makes them on the host
        moved = errors.make_buffer(buf.shape, buf.dtype, like.device)
        buf = moved.copy_(buf)
        errors = errors.with_buffer(index, buf)
    call.state = {
        **slot,
        "cursor": cursor + 1,
        "error": errors,
        "exchanges": max(seen, cursor + 1),
        "error_feedback": True,
    }
    return buf
