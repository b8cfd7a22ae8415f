"""The host AdamW C loop ([Note: AdamW on the host, in place or elsewhere]) and the
host lowerings writing into a second buffer ([Note: writing the step elsewhere])."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import _elsewhere, cpu_adam, host_adamw
from fscale.kernels.adamw import OP, adamw_update_reference_
from fscale.state import byte_range

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

pytestmark = pytest.mark.skipif(not host_adamw.available(), reason="no C compiler")


def _quad(n: int, seed: int, offset: int = 0):
    """p, g, m, v of n fp32 elements starting ``offset`` elements into fresh storage
    (odd offsets: unaligned loads and non-temporal stores' peeled heads)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(4):
        t = torch.randn(n + offset, generator=gen)[offset:]
        out.append(t.abs() * 1e-3 if k == 3 else t)
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70_000),
    offset=st.integers(0, 9),
    out_offset=st.integers(0, 9),
    step=st.integers(1, 50),
    b1=st.sampled_from([0.9, 0.3]),  # lerp's two forms: |1 - b1| below and above 0.5
)
def test_in_place_and_elsewhere_give_the_same_bits_at_any_thread_count(
    n, offset, out_offset, step, b1
):
    hyper = {**HYPER, "beta1": b1}
    p, g, m, v = _quad(n, seed=n, offset=offset)
    before = [t.clone() for t in (p, g, m, v)]
    outs = [torch.empty(n + out_offset)[out_offset:] for _ in range(3)]
    host_adamw.adamw_([p], [g], [m], [v], step=step, out=tuple([o] for o in outs), **hyper)
    for t, b in zip((p, g, m, v), before, strict=True):  # elsewhere: the inputs are only read
        assert torch.equal(t, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        host_adamw.adamw_([p], [g], [m], [v], step=step, **hyper)  # in place, one thread
    finally:
        torch.set_num_threads(threads)
    for a, b in zip((p, m, v), outs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(p, before[0])


@pytest.mark.parametrize("threads", [3, 7])
def test_blocks_handed_out_as_threads_come_free_give_one_threads_bits(threads):
    """[Note: blocks handed out as threads come free]: a tensor of hundreds of blocks
    (chunks of eight, an odd tail, an unaligned start) updated by more threads than
    cores, each taking chunks as it comes free, in place and elsewhere, gives the
    bits of one thread."""
    n = 300 * 16384 + 4321
    one = _quad(n, seed=7, offset=3)
    many = [t.clone() for t in one]
    outs = [torch.empty(n + 5)[5:] for _ in range(3)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        host_adamw.adamw_(*([t] for t in one), step=4, **HYPER)
        torch.set_num_threads(threads)
        host_adamw.adamw_(*([t] for t in many), step=4, out=tuple([o] for o in outs), **HYPER)
        host_adamw.adamw_(*([t] for t in many), step=4, **HYPER)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one[:1] + one[2:], outs, many[:1] + many[2:], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(one[0], _quad(n, seed=7, offset=3)[0])


@pytest.mark.parametrize("n", [40, 1_000_003])
@pytest.mark.parametrize("b1", [0.9, 0.3])
def test_equals_torch_fused_adamw_to_an_ulp(n, b1):
    """Moments bit for bit with ``torch._fused_adamw_`` where it vectorises (its scalar
    tail rounds differently), params within an ulp of its result (``HYPER``'s decay)."""
    hyper = {**HYPER, "beta1": b1}
    ours = _quad(n, seed=1)
    theirs = [t.clone() for t in ours]
    for step in (1, 2, 3):
        host_adamw.adamw_(*([t] for t in ours), step=step, **hyper)
        torch._fused_adamw_(
            *([t] for t in theirs), [], [torch.tensor(float(step))], amsgrad=False,
            maximize=False, **hyper,
        )  # fmt: skip
        for a, b in zip(ours, theirs, strict=True):
            assert _ulps(a[:-16], b[:-16]) <= 1
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_nonfinite_inputs_propagate_like_torch():
    p, g, m, v = _quad(64, seed=2)
    g[3], g[10], p[20], v[30] = float("nan"), float("inf"), float("-inf"), float("inf")
    ref = [t.clone() for t in (p, g, m, v)]
    host_adamw.adamw_([p], [g], [m], [v], step=4, **HYPER)
    torch._fused_adamw_(
        *([t] for t in ref), [], [torch.tensor(4.0)], amsgrad=False, maximize=False, **HYPER
    )
    for a, b in zip((p, m, v), (ref[0], ref[2], ref[3]), strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


def test_bad_tensors_raise_naming_what_it_takes():
    p, g, m, v = _quad(8, seed=3)
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensors of one size"):
        host_adamw.adamw_([p.double()], [g], [m], [v], step=1, **HYPER)
    with pytest.raises(ValueError, match="of one size"):
        host_adamw.adamw_([p], [g[:4]], [m], [v], step=1, **HYPER)


# ---------------------------------------------------------------- writing elsewhere


def _buffer_quads(dtype=torch.float32):
    """A uint8 buffer holding p, m, v of two leaves (one fp64 with dtype=float64), and
    their grads outside it."""
    sizes = [1000, 37]
    nbytes = 3 * sum(sizes) * dtype.itemsize
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(4)
    at, quads = 0, []
    for n in sizes:
        views = []
        for k in range(3):
            t = buf[at : at + n * dtype.itemsize].view(dtype)
            t.copy_(torch.randn(n, generator=gen, dtype=torch.float64).abs() * 1e-2 if k == 2
                    else torch.randn(n, generator=gen, dtype=torch.float64))  # fmt: skip
            views.append(t)
            at += n * dtype.itemsize
        g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        quads.append((views[0], g, views[1], views[2]))
    return buf, quads


@pytest.mark.parametrize("lowering", ["c", "torch_fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_writing_into_leaves_the_source_and_gives_the_in_place_result(monkeypatch, lowering, dtype):
    """Every CPU lowering of the op honours the redirect: the source buffer is
    untouched, the target holds what an in-place update gives, and each tensor
    written is recorded."""
    if lowering == "torch_fused":
        monkeypatch.setattr(host_adamw, "available", lambda: False)
    fn = adamw_update_reference_ if lowering == "reference" else cpu_adam.adamw_update_cpu_fused_
    buf, quads = _buffer_quads(dtype)
    src = buf.clone()
    ref_buf, ref_quads = _buffer_quads(dtype)
    fn(*map(list, zip(*ref_quads, strict=True)), step=3, **HYPER)  # in place
    target = torch.full_like(buf, 7)
    with _elsewhere.writing_into(buf, target) as written:
        fn(*map(list, zip(*quads, strict=True)), step=3, **HYPER)
    assert torch.equal(buf, src)
    assert torch.equal(target, ref_buf)
    assert sorted(written.ranges) == sorted(
        byte_range(t) for q in quads for t in (q[0], q[2], q[3])
    )


def test_a_skipped_step_writes_nothing_and_records_nothing():
    buf, quads = _buffer_quads()
    target = torch.zeros_like(buf)
    with _elsewhere.writing_into(buf, target) as written:
        cpu_adam.adamw_update_cpu_fused_(
            *map(list, zip(*quads, strict=True)), step=1, skip=torch.tensor(1.0), **HYPER
        )
    assert written.ranges == [] and not target.any()


def test_tensors_outside_the_source_are_updated_in_place():
    buf, quads = _buffer_quads()
    p_out = quads[0][0].clone()  # a param outside the buffer (offload's shared masters)
    want = p_out.clone()
    m_ref, v_ref = quads[0][2].clone(), quads[0][3].clone()
    adamw_update_reference_([want], [quads[0][1]], [m_ref], [v_ref], step=2, **HYPER)
    target = torch.zeros_like(buf)
    with _elsewhere.writing_into(buf, target) as written:
        cpu_adam.adamw_update_cpu_fused_(
            [p_out], [quads[0][1]], [quads[0][2]], [quads[0][3]], step=2, **HYPER
        )
    assert written.gaps(p_out) == [(0, p_out.nbytes)] and len(written.ranges) == 2
    torch.testing.assert_close(p_out, want, rtol=1e-6, atol=0)


def test_host_kernels_resolve_the_c_loop_and_the_switch_turns_it_off(monkeypatch):
    with cpu_adam.host_kernels():
        assert dispatch.resolve(OP, torch.zeros(1)).name == cpu_adam.NAME
    assert dispatch.resolve(OP, torch.zeros(1)).name != cpu_adam.NAME
    monkeypatch.setenv("FSCALE_HOST_ADAMW_COMPILE", "0")
    assert not host_adamw.available()
    with pytest.raises(RuntimeError, match="FSCALE_HOST_ADAMW_COMPILE"):
        host_adamw.adamw_(*([t] for t in _quad(4, seed=5)), step=1, **HYPER)


def test_writing_into_a_buffer_of_another_size_raises():
    with pytest.raises(ValueError, match="source bytes"):
        with _elsewhere.writing_into(torch.zeros(8, dtype=torch.uint8), torch.zeros(4)):
            pass


def test_carry_copies_exactly_the_bytes_no_kernel_wrote():
    """A kernel given part of a slot wrote that part: only the rest is carried over."""
    src = torch.arange(64, dtype=torch.float32)
    dst = torch.full_like(src, -1.0)
    written = _elsewhere.Written()
    written.add(src[8:16])
    written.add(src[12:20])  # overlapping writes
    written.add(src[40:48])
    view = src[4:44]
    assert written.gaps(view) == [(0, 16), (64, 144)]
    written.carry(view, dst[4:44])
    want = torch.full_like(src, -1.0)
    want[4:8], want[20:40] = src[4:8], src[20:40]
    assert torch.equal(dst, want)
