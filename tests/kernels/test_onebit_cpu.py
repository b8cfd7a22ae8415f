"""The 1-bit C loops against their torch references, bit for bit
([Note: the 1-bit CPU loops in C] in fscale/kernels/onebit_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from fscale.kernels import onebit, onebit_cpu

SPECIAL = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40])


@pytest.fixture
def lib():
    got = onebit_cpu.loops()
    if got is None:
        pytest.skip("no C compiler for the 1-bit CPU loops")
    return got


def _special(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    pick = torch.randint(0, len(SPECIAL), x.shape, generator=g)
    return torch.where(torch.rand(x.shape, generator=g) < 0.2, SPECIAL[pick], x)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN payloads, -0.0 too


@pytest.mark.parametrize("n", [1, 7, 17, 1000, 4099])
@pytest.mark.parametrize("w", [0.1, 0.75])
def test_lerp_addcdiv_equals_lerp_then_addcdiv(lib, n, w):
    g = torch.Generator().manual_seed(n)
    m, grad, y = (_special(torch.randn(n, generator=g), g) for _ in range(3))
    d = torch.rand(n, generator=g) + 1e-3
    d[: min(n, 2)] = torch.tensor([0.0, float("inf")])[: min(n, 2)]
    want = [m.clone(), grad, d, y.clone()]
    got = [m.clone(), grad, d, y.clone()]
    onebit_cpu.lerp_addcdiv_reference(*want, w)
    onebit_cpu.lerp_addcdiv_(*got, w)
    assert _same(got[0], want[0]) and _same(got[3], want[3])


@pytest.mark.parametrize("start, n", [(0, 1), (3, 29), (77, 1000), (0, 2048), (5, 3000)])
@pytest.mark.parametrize("decay", [False, True])
def test_decode_step_equals_unpack_then_step(lib, start, n, decay):
    # Elements start .. start + n of a packed vector (a leaf that begins mid-row), a
    # zero scale (-0.0 on clear bits), dead positions at both ends and inside.
    g = torch.Generator().manual_seed(start + n)
    chunk = 32
    rows = -(-(start + n) // chunk)
    bits = torch.randint(0, 256, (rows, chunk // 8), dtype=torch.uint8, generator=g)
    scales = torch.rand(rows, generator=g)
    scales[0] = 0.0
    vals = onebit.unpack_reference(bits, scales).view(-1)[start : start + n].clone()
    d = torch.rand(n, generator=g) + 1e-3
    p = _special(torch.randn(n, generator=g), g)
    m = torch.randn(n, generator=g)
    dead = torch.unique(
        torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (5,), generator=g)])
    )
    shrink = 0.999 if decay else None
    want_m, want_p, got_m, got_p = m.clone(), p.clone(), m.clone(), p.clone()
    onebit_cpu.decode_step_reference(
        vals, d, want_m, want_p, step=1e-3 / 0.1, shrink=shrink, dead=dead
    )
    lib.decode_step(
        bits.data_ptr(), scales.data_ptr(), chunk, start, n, d.data_ptr(), got_m.data_ptr(),
        got_p.data_ptr(), 1e-3 / 0.1, shrink or 1.0, int(decay), dead.data_ptr(), dead.numel(),
    )  # fmt: skip
    assert _same(got_m, want_m) and _same(got_p, want_p)


@pytest.mark.parametrize("rows, chunk", [(1, 8), (3, 24), (65, 32), (5, 136)])
def test_pack_residual_and_unpack_any_size(rows, chunk):
    # Sizes the compiled loops never took (partial blocks, chunks not a multiple of 16).
    if onebit_cpu.loops() is None:
        pytest.skip("no C compiler for the 1-bit CPU loops")
    g = torch.Generator().manual_seed(rows * chunk)
    y = _special(torch.randn(rows, chunk, generator=g), g)
    scales = torch.rand(rows, generator=g)
    scales[0] = 0.0
    want, got = y.clone(), y.clone()
    want_bits = onebit.pack_residual_reference(want, scales)
    assert torch.equal(onebit.pack_residual_(got, scales), want_bits) and _same(got, want)
    assert _same(onebit.unpack_(want_bits, scales), onebit.unpack_reference(want_bits, scales))


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("FSCALE_ONEBIT_COMPILE", "0")
    assert onebit_cpu.loops() is None
