"""The comm table on gloo worlds of 2, 3 and 4 CPU ranks, and on the world of one.

Each rank builds its inputs from its rank number, so every rank can compute every
other rank's input and check a collective's result against a local reference. Checks
are batched into one world per world size (a world costs a process start each).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import comm
from tests.dist import run_world

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, *FP8)


def _inp(r: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Rank r's input: small integers, exact in every dtype (sums stay <= 4 * 9)."""
    numel = 1
    for s in shape:
        numel *= s
    base = (torch.arange(numel) % 5 + r + 1).reshape(shape)
    return (base % 2).bool() if dtype == torch.bool else base.to(dtype)


def _reduce_ref(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    """What a reduction of ``xs`` must give, rounded the way the lowerings round."""
    dtype, n = xs[0].dtype, len(xs)
    if dtype == torch.bool:
        stack = torch.stack(xs)
        return stack.any(0) if op in ("sum", "max") else stack.all(0)
    stack = torch.stack([x.double() for x in xs])
    if op == "max":
        return stack.amax(0).to(dtype)
    if op == "min":
        return stack.amin(0).to(dtype)
    total = stack.sum(0)
    if op == "sum":
        return total.to(dtype)
    if dtype in FP8:  # widened to fp32, divided there, rounded once
        return (total.float() / n).to(dtype)
    if dtype.is_floating_point:  # summed exactly in dtype, divided in dtype
        return total.to(dtype) / n
    return torch.div(total.long(), n, rounding_mode="trunc").to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality (fp8 has no ==): shapes, dtypes and bytes."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype in FP8 or a.dtype == torch.bool:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), (a, b)


# --------------------------------------------------------------------------- rank bodies


def _check_all_reduce(r: int, n: int) -> None:
    for dtype in DTYPES:
        for op in comm.REDUCE_OPS:
            x = _inp(r, (3, 4), dtype)
            out = comm.all_reduce(x, op=op)
            assert out is x  # in place
            _same(x, _reduce_ref([_inp(j, (3, 4), dtype) for j in range(n)], op))
    for op in ("max", "min"):
        x = _inp(r, (6,), torch.bool)
        comm.all_reduce(x, op=op)
        _same(x, _reduce_ref([_inp(j, (6,), torch.bool) for j in range(n)], op))
    x = _inp(r, (4, 3)).t()  # strided: reduced through a contiguous copy, copied back
    comm.all_reduce(x)
    _same(x, _reduce_ref([_inp(j, (4, 3)).t() for j in range(n)], "sum"))


def _check_all_gather(r: int, n: int) -> None:
    for dtype in (*DTYPES, torch.bool):
        out = comm.all_gather(_inp(r, (3, 5), dtype))
        _same(out, torch.cat([_inp(j, (3, 5), dtype) for j in range(n)]))
    x = torch.tensor(float(r))  # 0-d gathers into (n,)
    _same(comm.all_gather(x), torch.arange(n, dtype=torch.float32))
    x = _inp(r, (5, 3)).t()
    _same(comm.all_gather(x), torch.cat([_inp(j, (5, 3)).t() for j in range(n)]))


def _check_reduce_scatter(r: int, n: int) -> None:
    for dtype in DTYPES:
        for op in comm.REDUCE_OPS:
            full = _reduce_ref([_inp(j, (2 * n, 3), dtype) for j in range(n)], op)
            out = comm.reduce_scatter(_inp(r, (2 * n, 3), dtype), op=op)
            _same(out, full[2 * r : 2 * r + 2])
    # The all_reduce + slice fallback agrees with the native gloo lowering.
    with comm.override("reduce_scatter", comm.reduce_scatter_via_all_reduce, backend="gloo"):
        for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.float8_e5m2):
            for op in ("sum", "avg"):
                full = _reduce_ref([_inp(j, (n, 2), dtype) for j in range(n)], op)
                _same(comm.reduce_scatter(_inp(r, (n, 2), dtype), op=op), full[r : r + 1])
    with pytest.raises(ValueError, match=rf"shape \({2 * n + 1}, 3\).*world size {n}; pad"):
        comm.reduce_scatter(torch.ones(2 * n + 1, 3))
    # Raised before any rank entered the collective: the group is still in step.
    assert comm.all_reduce(torch.ones(1)).item() == n


def _rows(src: int, dst: int, count: int, dtype) -> torch.Tensor:
    vals = torch.arange(count, dtype=torch.float32) + 10 * dst + 40 * src
    return torch.stack([vals, -vals], dim=1).to(dtype)


