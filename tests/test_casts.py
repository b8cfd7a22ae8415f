"""fscale.casts: multi-tensor casts equal ``.to`` bit for bit (CPU, and CUDA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.casts import cast_all, cast_each

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SPECIAL = [float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, 1e-45, 0.0, -0.0,
           65504.0, 70000.0, 1e-7, 6e-8, 1.00390625, 1.01171875]  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _sources(sizes, dtypes, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, dtype in zip(sizes, dtypes, strict=False):
        # Wide exponents: fp16 overflow and subnormals, bf16 rounding ties.
        x = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-30, 30, (n,), generator=gen)
        out.append(x.to(device, dtype))
    out.append(torch.tensor(SPECIAL, device=device).to(dtypes[0]))
    return out


@settings(max_examples=15, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from(FLOATS), min_size=1, max_size=6),
    target=st.sampled_from(FLOATS),
    sizes=st.lists(st.integers(0, 3000), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_cast_all_equals_to(dtypes, target, sizes, seed):
    srcs = _sources(sizes, dtypes, seed)
    srcs += [None, torch.randn(6, 4).t(), torch.arange(5)]  # none, non-contiguous, integer
    got = cast_all(srcs, target)
    for g, s in zip(got, srcs, strict=True):
        if s is None:
            assert g is None
            continue
        _same(g, s.to(target))
        if s.dtype == target:
            assert g is s  # as .to: no copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_cuda_casts_equal_to(src, dst):
    srcs = _sources([1, 4099, 1 << 20, 77], [src] * 4, seed=3, device="cuda")
    for g, s in zip(cast_all(srcs, dst), srcs, strict=True):
        _same(g, s.to(dst))


def test_cast_each_sends_each_tensor_to_its_own_dtype():
    srcs = _sources([5, 9, 3], [torch.bfloat16, torch.float16, torch.float32], seed=2)[:3]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16]
    got = cast_each([*srcs[:2], None, srcs[2]], dtypes)
    assert got[2] is None
    for g, s, d in zip(
        [got[0], got[1], got[3]], srcs, [dtypes[0], dtypes[1], dtypes[3]], strict=True
    ):
        _same(g, s.to(d))
