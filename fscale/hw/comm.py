"""The comm table: every collective fscale runs, lowered per backend.

Nothing else in fscale calls ``torch.distributed``. Each collective is a named op with
a lowering per backend, modelled on JAX's per-platform lowering rules: ``"nccl"``,
``"gloo"`` and ``"single"`` (a world of one with no process group at all: the
embedded default, so every op works without ``init_process_group``). A transform
never swaps an entry here: it replaces the lowering of one *tagged* collective for its
own step only (``Step.with_transform(..., lowerings={tag: fn})``, see
``fscale/hw/tagged.py``); stages reach collectives through ``ctx.comm`` with a tag,
and the bytes are counted per op and per tag.

Usage::

    from fscale.hw import comm
    full = comm.all_gather(shard)                       # concat of every rank's shard
    mine = comm.reduce_scatter(grad_flat, op="avg")     # this rank's reduced chunk
    h = comm.all_reduce(t, async_op=True); ...; t = h.wait()
    with comm.counting() as c:
        step(params, state, batch)
    c.ops["reduce_scatter"].bytes                        # payload this rank handed in

Ranks given to ops (``src``, ``dst``) are ranks *within* ``group``, as ``rank(group)``
returns them; ``new_group`` must be called by every rank, members or not.

[Note: gloo gaps]
Checked against torch 2.13's gloo (see tests/hw/test_comm.py, which runs each case):
- fp8 (float8_e4m3fn, float8_e5m2, ...): gloo rejects them ("Invalid scalar type"),
  and a collective that fails on one rank leaves the others blocked in it, so the
  group is lost. Data movement (all_gather, all_to_all, broadcast, send/recv) sends
  the bytes as a ``.view(torch.uint8)``: exact, same size. Reductions cannot add
  bytes: they widen to fp32, reduce, and round once back into the fp8 tensor.
- avg: older gloo has no AVG and torch 2.13's rejects integer tensors. Lowered as
  sum then divide by the group size (integers truncate toward zero, as NCCL's
  integer average does); done the same way in reduce_scatter.
- reduce_scatter: torch 2.13's gloo has ``reduce_scatter_single`` for every
  non-fp8 dtype, so the gloo entry uses it. In principle it moves (n-1)/n of the
  tensor where all-reduce + slice moves 2(n-1)/n, but measured on a rate-limited
  link (bench/compress_link.py's calibration) gloo's takes an all-reduce's time:
  the cost model's gloo link (``fscale/hw/cost.py``) charges it 2(n-1)/n.
  ``reduce_scatter_via_all_reduce`` is the
  fallback for a gloo (or dtype) without it: correct on every backend and tested
  against the native one; ``register_lowering("reduce_scatter", "gloo", ...)``
  installs it.
- all_to_all: the list form needs equal sizes on gloo; all_to_all_single takes
  uneven splits (zero included), so that is the only form used.
- Every backend call gets contiguous tensors (gloo raises on strided ones); an
  in-place op on a strided tensor works on a contiguous copy and copies back.
The nccl entries call torch.distributed directly: on 2 x H200 (torch 2.11, NCCL
2.28.9) every op, fp8 reductions and integer avg included, gave the same bits as
these gloo lowerings (tests/hw/test_comm.py::test_collectives_on_nccl).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

BACKENDS = ("nccl", "gloo", "single")
REDUCE_OPS = ("sum", "avg", "max", "min")
_FP8 = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


# --------------------------------------------------------------------------- world


def is_initialized() -> bool:
    """True when a torch.distributed process group exists (else: the world of one)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (the world when None); 1 when not initialised."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank within ``group``; 0 when not initialised, -1 if not a member."""
    return dist.get_rank(group) if is_initialized() else 0


def backend(group=None) -> str:
    """The comm-table backend that serves ``group``: "nccl", "gloo" or "single"."""
    return _backend(group, None)


def _backend(group, t: torch.Tensor | None) -> str:
    if not is_initialized():
        return "single"
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a device-mapped group such as "cpu:gloo,cuda:nccl"
        by_device = dict(part.split(":", 1) for part in name.split(","))
        device = t.device.type if t is not None else "cuda" if "cuda" in by_device else "cpu"
        name = by_device.get(device, name)
    return name