def _count(src: int, dst: int) -> int:
    return (2 * src + dst) % 3  # uneven, zero for some pairs


def _check_all_to_all(r: int, n: int) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.int8, *FP8):
        ins = [_count(r, j) for j in range(n)]
        outs = [_count(j, r) for j in range(n)]
        x = torch.cat([_rows(r, j, ins[j], dtype) for j in range(n)])
        got = comm.all_to_all(x, output_split_sizes=outs, input_split_sizes=ins)
        _same(got, torch.cat([_rows(j, r, outs[j], dtype) for j in range(n)]))
        even = torch.cat([_rows(r, j, 2, dtype) for j in range(n)])  # no splits: equal
        _same(comm.all_to_all(even), torch.cat([_rows(j, r, 2, dtype) for j in range(n)]))
    with pytest.raises(ValueError, match=r"input_split_sizes=\[3, 1.*sum to .* 3 rows"):
        comm.all_to_all(torch.ones(3, 2), [1] * n, input_split_sizes=[3] + [1] * (n - 1))


def _check_broadcast_p2p(r: int, n: int) -> None:
    for dtype in (torch.float32, torch.float16, torch.int8, torch.bool, *FP8):
        x = _inp(r, (2, 3), dtype)
        assert comm.broadcast(x, src=n - 1) is x
        _same(x, _inp(n - 1, (2, 3), dtype))
    nxt, prev = (r + 1) % n, (r - 1) % n
    for dtype in (torch.float32, torch.bfloat16, *FP8):
        buf = torch.empty(4, 2, dtype=dtype)
        # Even ranks send first, odd receive first: no ring of blocked sends.
        if r % 2 == 0:
            comm.send(_inp(r, (4, 2), dtype), dst=nxt)
            got = comm.recv(buf, src=prev)
        else:
            got = comm.recv(buf, src=prev)
            comm.send(_inp(r, (4, 2), dtype), dst=nxt)
        assert got is buf
        _same(buf, _inp(prev, (4, 2), dtype))
    with pytest.raises(ValueError, match="this rank"):
        comm.send(torch.ones(1), dst=r)


def _check_async(r: int, n: int) -> None:
    a = _inp(r, (2 * n, 2))
    handles = {
        "all_reduce": comm.all_reduce(a.clone(), op="avg", async_op=True),
        "all_gather": comm.all_gather(a, async_op=True),
        "reduce_scatter": comm.reduce_scatter(a, op="avg", async_op=True),
        "all_to_all": comm.all_to_all(a, async_op=True),
        "broadcast": comm.broadcast(a.clone(), src=0, async_op=True),
        "fp8_all_reduce": comm.all_reduce(a.to(FP8[0]), async_op=True),
    }
    got = {k: h.wait() for k, h in handles.items()}
    assert all(h.is_completed() for h in handles.values())
    xs = [_inp(j, (2 * n, 2)) for j in range(n)]
    _same(got["all_reduce"], _reduce_ref(xs, "avg"))
    _same(got["all_gather"], torch.cat(xs))
    _same(got["reduce_scatter"], _reduce_ref(xs, "avg")[2 * r : 2 * r + 2])
    _same(got["all_to_all"], torch.cat([x[2 * r : 2 * r + 2] for x in xs]))
    _same(got["broadcast"], xs[0])
    _same(got["fp8_all_reduce"], _reduce_ref([x.to(FP8[0]) for x in xs], "sum"))
    h = comm.all_reduce(torch.ones(1), async_op=True)
    assert h.wait() is h.wait()  # waiting twice is harmless
    # pending_result: the buffer wait() fills in place (handed on before completion by
    # ZeRO-3's deferred reduce-scatter), or None where the result is made at wait().
    h = comm.reduce_scatter(a, op="avg", async_op=True)
    early = h.pending_result
    assert early is not None and h.wait() is early
    _same(early, _reduce_ref(xs, "avg")[2 * r : 2 * r + 2])
    with comm.override("reduce_scatter", comm.reduce_scatter_via_all_reduce):
        h = comm.reduce_scatter(a, op="avg", async_op=True)
        assert h.pending_result is None
        _same(h.wait(), _reduce_ref(xs, "avg")[2 * r : 2 * r + 2])


