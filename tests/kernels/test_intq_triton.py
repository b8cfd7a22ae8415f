"""The Triton lowering of ``int_linear`` (``intq_triton``) against its reference, under
``TRITON_INTERPRET=1`` on CPU and compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fscale.kernels import intq, intq_triton

needs_triton = pytest.mark.skipif(intq_triton.triton is None, reason="triton is not installed")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


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
        intq_triton.int_linear_triton(x, p, b, split_k=split_k),
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
    got = intq_triton.int_linear_triton(x, p, b, split_k=split_k)
    want = intq.int_linear_reference(x.float(), p, b.float())
    assert got.dtype == torch.float16
    assert _rel(got.float(), want) < 2e-3
    assert torch.equal(got, intq_triton.int_linear_triton(x, p, b, split_k=split_k))


@needs_triton
def test_every_tuning_candidate_matches_reference(monkeypatch):
    """What the first CUDA call times (``candidate_configs``) all compute the product."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = intq.pack_int(_rand(80, 512, seed=1), bits=4, group_size=128)
    x, b = _rand(2, 512, seed=2), _rand(80, seed=3)
    want = intq.int_linear_reference(x, p, b)
    for cfg in intq_triton.candidate_configs(2):
        got = intq_triton.int_linear_triton(x, p, b, config=cfg)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_tuning_streams_copies_of_the_weight(monkeypatch, symmetric):
    """[Note: tuning on streamed weights] for int weights: each small-M candidate runs
    once per copy (equal codes and scales, its own storage) and is kept at the chain's
    time over its length; large-M candidates (dequantize + cuBLAS among them) run on the
    weight itself."""
    from fscale.kernels import _triton

    real = _triton.streamed_copies
    monkeypatch.setattr(
        _triton, "streamed_copies",
        lambda w, nbytes, clone, device: real(w, nbytes, clone, "cuda", l2_bytes=2 * nbytes),
    )  # fmt: skip
    monkeypatch.setattr(_triton, "kernel_time", lambda fn: (fn(), 8.0)[1])
    p = intq.pack_int(_rand(16, 128, seed=1), bits=4, group_size=32, symmetric=symmetric)
    for m, copies in ((2, 4), (64, 1)):
        seen, table, log = [], {}, {}
        cfg = _triton.tune_streamed(
            table, log, ("k", m), lambda m=m: intq_triton.candidate_configs(m),
            lambda w, cfg, seen=seen: seen.append(w), p, "test",
        )  # fmt: skip
        assert cfg == intq_triton.candidate_configs(m)[0] and seen[0] is p
        assert len(seen) == copies * len(intq_triton.candidate_configs(m))
        for w in seen[1:copies]:
            assert w.codes.data_ptr() != p.codes.data_ptr() and torch.equal(w.codes, p.codes)
            assert torch.equal(w.scale, p.scale) and (w.lo is None) == symmetric
            assert symmetric or torch.equal(w.lo, p.lo)
        assert {t for t, _ in log[("k", m)]} == {8.0 / copies}


@needs_triton
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_dequantize_kernel_is_unpack(monkeypatch, bits, symmetric):
    """``dequantize_int_triton`` writes ``unpack_int(p)`` in fp16 (an fp32 multiply-add
    fused or not: at most one fp16 step apart, almost always equal)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = intq.pack_int(_rand(40, 256, seed=bits), bits=bits, group_size=64, symmetric=symmetric)
    got = intq_triton.dequantize_int_triton(p, torch.float16)
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
    y = intq_triton.int_linear_triton(x, p, fused_max_m=4)  # 21 rows: dequantize + F.linear
    torch.testing.assert_close(y, F.linear(x, intq_triton.dequantize_int_triton(p, torch.float16)))
    assert _rel(y.float(), intq.int_linear_reference(x.float(), p)) < 2e-3


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
            got = intq_triton.int_linear_triton(x, p, b, split_k=4)
            want = intq.int_linear_reference(x.double(), p, b.double())
            assert got.dtype == dtype and _rel(got.double(), want) < 1e-2
            if m <= 16:
                assert torch.equal(got, intq_triton.int_linear_triton(x, p, b, split_k=4))
    torch.cuda.synchronize()
    assert not arrival_counters(x.device, 1).any()