def new_group(ranks):
    """A process group over ``ranks`` (global ranks). Every rank must call it.

    In the world of one only ``[0]`` is possible and the result is None (the world).
    """
    ranks = sorted(int(r) for r in ranks)
    if not is_initialized():
        if ranks != [0]:
            raise ValueError(
                f"new_group({ranks}): torch.distributed is not initialised, so the world "
                "is rank 0 alone; launch with torchrun (or init_process_group) for more ranks."
            )
        return None
    return dist.new_group(ranks=ranks)


def _global_rank(group, r: int) -> int:
    n = world_size(group)
    if not 0 <= r < n:
        raise ValueError(f"rank {r} is outside the group of {n} ranks; give a rank in [0, {n}).")
    if group is None or not is_initialized() or group is dist.group.WORLD:
        return r
    return dist.get_global_rank(group, r)


# --------------------------------------------------------------------------- handles


class Handle:
    """An issued collective. ``wait()`` blocks, finishes and returns its result tensor.

    The result is only valid after ``wait()`` (some lowerings finish on the host, e.g.
    the divide of a gloo average). In the world of one a handle is already complete.
    """

    __slots__ = ("_result", "_work", "_finish", "_done")

    def __init__(self, result: torch.Tensor, work=None, finish: Callable | None = None):
        self._result, self._work, self._finish, self._done = result, work, finish, False

    def wait(self) -> torch.Tensor:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            if self._finish is not None:
                self._result = self._finish()
            self._done, self._work, self._finish = True, None, None
        return self._result

    @property
    def pending_result(self) -> torch.Tensor | None:
        """The tensor ``wait()`` will return, if the lowering fills it in place.

        Lets a caller hand the buffer on before the collective completes (and
        ``wait()`` later, before anyone reads it). None where the result is only
        made at ``wait()`` (e.g. a slice of an all-reduce).
        """
        if self._done:
            return self._result
        in_place = self._finish is None or getattr(self._finish, "in_place", False)
        return self._result if in_place else None

    @property
    def buffer(self) -> torch.Tensor | None:
        """The output buffer the collective writes (allocated at issue; read it only after
        ``wait()``). For memory accounting of in-flight collectives."""
        return self._result

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
        """A handle whose ``wait()`` returns ``fn(self.wait())`` (a lowering that post-
        processes an async result, e.g. casts it back)."""
        return Handle(None, self, lambda: fn(self.wait()))

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()


def _complete(result, work, async_op: bool, finish: Callable | None = None):
    """What a lowering returns: the result (sync) or a Handle (async)."""
    handle = Handle(result, work, finish)
    return handle if async_op else handle.wait()


# --------------------------------------------------------------------------- stats


@dataclass
class CommStats:
    calls: int = 0
    bytes: int = 0


@dataclass
class Counts:
    """Counts per op name. ``ops``: every call. ``wire``: only the calls whose lowering
    reached a backend itself rather than through other comm ops; a compressed lowering
    that quantizes and calls ``all_gather`` shows its packed bytes there, so summing
    ``wire`` compares a compressed step with a plain one without double counting."""

    ops: dict[str, CommStats] = field(default_factory=dict)
    wire: dict[str, CommStats] = field(default_factory=dict)
    # Per tag ("dp.grads", "zero.params", ...): the calls a stage made with that tag,
    # counted once at the outermost call (a compressed lowering's inner ops are not).
    tags: dict[str, CommStats] = field(default_factory=dict)

    def _add(self, op: str, nbytes: int, leaf: bool, tag: str | None = None) -> None:
        for table in (self.ops, self.wire) if leaf else (self.ops,):
            s = table.setdefault(op, CommStats())
            s.calls += 1
            s.bytes += nbytes
        if tag is not None:
            s = self.tags.setdefault(tag, CommStats())
            s.calls += 1
            s.bytes += nbytes


# A global lock, not thread-locals: CUDA backward runs hooks (ZeRO-3's reduce-scatter)
# on autograd's device threads, and a counting() block must still see those calls.
_LOCK = threading.Lock()
_TOTAL = Counts()
_ACTIVE: list[Counts] = []
_FRAMES = threading.local()  # per-thread stack: did the running lowering call comm ops?


def stats() -> dict[str, CommStats]:
    """Calls and payload bytes per op since start (or ``reset_stats``), this rank."""
    with _LOCK:
        return {op: CommStats(s.calls, s.bytes) for op, s in _TOTAL.ops.items()}