def _check_subgroup(r: int, n: int) -> None:
    members = list(range(1, n, 2))  # odd ranks: [1] at n=2, [1, 3] at n=4
    group = comm.new_group(members)  # every rank calls new_group, members or not
    if r not in members:
        return
    m, me = len(members), members.index(r)
    assert comm.world_size(group) == m and comm.rank(group) == me
    assert comm.backend(group) == "gloo"
    xs = [_inp(g, (2 * m, 3)) for g in members]
    x = _inp(r, (2 * m, 3))
    _same(comm.all_reduce(x.clone(), op="max", group=group), _reduce_ref(xs, "max"))
    _same(comm.all_gather(x, group=group), torch.cat(xs))
    _same(comm.reduce_scatter(x, op="avg", group=group), _reduce_ref(xs, "avg")[2 * me :][:2])
    y = x.clone()
    comm.broadcast(y, src=m - 1, group=group)  # src is a rank *within* the group
    _same(y, xs[-1])
    comm.barrier(group)


def _check_stats(r: int, n: int) -> None:
    comm.reset_stats()
    with comm.counting() as c:
        comm.all_gather(torch.zeros(3, 5))
        assert c.ops["all_gather"] == comm.CommStats(calls=1, bytes=60)
        with comm.counting() as inner:
            comm.all_reduce(torch.zeros(4, dtype=torch.bfloat16))
            comm.reduce_scatter(torch.zeros(n, 2, dtype=torch.int8), async_op=True).wait()
        comm.all_to_all(torch.zeros(n, 3, dtype=torch.float16))
        comm.broadcast(torch.zeros(7, dtype=torch.float64))
        comm.barrier()
        peer = r ^ 1  # pairs (0,1), (2,3)
        if r % 2 == 0:
            comm.send(torch.zeros(5), dst=peer)
        else:
            comm.recv(torch.zeros(5), src=peer)
        with comm.override("reduce_scatter", comm.reduce_scatter_via_all_reduce):
            comm.reduce_scatter(torch.zeros(n, 4))
    assert inner.ops == {
        "all_reduce": comm.CommStats(1, 8),
        "reduce_scatter": comm.CommStats(1, n * 2),
    }
    p2p = "send" if r % 2 == 0 else "recv"
    assert c.ops == {
        "all_gather": comm.CommStats(1, 60),
        "all_reduce": comm.CommStats(2, 8 + n * 16),  # the fallback's inner all_reduce
        "reduce_scatter": comm.CommStats(2, n * 2 + n * 16),
        "all_to_all": comm.CommStats(1, n * 6),
        "broadcast": comm.CommStats(1, 56),
        "barrier": comm.CommStats(1, 0),
        p2p: comm.CommStats(1, 20),
    }
    # The fallback reduce_scatter reached the wire through all_reduce: not a leaf.
    assert c.wire["reduce_scatter"] == comm.CommStats(1, n * 2)
    assert c.wire["all_reduce"] == comm.CommStats(2, 8 + n * 16)
    assert comm.stats() == c.ops


def _world(rank: int, n: int) -> dict:
    assert comm.is_initialized() and comm.backend() == "gloo"
    assert (comm.rank(), comm.world_size()) == (rank, n)
    _check_all_reduce(rank, n)
    _check_all_gather(rank, n)
    _check_reduce_scatter(rank, n)
    _check_all_to_all(rank, n)
    _check_broadcast_p2p(rank, n)
    _check_async(rank, n)
    _check_subgroup(rank, n)
    _check_stats(rank, n)
    return comm.stats()


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_on_gloo(n):
    results = run_world(_world, n, timeout=120)
    assert len(results) == n
    assert results[0]["all_gather"] == comm.CommStats(1, 60)


# --------------------------------------------------------------------------- nccl


