"""Block quantization: the Triton kernels against their torch references, the references
against the maths (error within half a step, exact packing), and the kernel table.

On CPU the kernels run under Triton's interpreter (the ``interpret`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import blockq

needs_triton = pytest.mark.skipif(blockq.triton is None, reason="triton is not installed")
SIZES = [1, 255, 256, 257, 1000, 4099]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _x(n, seed=0, scale=3.0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    x[: min(n, 7)] = 0.0  # a zero run: blocks of zeros have scale 0
    return x


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("bits", blockq.BITS)
@pytest.mark.parametrize("n", SIZES)
def test_reference_is_within_half_a_step(bits, n):
    x = _x(n)
    codes, scales = blockq.quantize_reference(x, bits, 64)
    assert scales.numel() == -(-n // 64)
    assert codes.numel() == blockq.code_bytes(n, bits, 64)
    y = blockq.dequantize_reference(codes, scales, bits, 64, n)
    step = scales.repeat_interleave(64)[:n]
    assert ((y - x).abs() <= step / 2 + 1e-6).all()


def test_reference_codes_by_hand():
    x = torch.tensor([0.0, 7.0, -7.0, 3.4, -3.5, 1.0] + [0.0] * 10)
    codes, scales = blockq.quantize_reference(x, 4, 16)
    assert scales.tolist() == [1.0]
    q = [-4 if v == -3.5 else round(v) for v in x.tolist()]  # half away from zero
    low, high = (codes.int() & 15) - 8, (codes.int() >> 4) - 8
    assert torch.stack((low, high), 1).view(-1).tolist() == q
    codes8, scales8 = blockq.quantize_reference(x, 8, 16)
    assert codes8.dtype == torch.int8 and codes8[1] == 127 and codes8[2] == -127


def test_all_zero_block_and_fp16_scales():
    x = torch.zeros(300)
    codes, scales = blockq.quantize_reference(x, 8, 256, torch.float16)
    assert scales.dtype == torch.float16 and not scales.any() and not codes.any()
    assert not blockq.dequantize_reference(codes, scales, 8, 256, 300).any()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 600),
    bits=st.sampled_from(blockq.BITS),
    block=st.sampled_from([16, 64, 256]),
    scale=st.floats(1e-6, 1e4),
)
def test_reference_round_trip_property(n, bits, block, scale):
    x = _x(n, seed=n, scale=scale)
    codes, scales = blockq.quantize_reference(x, bits, block)
    y = blockq.dequantize_reference(codes, scales, bits, block, n)
    step = scales.repeat_interleave(block)[:n]
    assert ((y - x).abs() <= step * 0.5001 + 1e-30).all()


# ----------------------------------------------------------------------------- Triton


@needs_triton
@pytest.mark.parametrize("bits", blockq.BITS)
@pytest.mark.parametrize("scale_dtype", blockq.SCALE_DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_triton_quantize_equals_reference(interpret, bits, scale_dtype, n):
    x = _x(n, seed=n)
    want = blockq.quantize_reference(x, bits, 256, scale_dtype)
    got = blockq.quantize_triton(x, bits, 256, scale_dtype)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
@pytest.mark.parametrize("bits", blockq.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 257, 4099])
def test_triton_dequantize_equals_reference(interpret, bits, dtype, n):
    codes, scales = blockq.quantize_reference(_x(n, seed=n), bits, 64)
    want = blockq.dequantize_reference(codes, scales, bits, 64, n, dtype)
    got = blockq.dequantize_triton(codes, scales, bits, 64, n, dtype)
    if dtype == torch.bfloat16:
        # The interpreter's fp32 -> bf16 cast truncates (DESIGN section 7): one ulp.
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


@needs_triton
def test_triton_takes_bf16_input(interpret):
    x = _x(1000).bfloat16()
    got, want = blockq.quantize_triton(x, 4, 128), blockq.quantize_reference(x, 4, 128)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- table


def test_registered_in_the_kernel_table():
    for op in (blockq.QUANTIZE, blockq.DEQUANTIZE):
        rules = dispatch.lowerings(op)
        assert any(r.is_reference for r in rules)
        assert dispatch.resolve(op, torch.device("cpu")).is_reference
        if blockq.triton is not None:
            assert any(r.device == "cuda" for r in rules)


def test_entry_points_round_trip_and_check():
    x = _x(500)
    codes, scales = blockq.quantize(x, bits=4, block=128)
    y = blockq.dequantize(codes, scales, bits=4, block=128, numel=500, dtype=torch.float64)
    assert y.dtype == torch.float64 and y.shape == (500,)
    for bad in (dict(bits=2), dict(block=100), dict(block=8), dict(scale_dtype=torch.bfloat16)):
        with pytest.raises(ValueError):
            blockq.quantize(x, **bad)
