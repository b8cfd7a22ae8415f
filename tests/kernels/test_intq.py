"""ZeroQuant kernels: group-wise INT8/INT4 bounds, the Triton weight-only linear against
its reference (under ``TRITON_INTERPRET=1``), W8A8 and FP8 against float, LoRC."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import intq
from fscale.kernels.lorc import lorc_factors, lorc_linear

needs_triton = pytest.mark.skipif(intq.triton is None, reason="triton is not installed")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    groups=st.integers(1, 3),
    group_size=st.sampled_from(intq.GROUP_SIZES),
    bits=st.sampled_from((8, 4)),
    symmetric=st.booleans(),
    scale=st.sampled_from((1e-3, 1.0, 50.0)),
    seed=st.integers(0, 2**16),
)
def test_groupwise_error_within_half_a_step(n, groups, group_size, bits, symmetric, scale, seed):
    w = _rand(n, groups * group_size, seed=seed, scale=scale)
    w[0, :3] = 0.0  # exact zeros and an all-equal run must not break the maths
    p = intq.pack_int(w, bits=bits, group_size=group_size, symmetric=symmetric)
    deq = intq.unpack_int(p)
    step = p.scale.repeat_interleave(group_size, 1)
    # Half a step of the group's scale, plus float rounding of q * s (+ lo).
    slack = 1e-6 * (w.abs() + step)
    assert ((w - deq).abs() <= step / 2 + slack).all()
    q = intq.int_codes(p)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert q.min() >= lo and q.max() <= hi and (q == q.round()).all()
    expect_bytes = n * groups * group_size * bits // 8 + (1 if symmetric else 2) * 4 * n * groups
    assert p.nbytes == expect_bytes


def test_groupwise_is_idempotent():
    # A weight already on the grid comes back unchanged (the round trip is exact).
    p = intq.pack_int(_rand(16, 128), bits=4, group_size=32)
    deq = intq.unpack_int(p)
    again = intq.unpack_int(intq.pack_int(deq, bits=4, group_size=32))
    torch.testing.assert_close(again, deq, rtol=1e-6, atol=1e-7)


def test_int4_nibble_layout():
    w = torch.tensor([[-7.0, 7.0, 1.0, -1.0] * 8])  # absmax 7 -> scale 1
    p = intq.pack_int(w, bits=4, group_size=32)
    # element 2j in the low nibble, 2j + 1 in the high one, biased by 8
    assert p.codes[0, 0].item() == (-7 + 8) | ((7 + 8) << 4)
    assert p.codes[0, 1].item() == (1 + 8) | ((-1 + 8) << 4)
    torch.testing.assert_close(intq.unpack_int(p), w)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_linear_reference_is_dequantized_linear(bits, symmetric):
    w, x, b = _rand(48, 128, seed=1), _rand(3, 5, 128, seed=2), _rand(48, seed=3)
    p = intq.pack_int(w, bits=bits, group_size=64, symmetric=symmetric)
    y = intq.int_linear(x, p, b)  # the reference on CPU
    torch.testing.assert_close(y, F.linear(x, intq.unpack_int(p), b))
    # Stated accuracy vs the float weight (Gaussian data): int8 < 1%, int4 < 12%.
    assert _rel(y - b, F.linear(x, w)) < (0.01 if bits == 8 else 0.12)


@needs_triton
@pytest.mark.parametrize(
    "bits,group_size,symmetric,m,n,k,bias,split_k",
    [
        (8, 32, True, 1, 40, 64, True, None),
        (8, 128, False, 17, 64, 256, False, 1),
        (4, 64, True, 5, 70, 128, True, 2),
        (4, 32, False, 33, 24, 96, True, None),
        (4, 128, True, 2, 130, 256, False, None),
        (8, 64, False, 64, 16, 128, True, 1),
    ],
)
def test_int_linear_triton_matches_reference(
    monkeypatch, bits, group_size, symmetric, m, n, k, bias, split_k
):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, x = _rand(n, k, seed=m), _rand(m, k, seed=n)
    b = _rand(n, seed=k) if bias else None
    p = intq.pack_int(w, bits=bits, group_size=group_size, symmetric=symmetric)
    torch.testing.assert_close(
        intq.int_linear_triton(x, p, b, split_k=split_k),
        intq.int_linear_reference(x, p, b),
        rtol=1e-4,
        atol=1e-4,
    )


@needs_triton
@pytest.mark.parametrize(
    "bits,symmetric,split_k,m",
    [(4, True, 4, 3), (4, False, 1, 20), (8, True, 2, 1), (8, False, 4, 3)],
)
def test_int_linear_triton_fp16_codes_via_the_mantissa(monkeypatch, bits, symmetric, split_k, m):
    """fp16 activations take the kernel's OR-into-the-mantissa conversion of the codes
    (exact) and the scale applied to the product (16- and 32-row tiles); split-K sums
    the partials in one kernel for 16-row tiles: the result is the reference's to fp16
    rounding, and the same bits on a second launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, x = _rand(48, 512, seed=bits), _rand(m, 512, seed=7).half()
    b = _rand(48, seed=8).half()
    p = intq.pack_int(w, bits=bits, group_size=64, symmetric=symmetric)
    got = intq.int_linear_triton(x, p, b, split_k=split_k)
    want = intq.int_linear_reference(x.float(), p, b.float())
    assert got.dtype == torch.float16
    assert _rel(got.float(), want) < 2e-3
    assert torch.equal(got, intq.int_linear_triton(x, p, b, split_k=split_k))