def _nccl_world(rank: int, n: int) -> list[str]:
    """The nccl lowerings on CUDA tensors, checked against the same CPU references."""
    import torch.distributed as dist  # the test builds its nccl group itself

    torch.cuda.set_device(rank)
    group = dist.new_group(list(range(n)), backend="nccl")
    assert comm.backend(group) == "nccl"
    cuda = torch.device("cuda", rank)
    for dtype in DTYPES:
        xs = [_inp(j, (2 * n, 3), dtype) for j in range(n)]
        for op in comm.REDUCE_OPS:
            full = _reduce_ref(xs, op)
            _same(comm.all_reduce(xs[rank].to(cuda), op=op, group=group).cpu(), full)
            got = comm.reduce_scatter(xs[rank].to(cuda), op=op, group=group, async_op=True)
            _same(got.wait().cpu(), full[2 * rank : 2 * rank + 2])
        _same(comm.all_gather(xs[rank].to(cuda), group=group).cpu(), torch.cat(xs))
        ins = [_count(rank, j) for j in range(n)]
        outs = [_count(j, rank) for j in range(n)]
        x = torch.cat([_rows(rank, j, ins[j], dtype) for j in range(n)]).to(cuda)
        got = comm.all_to_all(x, outs, ins, group=group, async_op=True).wait().cpu()
        _same(got, torch.cat([_rows(j, rank, outs[j], dtype) for j in range(n)]))
        y = xs[rank].to(cuda)
        comm.broadcast(y, src=n - 1, group=group)
        _same(y.cpu(), xs[-1])
        buf = torch.empty_like(y)
        if rank == 0:
            comm.send(y, dst=1, group=group)
        elif rank == 1:
            _same(comm.recv(buf, src=0, group=group).cpu(), xs[-1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_collectives_on_nccl():
    run_world(_nccl_world, 2, timeout=300)


# --------------------------------------------------------------------------- drawn shapes


def _drawn(rank: int, n: int, case: dict) -> None:
    dtype, trailing, rows = case["dtype"], case["trailing"], case["rows"]
    xs = [_inp(j, (rows * n, *trailing), dtype) for j in range(n)]
    _same(comm.all_gather(xs[rank]), torch.cat(xs))
    _same(
        comm.reduce_scatter(xs[rank], op=case["op"]),
        _reduce_ref(xs, case["op"])[rows * rank : rows * (rank + 1)],
    )
    counts = case["counts"]  # counts[i][j]: rows rank i sends to rank j
    ins = counts[rank]
    outs = [counts[j][rank] for j in range(n)]
    x = torch.cat([_rows(rank, j, ins[j], dtype) for j in range(n)])
    got = comm.all_to_all(x, output_split_sizes=outs, input_split_sizes=ins)
    _same(got, torch.cat([_rows(j, rank, outs[j], dtype) for j in range(n)]))


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_drawn_shapes(data):
    n = data.draw(st.sampled_from([2, 3]), label="world")
    case = {
        "dtype": data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, *FP8])),
        "op": data.draw(st.sampled_from(comm.REDUCE_OPS)),
        "rows": data.draw(st.integers(1, 3)),
        "trailing": data.draw(st.lists(st.integers(1, 3), max_size=2).map(tuple)),
        "counts": data.draw(
            st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=n, max_size=n)
        ),
    }
    run_world(_drawn, n, case, timeout=60)


# --------------------------------------------------------------------------- world of one


@pytest.fixture
def single():
    if comm.is_initialized():
        pytest.skip("a process group is initialised in the test process")
    comm.reset_stats()
    yield
    comm.reset_stats()


def test_single_world_facts(single):
    assert comm.backend() == "single"
    assert (comm.world_size(), comm.rank()) == (1, 0)
    assert comm.new_group([0]) is None
    with pytest.raises(ValueError, match="not initialised"):
        comm.new_group([0, 1])
    comm.barrier()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool, *FP8])
def test_single_every_op(single, dtype):
    x = _inp(0, (4, 3), dtype)
    ops = ("max", "min") if dtype == torch.bool else comm.REDUCE_OPS
    for op in ops:
        assert comm.all_reduce(x, op=op) is x
        _same(x, _inp(0, (4, 3), dtype))
        rs = comm.reduce_scatter(x, op=op)
        assert rs.data_ptr() != x.data_ptr()
        _same(rs, x)
    ag = comm.all_gather(x)
    assert ag.data_ptr() != x.data_ptr()  # freshly allocated, like the real collective
    _same(ag, x)
    _same(comm.all_gather(torch.tensor(3.0)), torch.tensor([3.0]))
    _same(comm.all_to_all(x), x)
    _same(comm.all_to_all(x, output_split_sizes=[4], input_split_sizes=[4]), x)
    assert comm.broadcast(x, src=0) is x
    for h in (
        comm.all_reduce(x, op="max", async_op=True),
        comm.all_gather(x, async_op=True),
        comm.reduce_scatter(x, op="max", async_op=True),
        comm.all_to_all(x, async_op=True),
    ):
        assert h.is_completed()
        _same(h.wait(), x)
    nbytes = 12 * x.element_size()
    assert comm.stats()["all_gather"] == comm.CommStats(3, 2 * nbytes + 4)


