"""ZeroQuant formats: group-wise INT8/INT4 bounds and layout, the references of
``int_linear``, W8A8 and FP8 against float. The Triton lowering is tested in
test_intq_triton.py, the registration in test_lowerings.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import intq


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


@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_rowwise_pack_with_the_whole_rows_absmax_gives_the_slice_of_the_whole(fmt):
    """Like ``fpx.pack(absmax=)``: a K slice packed with the whole rows' absmax
    dequantizes to that slice of the whole weight's packing; a too-small one raises."""
    pack, unpack = {
        "w8a8": (intq.pack_w8a8, intq.unpack_w8a8),
        "fp8": (intq.pack_fp8, intq.unpack_fp8),
    }[fmt]
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[2, 50] = 30.0  # row 2's absmax is in the second half only
    whole, absmax = unpack(pack(w)), w.abs().amax(dim=1)
    for lo in (0, 32):
        assert torch.equal(unpack(pack(w[:, lo : lo + 32], absmax=absmax)), whole[:, lo : lo + 32])
    assert not torch.equal(unpack(pack(w[:, :32])), whole[:, :32])
    with pytest.raises(ValueError, match="at least that row's own absmax"):
        pack(w, absmax=absmax / 2)
