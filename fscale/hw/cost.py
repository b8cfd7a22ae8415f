"""Communication cost model: how long a step's collectives take on a given link.

Time of one collective = ``steps x latency + wire bytes / bandwidth`` (the alpha-beta
model), with the wire bytes of ``comm.bus_bytes`` (the nccl-tests factors: ring
all_reduce 2(n-1)/n of the buffer per rank, reduce_scatter and all_to_all (n-1)/n,
all_gather (n-1)/n of its output, broadcast 1) and the steps of a ring (all_reduce
2(n-1), the others n-1). It predicts from a ``Plan``'s collectives (``fs.explain(step,
params, bandwidth="1gbit")``) or from byte counts measured by the comm table.

Usage::

    from fscale.hw import cost
    link = cost.Link.parse("1gbit")                       # or Link(1e9, latency_s=50e-6)
    t = cost.predict(plan.collectives, link, plan.world)  # cost.Prediction
    t.seconds, t.by_tag["dp.grads"]
    cost.predict_bytes({"all_reduce": 84_000_000}, link, world=2).seconds
    cost.predict_overlap(events, link, world=4).seconds  # a step whose comm hides behind compute

[Note: shared links]
A ``Link`` is, by default, one rank's own link (a NIC per rank, as between nodes):
every rank sends its wire bytes at the same time, so a collective takes one rank's
bytes / bandwidth. ``Link(..., shared=True)`` is one medium that every rank's traffic
crosses in turn: the loopback of a single network namespace rate-limited with ``tc``
(bench/compress_link.py), or a hub. There the collective takes the bytes *all* ranks
send: n x a rank's bus bytes, except broadcast, where n-1 ranks each receive the
buffer once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fscale.hw.comm import bus_bytes

# [Note: overlapped steps]
# ``compute + predict(...).seconds`` is the step of a program that waits on each
# collective as soon as it issues it. ZeRO-3 does not: it issues the all-gather of unit
# i+1 before computing unit i (``prefetch``) and waits on its reduce-scatters after
# backward, so part of the wire time hides behind compute, and adding the two
# over-predicts (+30% for ZeRO++ at world 4 on bench/compress_link.py's 1 Gbit/s link).
# ``predict_overlap`` runs the step's own schedule instead: a list of events in program
# order, ``("compute", seconds)``, ``("issue", key, op, nbytes)`` (an async collective
# leaves), ``("wait", key)`` (the program blocks on it; a synchronous collective is an
# issue followed by its wait). Two resources:
#
# - one compute stream (a rank's CPU thread, or a GPU's compute stream) that runs the
#   compute events in order and stops at a wait until that collective has finished;
# - one link that carries one collective at a time, in issue order (a process group's
#   collectives run in the order they were issued, in gloo's worker and in NCCL's
#   stream alike). A collective starts at max(its issue, the link free) and takes
#   ``collective_seconds`` (the alpha-beta time above, shared link and backend included).
#
# The step takes the compute clock after the last event, or the link's if a collective
# was never waited on. exposed = step - compute; hidden = comm - exposed. For a gather of
# c_i seconds per unit, compute p_i per unit and prefetch 1 (unit i+1 issued when unit i
# starts computing), this gives ``c_0 + sum_i max(p_i, c_{i+1}) + p_last``; without
# overlap (every issue waited on at once) exactly ``sum p + sum c``, the sum above.
# Nothing is fitted: the compute events come from the step run with its collectives
# replaced by local stand-ins (bench/compress_link.py records the times between its
# comm calls) or from any per-unit split of a measured compute time, the collective
# times from the bytes and the link. Compute slowed by the transfer itself: a link's
# ``host_s_per_byte`` (0 by default) is the rank's own CPU time per wire byte of a
# collective (gloo on CPU ranks: copies into sockets, reductions, the kernel's TCP work,
# on the cores the compute runs on). A collective then delays the compute clock by
# ``host_s_per_byte x wire bytes`` at its issue and lasts at least that long: a transfer
# that is CPU-bound cannot hide under compute on the same cores (ZeRO-3 at 10 Gbit/s on
# one core per rank hides nothing; at 1 Gbit/s the same CPU work is a small part of the
# wire time). bench/compress_link.py measures it from its calibration (process CPU
# seconds per wire byte). Left out: a GPU's copy engines sharing memory bandwidth, and
# collectives of one group running concurrently (it serializes them; the last one ends
# at the same time either way).

# A few tens of microseconds per hop: loopback TCP plus gloo's per-message work on
# this CPU box; NCCL between nodes is of the same order. Small beside bytes at <= 100 Gbit/s
# for the megabyte buffers a train step moves.
DEFAULT_LATENCY_S = 50e-6

_BIT_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_BYTE_UNITS = {"B": 8, "KB": 8e3, "MB": 8e6, "GB": 8e9, "TB": 8e12}
_FORMAT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+?)(/s|ps)?\s*$")


def parse_bandwidth(value) -> float:
    """Bits per second from ``"1gbit"``, ``"10Gbit/s"``, ``"400mbit"``, ``"1.25GB/s"`` or a number.

    Bit units (any case, as ``tc`` writes them): bit, kbit, mbit, gbit, tbit, with an
    optional ``/s``. Byte units need a capital B and ``/s``: B/s, KB/s, MB/s, GB/s,
    TB/s. A bare number is bits per second. ``"10gbps"`` is refused: ``tc`` reads it
    as gigaBYTES per second, most people as gigabits.
    Usage: ``parse_bandwidth("1gbit") == 1e9``.
    """
    if isinstance(value, bool):
        raise ValueError(f"bandwidth {value!r} is not a bandwidth; write e.g. '1gbit'.")
    if isinstance(value, (int, float)):
        bits = float(value)
    elif isinstance(value, str):
        m = _FORMAT.match(value)
        if m is None:
            raise ValueError(
                f"bandwidth {value!r} is not understood; write a number and a unit, e.g. "
                "'1gbit', '10Gbit/s', '400mbit' (bits) or '1.25GB/s' (bytes)."
            )
        number, unit, per = float(m.group(1)), m.group(2), m.group(3)
        if per == "ps":
            raise ValueError(
                f"bandwidth {value!r} is ambiguous: tc reads '{unit}ps' as bytes per second, "
                f"most people as bits; write '{m.group(1)}{unit.lower()}it' for bits or "
                f"'{m.group(1)}{unit.upper()}/s' for bytes."
            )
        if unit.lower() in _BIT_UNITS:
            bits = number * _BIT_UNITS[unit.lower()]
        elif unit in _BYTE_UNITS and per == "/s":
            bits = number * _BYTE_UNITS[unit]
        else:
            raise ValueError(
                f"bandwidth {value!r}: unknown unit {unit!r}; use one of "
                f"{sorted(_BIT_UNITS)} (bits, '/s' optional) or "
                f"{[u + '/s' for u in _BYTE_UNITS]} (bytes)."
            )
    else:
        raise ValueError(
            f"bandwidth must be a string such as '1gbit' or a number of bits per second, "
            f"got {type(value).__name__} {value!r}."
        )
    if not bits > 0 or bits == float("inf"):
        raise ValueError(f"bandwidth {value!r} must be a positive, finite rate.")
    return bits


def format_bandwidth(bits_per_s: float) -> str:
    """``1e9 -> "1 Gbit/s"``. Usage: ``format_bandwidth(link.bandwidth_bits_per_s)``."""
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


@dataclass(frozen=True)
class Link:
    """A link: bandwidth in bits per second, latency per message hop in seconds.

    ``shared``: one medium carries every rank's traffic (see [Note: shared links]).
    ``backend``: whose algorithms move the bytes: None for the ring ideal (what NCCL
    does), ``"gloo"`` for gloo's (see [Note: gloo's reduce_scatter]).
    ``host_s_per_byte``: the rank's CPU seconds per wire byte, taken from the compute it
    would overlap ([Note: overlapped steps]); 0 where the transfer runs elsewhere.
    Usage: ``Link(1e9, 50e-6)``, ``Link.parse("10gbit", shared=True, backend="gloo")``.
    """

    bandwidth_bits_per_s: float
    latency_s: float = DEFAULT_LATENCY_S
    shared: bool = False
    backend: str | None = None
    host_s_per_byte: float = 0.0

    def __post_init__(self):
        parse_bandwidth(self.bandwidth_bits_per_s)  # positive, finite, a number
        if not self.latency_s >= 0:
            raise ValueError(f"Link.latency_s must be >= 0 seconds, got {self.latency_s!r}.")
        if not (isinstance(self.host_s_per_byte, (int, float)) and self.host_s_per_byte >= 0):
            raise ValueError(
                f"Link.host_s_per_byte must be a number >= 0 (CPU seconds per wire byte), "
                f"got {self.host_s_per_byte!r}."
            )
        if self.backend not in _BACKEND_OPS:
            raise ValueError(
                f"Link.backend={self.backend!r} is not modelled; use one of "
                f"{sorted(_BACKEND_OPS, key=str)} (None: the ring ideal, as NCCL)."
            )

    @classmethod
    def parse(
        cls,
        bandwidth,
        latency_s: float = DEFAULT_LATENCY_S,
        shared: bool = False,
        backend: str | None = None,
    ):
        """A Link from ``"1gbit"`` etc. (see ``parse_bandwidth``); a Link passes through."""
        if isinstance(bandwidth, Link):
            return bandwidth
        return cls(parse_bandwidth(bandwidth), latency_s, shared, backend)

    def __str__(self) -> str:
        medium = ", shared by all ranks" if self.shared else " per rank"
        algo = f", {self.backend}" if self.backend else ""
        bw = format_bandwidth(self.bandwidth_bits_per_s)
        return f"{bw}{medium}, {self.latency_s * 1e6:g} us{algo}"


# The op whose bytes an op really moves on a backend (see [Note: gloo's reduce_scatter]).
_BACKEND_OPS: dict[str | None, dict[str, str]] = {
    None: {},
    "nccl": {},
    "gloo": {"reduce_scatter": "all_reduce"},
}


def _hops(op: str, world: int) -> int:
    """Latency terms of one call: a ring's steps."""
    if world <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (world - 1)  # reduce-scatter then all-gather around the ring
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return world - 1
    return 1  # broadcast (as one pipelined hop), send, recv, barrier