def test_single_donated_inputs_come_back_uncopied_and_counted(single):
    """[Note: donated inputs]: a world of one returns a donated input itself."""
    x = _inp(0, (4, 3), torch.float32)
    with comm.counting() as donated:
        ag = comm.all_gather(x, donate=True)
        rs = comm.reduce_scatter(x, op="avg", donate=True, async_op=True).wait()
        scalar = comm.all_gather(torch.tensor(3.0), donate=True)
    assert ag is x and rs is x
    _same(x, _inp(0, (4, 3), torch.float32))  # avg over one rank: unchanged
    _same(scalar, torch.tensor([3.0]))
    with comm.counting() as copied:
        assert comm.all_gather(x).data_ptr() != x.data_ptr()
        assert comm.reduce_scatter(x, op="avg").data_ptr() != x.data_ptr()
        comm.all_gather(torch.tensor(3.0))
    assert donated.ops == copied.ops  # the same calls and bytes either way


def test_single_errors(single):
    x = torch.ones(4, 3)
    with pytest.raises(ValueError, match="no peer|this rank"):
        comm.send(x, dst=0)
    with pytest.raises(ValueError, match=r"outside the group of 1"):
        comm.recv(x, src=1)
    with pytest.raises(ValueError, match=r"outside the group of 1"):
        comm.broadcast(x, src=1)
    with pytest.raises(ValueError, match="unknown reduce op 'prod'"):
        comm.all_reduce(x, op="prod")
    with pytest.raises(ValueError, match="bool"):
        comm.all_reduce(torch.ones(2, dtype=torch.bool), op="avg")
    with pytest.raises(ValueError, match="must hold 1 sizes"):
        comm.all_to_all(x, output_split_sizes=[2, 2], input_split_sizes=[4])
    with pytest.raises(ValueError, match="in a world of one"):
        comm.all_to_all(x, output_split_sizes=[3], input_split_sizes=[4])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        comm.reduce_scatter(torch.tensor(1.0))
    assert comm.stats() == {}  # rejected calls are not counted


# --------------------------------------------------------------------------- the table


def test_override_swaps_and_restores(single):
    seen = []

    def doubled(t, *, op, group, async_op):
        seen.append(op)
        return t.mul_(2)

    original = comm.lowering("all_reduce", "single")
    with comm.override("all_reduce", doubled):
        assert comm.lowering("all_reduce", "gloo") is doubled  # every backend by default
        assert comm.all_reduce(torch.ones(2), op="max").tolist() == [2.0, 2.0]
    assert seen == ["max"]
    assert comm.lowering("all_reduce", "single") is original
    assert comm.lowering("all_reduce", "gloo") is not doubled
    with comm.override("all_reduce", doubled, backend="nccl"):
        assert comm.lowering("all_reduce", "nccl") is doubled
        assert comm.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # single untouched
    with pytest.raises(RuntimeError):
        with comm.override("all_reduce", doubled, backend="single"):
            raise RuntimeError("inside")
    assert comm.lowering("all_reduce", "single") is original  # restored on error too


def test_wire_counts_nested_lowerings(single):
    with comm.counting() as c:
        with comm.override("reduce_scatter", comm.reduce_scatter_via_all_reduce):
            out = comm.reduce_scatter(torch.arange(6.0).reshape(3, 2), op="avg")
    _same(out, torch.arange(6.0).reshape(3, 2))
    assert c.ops == {"reduce_scatter": comm.CommStats(1, 24), "all_reduce": comm.CommStats(1, 24)}
    assert c.wire == {"all_reduce": comm.CommStats(1, 24)}


def test_lowering_errors_list_what_is_known():
    with pytest.raises(ValueError, match=r"known backends: \['gloo', 'nccl', 'single'\]"):
        comm.lowering("all_reduce", "mpi")
    with pytest.raises(ValueError, match="known ops: .*all_gather"):
        comm.lowering("all_scatter", "gloo")
    with pytest.raises(ValueError, match="unknown comm op"):
        with comm.override("all_scatter", lambda t, **kw: t):
            pass
    comm.register_lowering("barrier", "mpi", lambda *, group: None)
    try:
        assert comm.lowering("barrier", "mpi") is not None
    finally:
        del comm._TABLE["barrier"]["mpi"]


def test_bus_bytes():
    assert comm.bus_bytes("all_reduce", 1000, 4) == 1500
    assert comm.bus_bytes("reduce_scatter", 1000, 4) == 750
    assert comm.bus_bytes("all_to_all", 1000, 4) == 750
    assert comm.bus_bytes("all_gather", 250, 4) == 750  # a 250-byte shard: 1000 gathered
    assert comm.bus_bytes("broadcast", 1000, 4) == 1000
    assert comm.bus_bytes("all_reduce", 1000, 1) == 0
    with pytest.raises(ValueError, match="known ops"):
        comm.bus_bytes("gather", 1, 2)
