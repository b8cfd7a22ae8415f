"""The multi-tensor cast kernel against ``Tensor.copy_`` (bit for bit), and ``cast_all``.

On CPU the Triton lowering runs under the interpreter (the ``interpret`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.kernels import cast

needs_triton = pytest.mark.skipif(cast.triton is None, reason="triton is not installed")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SPECIAL = [float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, 1e-45, 0.0, -0.0,
           65504.0, 70000.0, 1e-7, 6e-8, 1.00390625, 1.01171875]  # fmt: skip


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _sources(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, offset in sizes:
        # Wide range: exponents where fp16 overflows or goes subnormal, ties at bf16.
        x = torch.randn(n + offset, generator=gen) * 2.0 ** torch.randint(-30, 30, (n + offset,))
        out.append(x.to(dtype)[offset:])  # offset > 0: a misaligned view
    out.append(torch.tensor(SPECIAL).to(dtype))
    return out


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    src=st.sampled_from(FLOATS),
    dst=st.sampled_from(FLOATS),
    sizes=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3)), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_triton_cast_equals_copy(src, dst, sizes, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        srcs = _sources(sizes, src, seed)
        got = [torch.full(s.shape, 7.0, dtype=dst) for s in srcs]  # never-written shows
        cast.cast_into_triton_(got, srcs)
    for g, s in zip(got, srcs, strict=True):
        _same(g, s.to(dst))


@needs_triton
def test_triton_cast_refuses_what_it_cannot_take(interpret):
    with pytest.raises(ValueError, match="equal size"):
        cast.cast_into_triton_([torch.empty(3)], [torch.empty(4)])
    with pytest.raises(ValueError, match="contiguous"):
        cast.cast_into_triton_([torch.empty(2, 3)], [torch.empty(3, 2).t()])
    with pytest.raises(ValueError, match="destinations"):
        cast.cast_into_triton_([], [torch.empty(3)])


def test_cast_all_matches_to_for_every_kind_of_leaf():
    t = torch.randn(4, 6)
    leaves = [t, None, t.to(torch.bfloat16), t.t(), torch.arange(3), torch.randn(0)]
    got = cast.cast_all(leaves, torch.bfloat16)
    assert got[1] is None
    assert got[2] is leaves[2]  # already the dtype: returned as is, as .to does
    for g, x in zip(got, leaves, strict=True):
        if x is not None:
            _same(g, x.to(torch.bfloat16))


@needs_triton
def test_cast_all_through_the_triton_lowering(interpret, monkeypatch):
    # CPU tensors resolve to the reference; force the Triton lowering to check the
    # allocation and the split between kernel and fallback.
    monkeypatch.setattr(
        cast.dispatch, "resolve", lambda op, device, dtype=None: _Lowering(cast.cast_into_triton_)
    )
    leaves = [torch.randn(5, 7), torch.randn(6, 5).t(), torch.randn(33).to(torch.float16)]
    for g, x in zip(cast.cast_all(leaves, torch.bfloat16), leaves, strict=True):
        _same(g, x.to(torch.bfloat16))


class _Lowering:
    def __init__(self, impl):
        self.impl = impl


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_cuda_cast_equals_to(src, dst):
    srcs = [s.cuda() for s in _sources([(1, 0), (4099, 1), (1 << 20, 0), (77, 3)], src, seed=3)]
    assert cast.dispatch.resolve(cast.OP, srcs[0].device, dst).name == "cast_into_triton"
    for g, s in zip(cast.cast_all(srcs, dst), srcs, strict=True):
        _same(g, s.to(dst))