def wire_bytes(
    op: str, nbytes: int, world: int, shared: bool = False, backend: str | None = None
) -> float:
    """Bytes a call occupies the link with: one rank's bus bytes, or every rank's if shared.

    ``nbytes`` is what the comm table counts for one call on one rank (its input).
    Usage: ``wire_bytes("all_reduce", 4 * n, world=4)``.
    """
    op = _BACKEND_OPS[backend].get(op, op)
    per_rank = bus_bytes(op, nbytes, world)
    if not shared:
        return per_rank
    if op == "broadcast":
        return (world - 1) * nbytes  # n-1 receivers, each gets the buffer once
    if op in ("send", "recv"):
        # A transfer is counted on both of its ends; give the link its bytes once.
        return nbytes / 2
    return world * per_rank


def collective_seconds(op: str, nbytes: int, link: Link, world: int, calls: int = 1) -> float:
    """Seconds for ``calls`` calls of ``op`` moving ``nbytes`` in total (per rank's input).

    Usage: ``collective_seconds("reduce_scatter", 4 * n, Link.parse("1gbit"), 4)``.
    """
    if world <= 1:
        return 0.0
    wire = wire_bytes(op, nbytes, world, link.shared, link.backend)
    op = _BACKEND_OPS[link.backend].get(op, op)
    return calls * _hops(op, world) * link.latency_s + 8 * wire / link.bandwidth_bits_per_s


