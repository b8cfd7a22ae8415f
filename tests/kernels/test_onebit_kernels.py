"""The 1-bit pack/unpack Triton kernels against their torch references (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import onebit, onebit_cpu

needs_triton = pytest.mark.skipif(onebit.triton is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_reference_packs_signs_lsb_first_with_mean_abs_scale():
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.0, -1.0, 2.0, 5.0]])
    bits, scales = onebit.pack_reference(x)
    assert bits.dtype == torch.uint8 and bits.tolist() == [[0b11010101]]
    assert scales.tolist() == [2.25]
    out = onebit.unpack_reference(bits, scales)
    assert out.tolist() == [[2.25, -2.25, 2.25, -2.25, 2.25, -2.25, 2.25, 2.25]]


def test_residual_never_exceeds_the_input():
    # [Note: the scale is mean |x|]: ||x - C(x)||^2 = ||x||^2 - n scale^2.
    x = torch.randn(16, 64, dtype=torch.float64).float()
    bits, scales = onebit.pack_reference(x)
    res = x - onebit.unpack_reference(bits, scales)
    assert torch.all(res.norm(dim=1) <= x.norm(dim=1) + 1e-5)


def _pack_by_definition(x: torch.Tensor) -> torch.Tensor:
    """Byte j of a row: sum over k of 2^k for the elements 8 j + k that are >= 0."""
    on = (x >= 0).to(torch.int32).view(x.shape[0], x.shape[1] // 8, 8)
    return (on * (2 ** torch.arange(8, dtype=torch.int32))).sum(dim=2).to(torch.uint8)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 6),
    chunk_bytes=st.sampled_from([1, 2, 5, 16]),
    seed=st.integers(0, 2**16),
    special=st.booleans(),
)
def test_reference_equals_its_definition(rows, chunk_bytes, seed, special):
    # The one-multiply pack ([Note: packing 8 signs with one multiply]) and the sign
    # table unpack against the plain formulas, every bit pattern and +-0, +-inf, NaN.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, chunk_bytes * 8, generator=g)
    if special and x.numel():
        pick = torch.randint(0, 6, x.shape, generator=g)
        values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0])
        x = torch.where(torch.rand(x.shape, generator=g) < 0.3, values[pick], x)
    bits, scales = onebit.pack_reference(x)
    assert bits.shape == (rows, chunk_bytes) and bits.dtype == torch.uint8
    assert torch.equal(bits, _pack_by_definition(x))
    torch.testing.assert_close(scales, x.abs().mean(dim=1), rtol=0, atol=0, equal_nan=True)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(32, 8)
    s = torch.rand(32, generator=g) + 0.5
    signs = ((every.to(torch.int32).unsqueeze(-1) >> torch.arange(8)) & 1) * 2 - 1
    want = signs.view(32, 64).float() * s.view(32, 1)
    assert torch.equal(onebit.unpack_reference(every, s), want)
    assert torch.equal(onebit.unpack_reference(every, s, torch.bfloat16), want.bfloat16())


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 5),
    chunk_bytes=st.sampled_from([1, 3, 32, 300]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_triton_pack_unpack_match_reference(rows, chunk_bytes, dtype, seed):
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, chunk_bytes * 8, generator=g).to(dtype)
    bits, scales = onebit.pack_triton(x)
    ref_bits, ref_scales = onebit.pack_reference(x)
    assert torch.equal(bits, ref_bits)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=1e-7)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = onebit.unpack_triton(ref_bits, ref_scales, out_dtype)
        want = onebit.unpack_reference(ref_bits, ref_scales, out_dtype)
        assert torch.equal(got.sign(), want.sign())
        # The interpreter rounds fp32 -> bf16 toward zero: allow one bf16 ulp.
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 8"):
        onebit.pack_reference(torch.zeros(2, 12))
    with pytest.raises(ValueError, match="2-D float"):
        onebit.onebit_pack(torch.zeros(16, dtype=torch.int32).view(2, 8))


def test_kernel_table_cpu_gets_reference_cuda_gets_triton():
    assert dispatch.resolve(onebit.PACK, torch.device("cpu"), torch.float32).is_reference
    assert dispatch.resolve(onebit.UNPACK, torch.device("cpu"), torch.uint8).is_reference
    if onebit.triton is not None:
        names = {r.name for r in dispatch.lowerings(onebit.PACK)}
        assert names == {"onebit_pack_reference", "onebit_pack_triton"}
        cuda = [r for r in dispatch.lowerings(onebit.UNPACK) if r.device == "cuda"]
        assert [r.name for r in cuda] == ["onebit_unpack_triton"]


def _mean_by_hand(xs, ews, ess, lay):
    """The error-compensated 1-bit mean written out of place in one pass per step."""

    def compress(y):
        bits, scales = onebit.pack_reference(y.view(-1, lay.chunk))
        return onebit.unpack_reference(bits, scales).view(-1)

    approx = []
    for x, e in zip(xs, ews, strict=True):
        y = torch.zeros(lay.padded)
        y[: lay.n] = x
        y = y + e
        approx.append(compress(y))
        e.copy_(y - approx[-1])
    out = []
    for i, e in enumerate(ess):
        part = slice(i * lay.server, (i + 1) * lay.server)
        z = torch.stack([a[part] for a in approx]).mean(dim=0) + e
        out.append(compress(z))
        e.copy_(z - out[-1])
    return torch.cat(out)[: lay.n]


@pytest.fixture(params=["c", "compiled"])
def cpu_loop(request, monkeypatch):
    """Which CPU loop the fused calls take: the C loops ([Note: the 1-bit CPU loops in
    C]), or with them off the torch.compile ones."""
    if request.param == "c":
        if onebit_cpu.loops() is None:
            pytest.skip("no C compiler for the 1-bit CPU loops")
    else:
        monkeypatch.setattr(onebit_cpu, "loops", lambda: None)
    return request.param


def _compiled_ran(name: str, cpu_loop: str) -> bool:
    return cpu_loop == "c" or (name in onebit._COMPILED and onebit._COMPILED[name] is not False)


@pytest.mark.parametrize("special", [False, True])
def test_compiled_signs_and_residual_equal_the_reference(special, cpu_loop):
    # [Note: signs and residual in one CPU loop]: the compiled loop gives the torch ops'
    # bits and residual, +-0, +-inf and NaN included (NaN compared as NaN).
    g = torch.Generator().manual_seed(7)
    y = torch.randn(64, 32, generator=g)
    if special:
        values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
        pick = torch.randint(0, 6, y.shape, generator=g)
        y = torch.where(torch.rand(y.shape, generator=g) < 0.3, values[pick], y)
    scales = torch.rand(64, generator=g)
    scales[:3] = 0.0
    want, got = y.clone(), y.clone()
    want_bits = onebit.pack_residual_reference(want, scales)
    got_bits = onebit.pack_residual_(got, scales, fused=True)
    assert _compiled_ran("pack_residual", cpu_loop)
    assert torch.equal(got_bits, want_bits)
    assert torch.equal(got.isnan(), want.isnan())
    same = ~want.isnan()
    assert torch.equal(got[same].view(torch.int32), want[same].view(torch.int32))  # -0.0 too


def test_compiled_unpack_equals_the_reference(cpu_loop):
    # [Note: unpacking in one CPU loop]: +-scale by the bits, zero, inf and NaN scales
    # included (-0.0 for a clear bit of a zero scale; NaN compared as NaN).
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(0, 256, (64, 4), dtype=torch.uint8, generator=g)
    scales = torch.rand(64, generator=g)
    scales[:4] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45])
    want = onebit.unpack_reference(bits, scales)
    got = onebit.unpack_(bits, scales, fused=True)
    assert _compiled_ran("unpack", cpu_loop)
    assert torch.equal(got.isnan(), want.isnan())
    same = ~want.isnan()
    assert torch.equal(got[same].view(torch.int32), want[same].view(torch.int32))


def test_compiled_server_mean_equals_the_reference(cpu_loop, world=2):
    # [Note: the server's mean in one CPU loop]: the sum in rank order, the +0.0, the
    # division and |z| as the torch ops give them, on strided (world, rows) slices as
    # the server passes them; zero, inf and NaN scales and special z included (worlds
    # 1 and 3 go through it in the fused blocked test below).
    g = torch.Generator().manual_seed(world)
    rows, nbytes = 16, 4
    bits = torch.randint(0, 256, (world, 2 * rows, nbytes), dtype=torch.uint8, generator=g)
    scales = torch.rand(world, 2 * rows, generator=g)
    scales[:, :4] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45])
    bits[:, 0] = 0  # a zero scale with clear bits: -0.0 from every piece
    z = torch.randn(rows, nbytes * 8, generator=g)
    z[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), 1e-45])
    want_z, got_z = z.clone(), z.clone()
    want_mag, got_mag = torch.empty_like(z), torch.empty_like(z)
    onebit.server_mean_reference(bits[:, :rows], scales[:, :rows], want_z, want_mag)
    onebit.server_mean_(bits[:, :rows], scales[:, :rows], got_z, got_mag, fused=True)
    assert _compiled_ran("server_mean", cpu_loop)
    for got, want in ((got_z, want_z), (got_mag, want_mag)):
        assert torch.equal(got.isnan(), want.isnan())
        same = ~want.isnan()
        assert torch.equal(got[same].view(torch.int32), want[same].view(torch.int32))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mean_of_pieces_equals_torch_mean(world):
    # The server's mean without the reduction kernel: torch's bits, signed zeros too.
    from fscale.transforms._compress.onebit_allreduce import _mean_of

    g = torch.Generator().manual_seed(world)
    pieces = torch.randn(world, 512, generator=g)
    special = torch.tensor([0.0, -0.0, float("inf"), 1e-45, -1e-45])
    pick = torch.randint(0, 5, pieces.shape, generator=g)
    pieces = torch.where(torch.rand(pieces.shape, generator=g) < 0.4, special[pick], pieces)
    pieces[:, :8] = -0.0  # every piece -0.0: torch's sum from +0.0 gives +0.0
    want, got = pieces.mean(dim=0), _mean_of(pieces)
    assert torch.equal(got.isnan(), want.isnan())
    same = ~want.isnan()
    assert torch.equal(got[same].view(torch.int32), want[same].view(torch.int32))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("block", [8, 24, 1 << 18])
@pytest.mark.parametrize("world", [1, 3])
def test_blocked_in_place_compressed_mean_equals_one_pass_by_hand(monkeypatch, block, world, fused):
    # [Note: compressing in blocks on a CPU]: blocks of rows and the error buffers used
    # as the vectors being compressed give the bits of the plain formulation; so does
    # the compiled loop on full blocks ([Note: signs and residual in one CPU loop]).
    from fscale.transforms._compress import onebit_allreduce as ar

    monkeypatch.setattr(ar, "CPU_BLOCK", block)
    monkeypatch.setattr(ar, "FUSED_MIN", 8 if fused else 1 << 62)
    lay = ar.plan_layout(1001, world, max_chunk=16)
    g = torch.Generator().manual_seed(world)
    ews = [torch.zeros(lay.padded) for _ in range(world)]
    ess = [torch.zeros(lay.server) for _ in range(world)]
    ews_ref, ess_ref = [e.clone() for e in ews], [e.clone() for e in ess]
    for _ in range(3):
        xs = [torch.randn(lay.n, generator=g) for _ in range(world)]
        got = ar.simulate_mean(xs, ews, ess, lay)
        want = _mean_by_hand(xs, ews_ref, ess_ref, lay)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(ews + ess, ews_ref + ess_ref, strict=True))


def test_decode_into_leaves_equals_decode():
    # [Note: decoding into the destination]: blocks that split leaves, empty leaves.
    from fscale.transforms._compress import onebit_allreduce as ar

    lay = ar.plan_momentum_layout(1001, 2)
    g = torch.Generator().manual_seed(3)
    gathered = torch.randint(0, 256, (2 * lay.message,), dtype=torch.uint8, generator=g)
    gathered.view(2, -1)[:, lay.server // 8 :] = 120  # codes: scales near 2^-2
    want = ar.decode(gathered, lay)
    into = [torch.empty(n) for n in (5, 0, 600, 1, 395)]
    old = ar.CPU_BLOCK
    try:
        ar.CPU_BLOCK = 96  # 3 rows a block
        assert ar.decode(gathered, lay, into) is into
    finally:
        ar.CPU_BLOCK = old
    assert torch.equal(torch.cat(into), want)
    with pytest.raises(ValueError, match="destinations hold 1000"):
        ar.decode(gathered, lay, [torch.empty(1000)])
