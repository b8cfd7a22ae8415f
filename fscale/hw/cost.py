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
    Usage: ``Link(1e9, 50e-6)``, ``Link.parse("10gbit", shared=True, backend="gloo")``.
    """

    bandwidth_bits_per_s: float
    latency_s: float = DEFAULT_LATENCY_S
    shared: bool = False
    backend: str | None = None

    def __post_init__(self):
        parse_bandwidth(self.bandwidth_bits_per_s)  # positive, finite, a number
        if not self.latency_s >= 0:
            raise ValueError(f"Link.latency_s must be >= 0 seconds, got {self.latency_s!r}.")
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


def _check_world(world: int) -> int:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}.")
    return world
