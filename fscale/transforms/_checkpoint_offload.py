"""Activation offload for ``checkpoint_activations(..., offload="cpu")``: the engine.

One ``Offloader`` lives for one call of the ``loss_and_grad`` stage (one micro-batch):
each unit's forward opens a ``_Group``; the tensors the unit saves for backward (through
saved-tensor hooks, or selective checkpointing's cache) are copied to pinned host
memory on a side stream; backward brings each group back, the one before it
prefetched. The public side is in ``fscale/transforms/checkpoint.py``.

Usage::

    offloader = Offloader(min_bytes=2**20, keep=params)
    with offloader.unit(unit_tensors):               # around each unit's forward
        y = forward(x)
    ...backward...
    offloader.finish()                               # after backward

[Note: activation offload]
Streams: ``S`` is the compute stream current when a tensor is packed (or unpacked),
``D`` one side stream per device, for the copies in both directions.

Forward, packing tensor ``t`` of unit ``g``: ``D`` waits for ``S`` (``t`` is
produced), then copies ``t``'s whole storage into a pinned host buffer
(``non_blocking``). The group keeps ``t`` referenced: its device memory may not be
reused while ``D`` still reads it. When unit ``g`` ends, an event ``E_d2h[g]`` is
recorded on ``D``, ``S`` waits for ``E_d2h[g-1]`` and group ``g-1`` drops its
references. The frees then happen in ``S``'s order after that wait, so the caching
allocator may hand the memory to the next allocation on ``S`` at once (no
``record_stream``, whose deferred reuse depends on how far the CPU runs ahead). So
at most two units' saved tensors wait for their copies on the device, whatever the
copies' speed; a slow PCIe link stalls ``S`` instead of growing memory.

Backward, the first unpack of group ``g``: if ``g`` was not prefetched, its copies
back are launched now; then those of ``g-1``, the unit whose backward comes next
(prefetch), so they overlap ``g``'s backward. A group's copies back allocate their
device buffers on ``S`` (the consumer), then ``D`` waits for ``S`` once (the
memory's last reader on ``S`` is done) and copies on ``D`` -- after ``E_d2h``, the
same stream, in order -- and records ``E_h2d``. ``S`` waits for ``E_h2d[g]`` before
the first use of any of ``g``'s tensors, and the group holds its buffers until that
wait is enqueued: a buffer is never freed (so reused on ``S``) before ``S`` is
ordered after the copy that fills it. The last unit of forward is not copied back:
its device tensors are still held, and serve (after ``S`` waited for their copies
out, so the memory is reused only once ``D`` is done reading it). ``finish`` makes
``S`` wait for ``D`` and drops everything (a backward that never reached a group).
Tests check this order with fake streams (``test_stream_protocol``).

Why exact: bytes are copied, never converted, and restored with the tensor's own
dtype, offset, size and stride over a copy of its whole storage (views sharing a
storage in one unit -- attention's q, k, v -- share one copy). Saved tensors are not
modified in place after they are saved (autograd would refuse the backward), so the
copy launched at pack time reads the values backward needs.

What is never offloaded: leaves that require grad (the step's params), any tensor
sharing storage with the step's params or with the unit's installed params and
buffers (mixed precision's casts, ``weight.t()``), tensors an outer saved-tensor
hook packs into something else (ZeRO-3's gathered weights become its tokens: the
outer hook packs first, and unpacks last), tensor subclasses, and storages smaller
than ``min_bytes``. On a CPU-only machine the host copy is a plain copy to a
separate CPU tensor and the stream work is skipped: the same pack/unpack path runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.utils._pytree import tree_map

# Python dispatch modes (selective checkpointing's caches, a user's FLOP counter)
# should not see the copies: they are not part of the model's computation, and they
# may run inside a mode's own handler.
_unseen_by_modes = torch._C._DisableTorchDispatch


# The offloader of the loss_and_grad call running now: unit hooks get no step context,
# so the stage that owns the offloader publishes it here for the units' forwards.
_CURRENT: contextvars.ContextVar[Offloader | None] = contextvars.ContextVar(
    "fscale_checkpoint_offloader", default=None
)


def current() -> Offloader | None:
    """The offloader of the running ``loss_and_grad`` call, if offload is on."""
    return _CURRENT.get()


@contextlib.contextmanager
def running(offloader: Offloader):
    """``offloader`` is ``current()`` inside the block, and finished after it."""
    token = _CURRENT.set(offloader)
    try:
        yield offloader
    finally:
        _CURRENT.reset(token)
        offloader.finish()


# Devices whose copies run on a side stream; the stream calls go through these three
# functions (tests stand a CPU in for a GPU with fake streams to check the protocol).
_ASYNC = ("cuda",)


def _is_async(device: torch.device) -> bool:
    return device.type in _ASYNC


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def _current_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.current_stream(device)


def _on(stream: torch.cuda.Stream):
    return torch.cuda.stream(stream)


def _outer_hooks():
    """The saved-tensor hooks in effect here, (pack, unpack) or None."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False)  # ignore_is_tracing
    except TypeError:  # older torch: no argument
        return top()