def reset_stats() -> None:
    with _LOCK:
        _TOTAL.ops.clear()
        _TOTAL.wire.clear()
        _TOTAL.tags.clear()


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Count only the calls made inside the block (blocks nest; each sees its own)."""
    counts = Counts()
    with _LOCK:
        _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        with _LOCK:
            _ACTIVE.remove(counts)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def bus_bytes(op: str, nbytes: int, world: int) -> float:
    """Bytes each rank moves over the bus, by the nccl-tests bus-bandwidth factors.

    ``nbytes`` is what ``stats()`` records for one call: the input this rank hands in.
    nccl-tests scale the full buffer S: all_reduce 2(n-1)/n, reduce_scatter and
    all_to_all (n-1)/n of the input, all_gather (n-1)/n of the *output* (n inputs,
    hence (n-1) x nbytes here), broadcast / send / recv 1.
    """
    n = world
    if n < 1:
        raise ValueError(f"bus_bytes: world must be >= 1, got {n}.")
    factors = {
        "all_reduce": 2 * (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "all_gather": float(n - 1),
        "broadcast": 1.0 if n > 1 else 0.0,
        "send": 1.0,
        "recv": 1.0,
        "barrier": 0.0,
    }
    if op not in factors:
        raise ValueError(f"bus_bytes: unknown op {op!r}; known ops: {sorted(factors)}.")
    return factors[op] * nbytes


# --------------------------------------------------------------------------- the table

_TABLE: dict[str, dict[str, Callable]] = {}


def register_lowering(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the lowering of ``op`` on ``backend`` (replacing any before it).

    ``fn`` takes what the public op takes, by keyword after the tensor (e.g.
    ``fn(t, *, op, group, async_op)`` for all_reduce), and returns the result tensor,
    or a ``Handle`` when ``async_op``. Arguments arrive validated.
    """
    _TABLE.setdefault(op, {})[backend] = fn


def lowering(op: str, backend: str) -> Callable:
    """The lowering of ``op`` on ``backend``; raises listing what is known."""
    if op not in _TABLE:
        raise ValueError(f"unknown comm op {op!r}; known ops: {sorted(_TABLE)}.")
    rules = _TABLE[op]
    if backend not in rules:
        raise ValueError(
            f"comm op {op!r} has no lowering for backend {backend!r}; known backends: "
            f"{sorted(rules)}. Register one with register_lowering({op!r}, {backend!r}, fn)."
        )
    return rules[backend]


@contextlib.contextmanager
def override(op: str, fn: Callable, backend: str | None = None) -> Iterator[None]:
    """Swap the lowering of ``op`` (on ``backend``, or on every backend) inside the block."""
    if op not in _TABLE:
        raise ValueError(f"override: unknown comm op {op!r}; known ops: {sorted(_TABLE)}.")
    backends = [backend] if backend is not None else list(_TABLE[op])
    saved = {b: lowering(op, b) for b in backends}
    for b in backends:
        _TABLE[op][b] = fn
    try:
        yield
    finally:
        _TABLE[op].update(saved)


def _call(name: str, t: torch.Tensor | None, group, tag: str | None = None, **kwargs):
    fn = lowering(name, _backend(group, t))
    frames = _FRAMES.__dict__.setdefault("stack", [])
    if frames:
        frames[-1] = True  # the lowering running below us is not a leaf
        tag = None  # counted under its tag once, at the outermost call
    frames.append(False)
    try:
        result = fn(t, group=group, **kwargs) if t is not None else fn(group=group, **kwargs)
    finally:
        nested = frames.pop()
    with _LOCK:
        for counts in (_TOTAL, *_ACTIVE):
            counts._add(name, _nbytes(t), leaf=not nested, tag=tag)
    return result


# --------------------------------------------------------------------------- helpers


def _torch_op(op: str):
    return {
        "sum": dist.ReduceOp.SUM,
        "avg": dist.ReduceOp.AVG,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }[op]


def _check_reduce(op: str, t: torch.Tensor) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; use one of {REDUCE_OPS}.")
    if op == "avg" and t.dtype == torch.bool:
        raise ValueError("op='avg' is undefined for bool tensors; use 'max' (any) or 'min' (all).")