@dataclass
class Prediction:
    """Predicted communication seconds per step, in total and per tag / per op."""

    link: Link
    world: int
    seconds: float = 0.0
    wire_bytes: float = 0.0  # what the link carries per step (all ranks' if shared)
    by_tag: dict[str, float] = field(default_factory=dict)
    by_op: dict[str, float] = field(default_factory=dict)

    def _add(self, op: str, tag: str | None, nbytes: int, calls: int) -> None:
        s = collective_seconds(op, nbytes, self.link, self.world, calls)
        self.seconds += s
        self.wire_bytes += wire_bytes(op, nbytes, self.world, self.link.shared, self.link.backend)
        key = tag or f"({op})"
        self.by_tag[key] = self.by_tag.get(key, 0.0) + s
        self.by_op[op] = self.by_op.get(op, 0.0) + s


def predict(collectives: Iterable, link, world: int) -> Prediction:
    """Communication time of one step from ``Plan.collectives`` (op, bytes, calls, tag).

    ``link``: a ``Link`` or a bandwidth string such as ``"1gbit"``.
    Usage: ``predict(fs.plan(step, params).collectives, "1gbit", world=4).seconds``.
    """
    out = Prediction(Link.parse(link), _check_world(world))
    for c in collectives:
        out._add(c.op, c.tag, c.bytes, c.calls)
    return out


def predict_bytes(
    bytes_by_op: Mapping[str, int],
    link,
    world: int,
    calls_by_op: Mapping[str, int] | None = None,
) -> Prediction:
    """Communication time of one step from measured bytes per op (one rank's counts).

    Give the comm table's *wire* counts (``comm.counting()`` -> ``counts.wire``): only
    the calls that reached a backend, so a compressed lowering's packed bytes are
    counted and its outer fp32 call is not. ``metrics["comm_bytes"]`` (every call)
    equals them for uncompressed steps. ``calls_by_op`` adds the latency terms.
    Usage: ``predict_bytes({op: s.bytes for op, s in counts.wire.items()}, link, 4)``.
    """
    out = Prediction(Link.parse(link), _check_world(world))
    for op, nbytes in bytes_by_op.items():
        out._add(op, None, int(nbytes), (calls_by_op or {}).get(op, 1))
    return out