def _storage_ptr(t) -> int | None:
    if type(t) is not torch.Tensor or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def storage_ptrs(tensors: Iterable) -> set[int]:
    """Storage addresses of the plain tensors in ``tensors`` (others are skipped)."""
    out = set()
    for t in tensors:
        ptr = _storage_ptr(t)
        if ptr:
            out.add(ptr)
    return out


class _Entry:
    """One storage's host copy; its device copy once fetched back."""

    __slots__ = ("device", "host", "nbytes", "on", "source")

    def __init__(self, host: torch.Tensor, nbytes: int, source: torch.Tensor | None):
        self.host = host
        self.nbytes = nbytes
        self.source = source  # the device storage, while the group holds it (CUDA)
        self.on = host.device if source is None else source.device  # where it came from
        self.device: torch.Tensor | None = None


class _Handle:
    """What autograd (or the selective cache) keeps instead of a tensor."""

    __slots__ = ("dtype", "entry", "group", "offset", "size", "stride")

    def __init__(self, group: _Group, entry: _Entry, t: torch.Tensor):
        self.group, self.entry = group, entry
        self.dtype, self.offset = t.dtype, t.storage_offset()
        self.size, self.stride = tuple(t.shape), tuple(t.stride())


class _Group:
    """The tensors one unit call offloaded, in forward order."""

    def __init__(self, index: int, exclude: set[int]):
        self.index = index
        self.exclude = exclude
        self.by_storage: dict[int, _Entry] = {}  # while open: one copy per storage
        self.entries: list[_Entry] = []  # until fetched
        self.sources: list[torch.Tensor] = []  # device tensors D still reads
        self.d2h: dict[torch.device, torch.cuda.Event] = {}
        self.h2d: dict[torch.device, torch.cuda.Event] = {}
        self.inflight: list[torch.Tensor] = []  # fetched buffers S has not waited for
        self.fetched = False
        self.started = False  # its backward began (S waited for its copies back)