def _divide_(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.div_(n)
    return t.div_(n, rounding_mode="trunc")


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """fp8 as raw bytes for gloo data movement (same size, exact); others unchanged."""
    return t.view(torch.uint8) if t.dtype in _FP8 else t


def _dist_fn(new: str, old: str):
    # torch 2.13 renamed the *_tensor collectives to *_single and deprecated the old names.
    return getattr(dist, new, None) or getattr(dist, old)


# --------------------------------------------------------------------------- all_reduce


def all_reduce(
    t: torch.Tensor, op: str = "sum", group=None, async_op: bool = False, tag: str | None = None
):
    """Reduce ``t`` over the group, in place; returns ``t`` (or a Handle if async_op).

    Usage: ``comm.all_reduce(grad, op="avg")``. op: "sum", "avg", "max", "min".
    """
    _check_reduce(op, t)
    return _call("all_reduce", t, group, tag, op=op, async_op=async_op)


def _all_reduce_native(t, *, op, group, async_op, native_avg=True, widen_fp8=False):
    wide = widen_fp8 and t.dtype in _FP8
    buf = t.float() if wide else t.contiguous()
    torch_op = _torch_op("sum" if op == "avg" and not native_avg else op)
    work = dist.all_reduce(buf, op=torch_op, group=group, async_op=async_op)

    def finish():
        if op == "avg" and not native_avg:
            _divide_(buf, world_size(group))
        return t if buf is t else t.copy_(buf)

    return _complete(t, work, async_op, finish)


def _all_reduce_gloo(t, *, op, group, async_op):
    return _all_reduce_native(
        t, op=op, group=group, async_op=async_op, native_avg=False, widen_fp8=True
    )


def _all_reduce_single(t, *, op, group, async_op):
    return _complete(t, None, async_op)


register_lowering("all_reduce", "nccl", _all_reduce_native)
register_lowering("all_reduce", "gloo", _all_reduce_gloo)
register_lowering("all_reduce", "single", _all_reduce_single)


# --------------------------------------------------------------------------- all_gather


def all_gather(
    t: torch.Tensor,
    group=None,
    async_op: bool = False,
    tag: str | None = None,
    donate: bool = False,
):
    """Every rank's ``t`` concatenated along dim 0, in rank order, in a new tensor.

    All ranks pass the same shape; a 0-d ``t`` gathers into shape ``(n,)``.
    ``donate=True``: the caller gives ``t`` up (never reads or writes it again), so a
    world of one may return ``t`` itself instead of a copy ([Note: donated inputs]).
    Usage: ``full = comm.all_gather(shard)``.
    """
    return _call("all_gather", t, group, tag, async_op=async_op, **_donated(donate, group, t))


# [Note: donated inputs]
# A collective returns a new tensor: in a world of one (no process group, backend
# "single") that is a copy of the input, which costs a pass over the bytes for
# nothing when the caller made the input for the call (ZeRO-3 gathers a fresh
# compute-dtype cast of the shards, reduce-scatters a fresh grad buffer: ~4 GB per
# step on a 1.4B GPT at one GPU). With ``donate=True`` the single-rank lowering hands
# the input back. The call is still made and counted, so metrics do not change.


def _donated(donate: bool, group, t) -> dict:
    return {"donate": True} if donate and _backend(group, t) == "single" else {}


def _gathered(t: torch.Tensor, n: int) -> torch.Tensor:
    shape = (n * t.shape[0], *t.shape[1:]) if t.dim() else (n,)
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def _all_gather_native(t, *, group, async_op):
    out = _gathered(t, world_size(group))
    src = t.reshape(1) if t.dim() == 0 else t.contiguous()  # the backend wants (n*k, ...)
    gather = _dist_fn("all_gather_single", "all_gather_into_tensor")
    work = gather(_bytes_view(out), _bytes_view(src), group=group, async_op=async_op)
    return _complete(out, work, async_op)


def _all_gather_single(t, *, group, async_op, donate=False):
    out = t if donate else t.clone()
    return _complete(out if out.dim() else out.reshape(1), None, async_op)


# nccl moves fp8 natively; the byte view is free, so the same rule serves both.
register_lowering("all_gather", "nccl", _all_gather_native)
register_lowering("all_gather", "gloo", _all_gather_native)
register_lowering("all_gather", "single", _all_gather_single)


# --------------------------------------------------------------------------- reduce_scatter


def reduce_scatter(
    t: torch.Tensor,
    op: str = "sum",
    group=None,
    async_op: bool = False,
    tag: str | None = None,
    donate: bool = False,
):
    """Reduce ``t`` over the group and return this rank's chunk of dim 0 (a new tensor).

    ``t.shape[0]`` must be divisible by the group size; rank r gets rows
    ``[r*k, (r+1)*k)`` of the reduction, ``k = t.shape[0] // n``. The transpose of
    all_gather: ZeRO's gradient reduction. ``donate`` as for ``all_gather``.
    Usage: ``mine = comm.reduce_scatter(g, "avg")``.
    """
    _check_reduce(op, t)
    n = world_size(group)
    if t.dim() == 0 or t.shape[0] % n:
        raise ValueError(
            f"reduce_scatter: dim 0 of shape {tuple(t.shape)} is not divisible by the world "
            f"size {n}; pad dim 0 to a multiple of {n} (and drop the padding after)."
        )
    kwargs = _donated(donate, group, t)
    return _call("reduce_scatter", t, group, tag, op=op, async_op=async_op, **kwargs)


def _reduce_scatter_native(t, *, op, group, async_op, native_avg=True, widen_fp8=False):
    n = world_size(group)
    wide = widen_fp8 and t.dtype in _FP8
    src = t.float() if wide else t.contiguous()
    out = torch.empty((t.shape[0] // n, *t.shape[1:]), dtype=src.dtype, device=t.device)
    torch_op = _torch_op("sum" if op == "avg" and not native_avg else op)
    scatter = _dist_fn("reduce_scatter_single", "reduce_scatter_tensor")
    work = scatter(out, src, op=torch_op, group=group, async_op=async_op)

    def finish():
        if op == "avg" and not native_avg:
            _divide_(out, n)
        return out.to(t.dtype) if wide else out

    finish.in_place = not wide  # wait() finishes `out` itself: see Handle.pending_result
    return _complete(out, work, async_op, finish)


def _reduce_scatter_gloo(t, *, op, group, async_op):
    return _reduce_scatter_native(
        t, op=op, group=group, async_op=async_op, native_avg=False, widen_fp8=True
    )


def reduce_scatter_via_all_reduce(t, *, op, group, async_op):
    """reduce_scatter lowered as all_reduce of the whole tensor, then this rank's slice.

    Twice the traffic of a native reduce-scatter; for backends or dtypes without one.
    See [Note: gloo gaps].
    """
    n, r = world_size(group), rank(group)
    k = t.shape[0] // n
    buf = t.clone()
    handle = all_reduce(buf, op=op, group=group, async_op=True)
    # clone: a view would keep the whole n-times-larger buffer alive with the shard.
    return _complete(None, handle, async_op, lambda: buf[r * k : (r + 1) * k].clone())


def _reduce_scatter_single(t, *, op, group, async_op, donate=False):
    return _complete(t if donate else t.clone(), None, async_op)


register_lowering("reduce_scatter", "nccl", _reduce_scatter_native)
register_lowering("reduce_scatter", "gloo", _reduce_scatter_gloo)
register_lowering("reduce_scatter", "single", _reduce_scatter_single)


# --------------------------------------------------------------------------- all_to_all


def all_to_all(
    t: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group=None,
    async_op: bool = False,
    tag: str | None = None,
):
    """Scatter dim-0 slices of ``t`` to every rank and gather theirs (all_to_all_single).

    ``input_split_sizes[j]`` rows go to rank j; ``output_split_sizes[j]`` rows come from
    rank j (None: equal splits). The output is allocated from the splits.
    Usage: ``tokens = comm.all_to_all(x, out_splits, in_splits)`` (MoE dispatch).
    """
    n = world_size(group)
    rows = t.shape[0] if t.dim() else 0
    for name, splits in (("input", input_split_sizes), ("output", output_split_sizes)):
        if splits is None:
            if rows % n:
                raise ValueError(
                    f"all_to_all: dim 0 of shape {tuple(t.shape)} does not split evenly over "
                    f"{n} ranks and no {name}_split_sizes were given; pass both split lists."
                )
        elif len(splits) != n or any(s < 0 for s in splits):
            raise ValueError(
                f"all_to_all: {name}_split_sizes={list(splits)} must hold {n} sizes >= 0, "
                "one per rank of the group."
            )
    if input_split_sizes is not None and sum(input_split_sizes) != rows:
        raise ValueError(
            f"all_to_all: input_split_sizes={list(input_split_sizes)} sum to "
            f"{sum(input_split_sizes)}, but t has {rows} rows (shape {tuple(t.shape)})."
        )
    return _call(
        "all_to_all",
        t,
        group,
        tag,
        output_split_sizes=None if output_split_sizes is None else list(output_split_sizes),
        input_split_sizes=None if input_split_sizes is None else list(input_split_sizes),
        async_op=async_op,
    )


def _all_to_all_native(t, *, output_split_sizes, input_split_sizes, group, async_op):
    rows = t.shape[0] if output_split_sizes is None else sum(output_split_sizes)
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    work = dist.all_to_all_single(
        _bytes_view(out),
        _bytes_view(t.contiguous()),
        output_split_sizes,
        input_split_sizes,
        group=group,
        async_op=async_op,
    )
    return _complete(out, work, async_op)


def _all_to_all_single(t, *, output_split_sizes, input_split_sizes, group, async_op):
    if output_split_sizes is not None and output_split_sizes[0] != t.shape[0]:
        raise ValueError(
            f"all_to_all: output_split_sizes={output_split_sizes} in a world of one must "
            f"equal the {t.shape[0]} rows sent to self."
        )
    return _complete(t.clone(), None, async_op)


register_lowering("all_to_all", "nccl", _all_to_all_native)
register_lowering("all_to_all", "gloo", _all_to_all_native)
register_lowering("all_to_all", "single", _all_to_all_single)


# --------------------------------------------------------------------------- broadcast


def broadcast(
    t: torch.Tensor, src: int = 0, group=None, async_op: bool = False, tag: str | None = None
):
    """Copy rank ``src``'s ``t`` (a rank within ``group``) into every rank's ``t``.

    In place; returns ``t`` (or a Handle). Usage: ``comm.broadcast(params_flat, src=0)``.
    """
    _global_rank(group, src)  # validate before any rank enters the collective
    return _call("broadcast", t, group, tag, src=src, async_op=async_op)


def _broadcast_native(t, *, src, group, async_op):
    buf = t.contiguous()
    work = dist.broadcast(
        _bytes_view(buf), src=_global_rank(group, src), group=group, async_op=async_op
    )
    return _complete(t, work, async_op, lambda: t if buf is t else t.copy_(buf))


def _broadcast_single(t, *, src, group, async_op):
    return _complete(t, None, async_op)


register_lowering("broadcast", "nccl", _broadcast_native)
register_lowering("broadcast", "gloo", _broadcast_native)
register_lowering("broadcast", "single", _broadcast_single)


# --------------------------------------------------------------------------- send / recv


def send(t: torch.Tensor, dst: int, group=None) -> None:
    """Send ``t`` to rank ``dst`` of ``group`` (blocking). Usage: ``comm.send(act, dst=1)``."""
    _check_peer(group, dst, "send", "dst")
    _call("send", t, group, dst=dst)


def recv(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Receive into ``t`` from rank ``src`` of ``group`` (blocking); returns ``t``."""
    _check_peer(group, src, "recv", "src")
    return _call("recv", t, group, src=src)


def _check_peer(group, peer: int, op: str, arg: str) -> None:
    _global_rank(group, peer)
    if peer == rank(group):
        raise ValueError(f"{op}: {arg}={peer} is this rank; point-to-point needs another rank.")


def _send_native(t, *, dst, group):
    dist.send(_bytes_view(t.contiguous()), dst=_global_rank(group, dst), group=group)


def _recv_native(t, *, src, group):
    buf = t.contiguous()
    dist.recv(_bytes_view(buf), src=_global_rank(group, src), group=group)
    return t if buf is t else t.copy_(buf)


def _p2p_single(t, *, group, **peer):
    # Unreachable through send/recv (they reject every peer in a world of one); kept so
    # that lowering(op, "single") answers rather than raising "no lowering".
    raise ValueError(f"point-to-point with {peer} in a world of one: there is no other rank.")


for _backend_name in ("nccl", "gloo"):
    register_lowering("send", _backend_name, _send_native)
    register_lowering("recv", _backend_name, _recv_native)
register_lowering("send", "single", _p2p_single)
register_lowering("recv", "single", _p2p_single)


# --------------------------------------------------------------------------- barrier


def barrier(group=None) -> None:
    """Block until every rank of ``group`` arrives. Usage: ``comm.barrier()``."""
    _call("barrier", None, group)


register_lowering("barrier", "nccl", lambda *, group: dist.barrier(group=group))
register_lowering("barrier", "gloo", lambda *, group: dist.barrier(group=group))
register_lowering("barrier", "single", lambda *, group: None)