@needs_triton
def test_every_tuning_candidate_matches_reference(monkeypatch):
    """What the first CUDA call times (``candidate_configs``) all compute the product."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = intq.pack_int(_rand(80, 512, seed=1), bits=4, group_size=128)
    x, b = _rand(2, 512, seed=2), _rand(80, seed=3)
    want = intq.int_linear_reference(x, p, b)
    for cfg in intq.candidate_configs(2):
        got = intq.int_linear_triton(x, p, b, config=cfg)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_dequantize_kernel_is_unpack(monkeypatch, bits, symmetric):
    """``dequantize_int_triton`` writes ``unpack_int(p)`` in fp16 (an fp32 multiply-add
    fused or not: at most one fp16 step apart, almost always equal)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = intq.pack_int(_rand(40, 256, seed=bits), bits=bits, group_size=64, symmetric=symmetric)
    got = intq.dequantize_int_triton(p, torch.float16)
    want = intq.unpack_int(p).half()
    assert got.shape == want.shape and got.dtype == torch.float16
    steps = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3) * 1024
    assert steps.max() <= 1.0 and (got == want).float().mean() > 0.99


@needs_triton
def test_int_linear_triton_large_m_falls_back(monkeypatch):
    """Above ``fused_max_m`` rows (or, untuned, from DEQUANT_MIN_M) fp16/bf16 x takes
    the dequantize kernel and F.linear."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = intq.pack_int(_rand(8, 32), bits=4, group_size=32)
    x = _rand(3, 7, 32).half()
    y = intq.int_linear_triton(x, p, fused_max_m=4)  # 21 rows: dequantize + F.linear
    torch.testing.assert_close(y, F.linear(x, intq.dequantize_int_triton(p, torch.float16)))
    assert _rel(y.float(), intq.int_linear_reference(x.float(), p)) < 2e-3


def test_w8a8_int_mm_matches_reference_and_float():
    w, x, b = _rand(64, 256, seed=4), _rand(2, 9, 256, seed=5), _rand(64, seed=6)
    p = intq.pack_w8a8(w)
    ref = intq.w8a8_linear_reference(x, p, b)
    torch.testing.assert_close(intq.w8a8_linear_int_mm(x, p, b), ref, rtol=1e-5, atol=1e-5)
    # per-token int8 x per-channel int8: < 2% relative error on Gaussian data
    assert _rel(ref - b, F.linear(x, w)) < 0.02
    assert dispatch.resolve(intq.W8A8_OP, x).name == "w8a8_linear_reference"  # CPU


def test_w8a8_reference_is_the_integer_product():
    w, x = _rand(8, 2500, seed=7), _rand(4, 2500, seed=8)  # K > 1024: chunked fp32 sums
    p = intq.pack_w8a8(w)
    xq, xs = intq.quantize_tokens(x)
    exact = (xq.long() @ p.codes.long().t()).double() * xs.double()[:, None] * p.scale.double()
    torch.testing.assert_close(intq.w8a8_linear_reference(x, p), exact.float())


def test_fp8_reference_accuracy_and_codes():
    w, x = _rand(32, 64, seed=9), _rand(6, 64, seed=10)
    p = intq.pack_fp8(w)
    assert p.codes.dtype == torch.float8_e4m3fn and p.nbytes == 32 * 64 + 32 * 4
    assert p.codes.float().abs().amax(1).eq(448.0).all()  # each row's absmax maps to 448
    # e4m3 on both sides (3 mantissa bits): < 6% relative error on Gaussian data
    assert _rel(intq.fp8_linear(x, p), F.linear(x, w)) < 0.06
    assert _rel(intq.unpack_fp8(p), w) < 0.04
    assert dispatch.resolve(intq.FP8_OP, x).name == "fp8_linear_reference"


def test_errors():
    w = _rand(4, 96)
    with pytest.raises(ValueError, match="K=96 .* not a multiple of group_size=128.*32"):
        intq.pack_int(w, bits=4, group_size=128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        intq.pack_int(w, bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        intq.pack_int(w, bits=3, group_size=32)
    w[1, 2] = float("nan")
    for pack in (intq.pack_w8a8, intq.pack_fp8):
        with pytest.raises(ValueError, match="NaN"):
            pack(w)
    with pytest.raises(ValueError, match="2-D"):
        intq.pack_w8a8(torch.zeros(3))


def test_lorc_reduces_error():
    w, x = _rand(64, 128, seed=11), _rand(16, 128, seed=12)
    p = intq.pack_int(w, bits=4, group_size=128)
    w_hat = intq.unpack_int(p)
    errs = []
    for r in (1, 4, 16):
        c = lorc_factors(w, w_hat, r, dtype=torch.float32)
        assert c.us.shape == (64, r) and c.v.shape == (r, 128)
        errs.append(_rel(F.linear(x, w_hat) + lorc_linear(x, c), F.linear(x, w)))
    base = _rel(F.linear(x, w_hat), F.linear(x, w))
    assert base > errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lorc_factors(w, w_hat, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_cuda_int_kernel_matches_reference(bits, symmetric):
    """Compiled kernel, fp16 and bf16 x (the mantissa conversion, and bf16 int8's plain
    one), 16-row tiles with one-kernel split-K (bit-identical repeats, counters left at
    zero), 32/64-row tiles with atomic split-K, and from DEQUANT_MIN_M rows the
    dequantize kernel (bf16 rounded to nearest) and cuBLAS."""
    from fscale.kernels._triton import arrival_counters

    gen = torch.Generator(device="cuda").manual_seed(bits)
    w = torch.randn(384, 1024, generator=gen, device="cuda")
    p = intq.pack_int(w, bits=bits, group_size=128, symmetric=symmetric)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 20, 100, 300):  # 300 rows: dequantize kernel + cuBLAS
            x = torch.randn(m, 1024, generator=gen, device="cuda").to(dtype)
            b = torch.randn(384, generator=gen, device="cuda").to(dtype)
            got = intq.int_linear_triton(x, p, b, split_k=4)
            want = intq.int_linear_reference(x.double(), p, b.double())
            assert got.dtype == dtype and _rel(got.double(), want) < 1e-2
            if m <= 16:
                assert torch.equal(got, intq.int_linear_triton(x, p, b, split_k=4))
    torch.cuda.synchronize()
    assert not arrival_counters(x.device, 1).any()