class Offloader:
    """The offloaded activations of one ``loss_and_grad`` call ([Note: activation offload])."""

    def __init__(self, min_bytes: int, keep: Iterable = ()):
        self.min_bytes = min_bytes
        self.keep = storage_ptrs(keep)  # the step's params: never offloaded
        self.groups: list[_Group] = []
        self.waiting: list[_Group] = []  # closed groups whose sources are still held
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.tensors = 0

    # -- forward ---------------------------------------------------------------------

    @contextlib.contextmanager
    def unit(self, unit_tensors: Iterable):
        """A unit's forward: what it saves for backward (through these hooks, or
        ``pack`` from selective checkpointing's cache) goes to the host."""
        group = _Group(len(self.groups), storage_ptrs(unit_tensors) | self.keep)
        self.groups.append(group)
        # Only the innermost saved-tensor hooks run: compose with the ones around us.
        outer = _outer_hooks()
        pack = functools.partial(self._pack_saved, group, outer)
        unpack = functools.partial(self._unpack_saved, outer)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield group
        finally:
            self._close(group)

    def _pack_saved(self, group: _Group, outer, t: torch.Tensor):
        packed = t if outer is None else outer[0](t)
        if packed is not t:  # the outer hook keeps it its own way (ZeRO-3's tokens)
            return packed
        return self.pack(group, t)

    def _unpack_saved(self, outer, packed):
        t = self.unpack(packed) if isinstance(packed, _Handle) else packed
        return t if outer is None else outer[1](t)

    def worth(self, group: _Group, t) -> bool:
        ptr = _storage_ptr(t)
        if not ptr or ptr in group.exclude or (t.is_leaf and t.requires_grad):
            return False
        if t.device.type not in ("cuda", "cpu"):
            return False
        return t.untyped_storage().nbytes() >= self.min_bytes

    def pack(self, group: _Group, t):
        """``t`` itself, or a handle to its host copy when it is worth offloading."""
        if not self.worth(group, t):
            return t
        ptr = t.untyped_storage().data_ptr()
        entry = group.by_storage.get(ptr)
        if entry is None:
            entry = self._to_host(group, t)
            group.by_storage[ptr] = entry
            group.entries.append(entry)
        self.tensors += 1
        return _Handle(group, entry, t)

    def _to_host(self, group: _Group, t: torch.Tensor) -> _Entry:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        with torch.no_grad(), _unseen_by_modes():
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            cuda = _is_async(t.device)
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=t.device.type == "cuda")
            if cuda:
                side = _side_stream(t.device)
                side.wait_stream(_current_stream(t.device))  # t is produced
                with _on(side):
                    host.copy_(src, non_blocking=True)
            else:
                host.copy_(src)  # CPU: a real, separate copy
        # Held while the group is open (no other storage can take its address, which
        # keys the group's copies) and on CUDA until S waited for the copy.
        group.sources.append(src)
        self.bytes_to_host += nbytes
        return _Entry(host, nbytes, src if cuda else None)

    def _close(self, group: _Group) -> None:
        group.by_storage = {}
        for device in {s.device for s in group.sources if _is_async(s.device)}:
            group.d2h[device] = _side_stream(device).record_event()
        # One unit's copies may still run while the next unit computes; older ones
        # must be done before their device memory is freed ([Note: activation offload]).
        self._release(self.waiting)
        self.waiting = [group] if group.d2h else []
        if not group.d2h:
            group.sources.clear()

    def _release(self, groups: list[_Group]) -> None:
        for group in groups:
            for device, event in group.d2h.items():
                _current_stream(device).wait_event(event)
            group.sources.clear()
            for entry in group.entries:
                entry.source = None

    # -- backward --------------------------------------------------------------------

    def unpack(self, handle: _Handle) -> torch.Tensor:
        group = handle.group
        if not group.started:
            self._start(group)
        buf = handle.entry.device  # kept while the handle lives (a retained graph too)
        with torch.no_grad(), _unseen_by_modes():
            return torch.empty(0, dtype=handle.dtype, device=buf.device).set_(
                buf.untyped_storage(), handle.offset, handle.size, handle.stride
            )

    def _start(self, group: _Group) -> None:
        """Group ``group``'s backward begins: bring it back, and prefetch the one before."""
        group.started = True
        if group in self.waiting:
            # Its device tensors are still held (the last unit of forward): use them,
            # no copy back. They stay alive as long as the handles do.
            for entry in group.entries:
                entry.device = entry.source
            group.entries = [e for e in group.entries if e.device is None]  # CPU ones
        self._release(self.waiting)  # forward is over
        self.waiting = []
        self._fetch(group)
        if group.index > 0:
            self._fetch(self.groups[group.index - 1])
        self._wait(group)

    def _fetch(self, group: _Group) -> None:
        if group.fetched:
            return
        group.fetched = True
        with torch.no_grad(), _unseen_by_modes():
            for entry in group.entries:
                # Allocated on S, the consumer: frees stay in S's order.
                entry.device = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.on)
                entry.source = None
                self.bytes_to_device += entry.nbytes
            for device in {e.on for e in group.entries}:
                pairs = [(e.device, e.host) for e in group.entries if e.on == device]
                if not _is_async(device):
                    for buf, host in pairs:
                        buf.copy_(host)
                    continue
                side = _side_stream(device)
                side.wait_stream(_current_stream(device))  # the buffers' last readers
                with _on(side):
                    for buf, host in pairs:
                        buf.copy_(host, non_blocking=True)
                group.h2d[device] = side.record_event()
                group.inflight.extend(buf for buf, _ in pairs)
        group.entries = []  # from here the handles alone keep the copies alive

    def _wait(self, group: _Group) -> None:
        for device, event in group.h2d.items():
            _current_stream(device).wait_event(event)
        group.inflight = []  # S is ordered after the copies: the buffers may be freed

    def finish(self) -> None:
        """After backward: every copy is ordered before the compute stream's next work."""
        self._release(self.waiting)
        self.waiting = []
        for device in {d for g in self.groups for d in (*g.d2h, *g.h2d)}:
            _current_stream(device).wait_stream(_side_stream(device))
        for group in self.groups:
            group.inflight, group.entries = [], []
        self.groups = []


