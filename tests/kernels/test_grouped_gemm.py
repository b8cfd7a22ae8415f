"""Grouped GEMM: every lowering against a loop written here, forward and backward,
with hypothesis-drawn group sizes (empty groups included), and the kernel table.

The Triton kernels run under Triton's interpreter in fp32 at small sizes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import grouped_gemm as gg
from fscale.kernels import grouped_gemm_triton as ggt

needs_triton = pytest.mark.skipif(ggt.triton is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _by_hand(x, w, counts):
    """y row by row: row i belongs to the group whose range holds it."""
    y, row = [], 0
    for g, c in enumerate(counts.tolist()):
        for _ in range(c):
            y.append(x[row] @ w[g])
            row += 1
    return torch.stack(y) if y else x.new_zeros(0, w.shape[2])


def _case(counts, k, m, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(counts.sum()), k, generator=gen).to(dtype)
    w = torch.randn(len(counts), k, m, generator=gen).to(dtype)
    return x, w, counts


def _grads(x, w, counts, fn):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, counts)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def test_reference_equals_a_loop_by_hand():
    x, w, counts = _case([3, 0, 5, 1], 6, 7)
    y = gg.grouped_mm(x, w, counts, impl="reference")
    torch.testing.assert_close(y, _by_hand(x, w, counts))


def test_backward_equals_autograd_of_the_loop_and_zero_for_empty_groups():
    x, w, counts = _case([4, 0, 6, 0], 5, 3)
    y, dx, dw = _grads(x, w, counts, lambda a, b, c: gg.grouped_mm(a, b, c, impl="reference"))
    y2, dx2, dw2 = _grads(x, w, counts, _by_hand)
    torch.testing.assert_close((y, dx, dw), (y2, dx2, dw2))
    assert not dw[1].any() and not dw[3].any()


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    k=st.integers(1, 40),
    m=st.integers(1, 40),
)
def test_triton_equals_reference_forward_and_backward(counts, k, m):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        x, w, c = _case(counts, k, m, seed=sum(counts))
        got = _grads(x, w, c, lambda a, b, cc: gg.grouped_mm(a, b, cc, impl="triton"))
        want = _grads(x, w, c, lambda a, b, cc: gg.grouped_mm(a, b, cc, impl="reference"))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_all_groups_empty_and_transposed_weights(interpret):
    x, w, counts = _case([0, 0, 0], 8, 8)
    dw = ggt.grouped_mm_wgrad_triton(x, x.new_zeros(0, 8), gg.offsets(counts))
    assert dw.shape == (3, 8, 8) and not dw.any()
    assert gg.grouped_mm(x, w, counts, impl="triton").shape == (0, 8)
    x, w, counts = _case([20, 3, 0, 17], 16, 24)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # the backward's w^T layout
    torch.testing.assert_close(
        ggt.grouped_mm_triton(x, wt, gg.offsets(counts)), _by_hand(x, w, counts)
    )


def test_tile_table_covers_every_row_once():
    counts = torch.tensor([5, 0, 17, 1, 0, 40])
    groups, starts, ends = ggt.tile_table(gg.offsets(counts), int(counts.sum()), 16)
    owner = torch.full((int(counts.sum()),), -1)
    for g, s, e in zip(groups.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if g >= 0:
            rows = torch.arange(s, min(s + 16, e))
            assert (owner[rows] == -1).all()
            owner[rows] = g
    assert owner.tolist() == torch.repeat_interleave(torch.arange(6), counts).tolist()


@pytest.mark.skipif(not gg.HAS_TORCH_GROUPED_MM, reason="torch has no _grouped_mm")
def test_torch_grouped_mm_lowering_in_bf16():
    # torch 2.13's CPU build runs _grouped_mm too, so the lowering is checked here.
    x, w, counts = _case([5, 0, 4, 4], 16, 32, dtype=torch.bfloat16)  # N=13: any row count
    try:
        got = _grads(x, w, counts, lambda a, b, c: gg.grouped_mm(a, b, c, impl="torch"))
    except RuntimeError as e:  # an older CPU build without the kernel
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {e}")
    want = _grads(x.float(), w.float(), counts, _by_hand)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, atol=0.5, rtol=2e-2)


def test_kernel_table_rules():
    rules = {r.name: r for r in dispatch.lowerings(gg.MM) + dispatch.lowerings(gg.WGRAD)}
    assert rules["grouped_mm_reference"].is_reference
    assert rules["grouped_mm_wgrad_reference"].is_reference
    if gg.HAS_TORCH_GROUPED_MM:
        r = rules["grouped_mm_torch"]
        assert (r.device, r.min_capability, r.dtypes) == ("cuda", (9, 0), {torch.bfloat16})
    if ggt.triton is not None:
        assert rules["grouped_mm_triton"].device == "cuda"
    cpu = dispatch.resolve(gg.MM, torch.zeros(1))
    assert cpu.name == "grouped_mm_reference"


def test_bad_inputs_name_the_fix():
    x, w, counts = _case([2, 2], 4, 4)
    with pytest.raises(ValueError, match="one row count per group"):
        gg.grouped_mm(x, w, counts[:1])
    with pytest.raises(ValueError, match="K"):
        gg.grouped_mm(x[:, :3], w, counts)
    with pytest.raises(ValueError, match="cast"):
        gg.grouped_mm(x.double(), w, counts)
    with pytest.raises(ValueError, match="impl"):
        gg.grouped_mm(x, w, counts, impl="cutlass")


def test_under_checkpoint():
    x, w, counts = _case([3, 4, 0, 2], 5, 6)
    fn = lambda a, b, c: torch.utils.checkpoint.checkpoint(  # noqa: E731
        gg.grouped_mm, a, b, c, use_reentrant=False
    )
    torch.testing.assert_close(_grads(x, w, counts, fn), _grads(x, w, counts, _by_hand))


@needs_triton
def test_triton_in_fp16(interpret):
    # fp16 tl.dot is right in the interpreter (bf16 is not), so the half path is checked here.
    x, w, counts = _case([20, 3, 0, 17], 32, 48)
    want = _by_hand(x, w, counts)
    got = gg.grouped_mm(x.half(), w.half(), counts, impl="triton").float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-3)


# ----------------------------------------------------------------------------- MoE gather-sum


def _exact(dtype):
    """Exact in fp32; in bf16 Triton's interpreter truncates fp32 -> bf16 casts (a GPU
    rounds to nearest even, as torch does), so allow those ulps there."""
    return {"atol": 0, "rtol": 0} if dtype == torch.float32 else {"atol": 2**-5, "rtol": 2**-6}


def _pos_case(T, k, drop, seed=0):
    """A random slot -> sorted-row map (``Routing.pos``), ``drop`` slots dropped (-1)."""
    gen = torch.Generator().manual_seed(seed)
    slot = torch.randperm(k * T, generator=gen)[: k * T - drop]  # sorted row n's slot
    pos = torch.full((k * T,), -1, dtype=torch.int64)
    pos[slot] = torch.arange(slot.numel())
    return slot, pos


@needs_triton
@pytest.mark.parametrize("k,drop", [(1, 0), (2, 0), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_triton_equals_the_scatter_sum(interpret, k, drop, dtype):
    T, D = 13, 40
    slot, pos = _pos_case(T, k, drop)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(slot.numel(), D, generator=gen).to(dtype)
    gate = torch.rand(slot.numel(), generator=gen)
    for g in (None, gate):
        w = rows if g is None else rows * g.to(dtype).unsqueeze(1)
        want = w.new_zeros(k * T, D).index_copy(0, slot, w).view(k, T, D).sum(0)
        got = ggt.gather_sum_triton(rows, pos, k, g)
        torch.testing.assert_close(got, want, **_exact(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_backward_triton_equals_autograd(interpret, dtype):
    T, k, D = 11, 2, 40
    slot, _ = _pos_case(T, k, 3)
    token = slot % T
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(slot.numel(), D, generator=gen).to(dtype)
    gate = torch.rand(slot.numel(), generator=gen)
    dy = torch.randn(T, D, generator=gen).to(dtype)
    drows, dgate = ggt.combine_backward_triton(dy, rows, gate, token)
    g = dy[token]
    torch.testing.assert_close(drows, g * gate.to(dtype).unsqueeze(1), **_exact(dtype))
    want = (g.double() * rows.double()).sum(1).float()
    torch.testing.assert_close(dgate, want, atol=1e-5, rtol=1e-5)