def predict_tags(
    bytes_by_tag: Mapping[str, int], ops_by_tag: Mapping[str, str], link, world: int
) -> Prediction:
    """Communication time from ``metrics["comm_bytes_by_tag"]``, each tag's op given.

    A tag's bytes are those of its outermost call: right for plain lowerings, an upper
    bound for compressed ones (use ``predict_bytes`` with wire counts there). The ops
    come from the plan: ``{c.tag: c.op for c in plan.collectives}``.
    Usage: ``predict_tags(metrics["comm_bytes_by_tag"], {"dp.grads": "all_reduce"}, "1gbit", 2)``.
    """
    out = Prediction(Link.parse(link), _check_world(world))
    for tag, nbytes in bytes_by_tag.items():
        if tag not in ops_by_tag:
            raise ValueError(
                f"predict_tags: no op given for tag {tag!r}; pass ops_by_tag with an entry "
                f"for each measured tag (known: {sorted(ops_by_tag)})."
            )
        out._add(ops_by_tag[tag], tag, int(nbytes), 1)
    return out


@dataclass
class Overlap:
    """A step run on its own schedule ([Note: overlapped steps]): seconds in total and parts.

    ``compute``: the compute events' sum; ``comm``: the collectives' link time, as if
    alone; ``exposed``: what the step waited on the link (``seconds - compute``);
    ``hidden``: comm that ran under compute (``comm - exposed``, >= 0 unless the link
    sat idle while compute waited, which a FIFO schedule never makes it do).
    """

    link: Link
    world: int
    seconds: float = 0.0
    compute: float = 0.0
    comm: float = 0.0

    @property
    def exposed(self) -> float:
        return self.seconds - self.compute

    @property
    def hidden(self) -> float:
        return self.comm - self.exposed


def predict_overlap(events: Iterable[tuple], link, world: int) -> Overlap:
    """Step time of a schedule whose collectives may overlap compute ([Note: overlapped steps]).

    ``events`` in program order: ``("compute", seconds)``, ``("issue", key, op, nbytes)``
    or ``("issue", key, op, nbytes, calls)`` (``nbytes`` as the comm table counts one
    rank's input), ``("wait", key)``. A key may be issued again once waited on.
    Usage::

        predict_overlap([("issue", 0, "all_gather", 4 * MB), ("wait", 0),
                         ("issue", 1, "all_gather", 4 * MB), ("compute", 0.2),
                         ("wait", 1), ("compute", 0.2)], "1gbit", world=2).seconds
    """
    out = Overlap(Link.parse(link), _check_world(world))
    clock = link_free = 0.0
    ends: dict = {}
    for i, ev in enumerate(events):
        kind = ev[0]
        if kind == "compute":
            if not ev[1] >= 0:
                raise ValueError(f"predict_overlap: event {i} {ev!r}: seconds must be >= 0.")
            clock += ev[1]
            out.compute += ev[1]
        elif kind == "issue":
            _, key, op, nbytes, *calls = ev
            if key in ends:
                raise ValueError(
                    f"predict_overlap: event {i} issues {key!r} again before a wait on it; "
                    "give each collective in flight its own key."
                )
            lk = out.link
            s = collective_seconds(op, int(nbytes), lk, world, *(calls or [1]))
            host = 0.0
            if lk.host_s_per_byte:
                wire = wire_bytes(op, int(nbytes), world, lk.shared, lk.backend)
                host = lk.host_s_per_byte * wire * (calls[0] if calls else 1)
            start = max(clock, link_free)
            clock += host  # the rank's cores copy and reduce instead of computing
            link_free = start + max(s, host)
            ends[key] = link_free
            out.comm += s
        elif kind == "wait":
            if ev[1] not in ends:
                raise ValueError(
                    f"predict_overlap: event {i} waits on {ev[1]!r}, which is not in flight "
                    "(no issue before it, or waited on already)."
                )
            clock = max(clock, ends.pop(ev[1]))
        else:
            raise ValueError(
                f"predict_overlap: event {i} {ev!r}: unknown kind {kind!r}; use 'compute', "
                "'issue' or 'wait'."
            )
    out.seconds = max([clock, *ends.values()])  # a collective never waited on still ends
    return out


def _check_world(world: int) -> int:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}.")
    return world