# ----------------------------------------------------------------------------- selective


def offloading_contexts(offloader: Offloader, group: _Group, context_fn):
    """``context_fn()``'s selective-checkpoint modes, their cache offloaded into ``group``.

    The cache (``create_selective_checkpoint_contexts``' storage, shared by the two
    modes) maps each op to its kept outputs, wrapped in objects with ``get_val``; the
    recompute calls ``get_val`` on them. Entries are packed as they are stored and
    unpacked by ``get_val``. torch keeps them in a list per op (up to 2.12: ``append``,
    ``pop(0)``) or a dict per op (2.13: ``[idx] = ``, ``get(idx)``); both are wrapped.
    """
    forward_mode, recompute_mode = context_fn()
    factory = _cache_kind(forward_mode, recompute_mode)
    container = _PackingList if factory is list else _PackingDict
    pack = functools.partial(_pack_cached, offloader, group)
    shared = defaultdict(functools.partial(container, pack))
    forward_mode.storage = recompute_mode.storage = shared
    return forward_mode, recompute_mode


def check_selective(context_fn) -> None:
    """Raise now, when the step is built, if this torch's selective cache is unknown."""
    _cache_kind(*context_fn())


def _cache_kind(forward_mode, recompute_mode) -> type:
    storage = getattr(forward_mode, "storage", None)
    factory = getattr(storage, "default_factory", None)
    if getattr(recompute_mode, "storage", None) is not storage or factory not in (list, dict):
        raise NotImplementedError(
            f"checkpoint_activations(selective, offload='cpu'): torch {torch.__version__} "
            "keeps selective checkpointing's cache in a form fscale does not know; use "
            "policy='unit' with offload, or selective without offload."
        )
    return factory


class _PackingList(list):
    def __init__(self, pack):
        super().__init__()
        self._pack = pack

    def append(self, value) -> None:
        super().append(tree_map(self._pack, value))


class _PackingDict(dict):
    def __init__(self, pack):
        super().__init__()
        self._pack = pack

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, tree_map(self._pack, value))


class _Cached:
    """A kept output on the host; ``get_val`` (what the recompute calls) brings it back."""

    __slots__ = ("handle", "offloader")

    def __init__(self, offloader: Offloader, handle: _Handle):
        self.offloader, self.handle = offloader, handle

    def get_val(self, allow_cache_entry_mutation: bool) -> torch.Tensor:
        return self.offloader.unpack(self.handle)


def _pack_cached(offloader: Offloader, group: _Group, leaf):
    val = getattr(leaf, "val", None)
    if not (hasattr(leaf, "get_val") and isinstance(val, torch.Tensor)):
        return leaf
    packed = offloader.pack(group, val)
    return leaf if packed is val else _Cached(offloader, packed)
