"""The fused decoder kernels (residual add + RMSNorm, RoPE + KV write, SiLU * up)
against their torch references (TRITON_INTERPRET=1 on CPU), and the self-check."""

from __future__ import annotations

import os

import pytest
import torch

from fscale.hw import dispatch
from fscale.kernels import fused_decoder as fd

TRITON = {
    fd.ADD_RMS_NORM: fd.add_rms_norm_triton,
    fd.ROPE_KV_WRITE: fd.rope_kv_write_triton,
    fd.SILU_MUL: fd.silu_mul_triton,
}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fd.triton is None:
        pytest.fail("triton is not installed")


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,N", [(5, 64), (3, 48), (1, 100)])
def test_add_rms_norm(interpret, dtype, T, N):
    g = torch.Generator().manual_seed(T * N)
    x = torch.randn(T, N, generator=g).to(dtype)
    d = torch.randn(T, N, generator=g).to(dtype)
    w = (torch.rand(N, generator=g) + 0.5).to(dtype)
    for delta in (d, None):
        res, h = fd.add_rms_norm_triton(x, delta, w, 1e-5)
        ref_res, ref_h = fd.add_rms_norm_reference(x, delta, w, 1e-5)
        # Exact in fp32; bf16 within an ulp (the interpreter's fp32 -> bf16 cast rounds
        # differently from torch's round-to-nearest-even).
        torch.testing.assert_close(res, ref_res, **_tol(dtype))
        torch.testing.assert_close(h, ref_h, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KVH,D", [(4, 2, 16), (6, 2, 24), (4, 4, 32)])
def test_rope_kv_write(interpret, dtype, H, KVH, D):
    g = torch.Generator().manual_seed(H * D)
    T, bs = 6, 4
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype)
    pos = torch.tensor([0, 3, 9, 1, 2, 30])
    freqs = torch.outer(torch.arange(32, dtype=torch.float32), torch.rand(D // 2, generator=g))
    cos, sin = freqs.cos(), freqs.sin()
    slots = torch.tensor([5, 0, 17, 9, 22, 4], dtype=torch.int32)  # slot 0: a padding row
    caches = []
    for impl in (fd.rope_kv_write_triton, fd.rope_kv_write_reference):
        kc = torch.zeros(7, bs, KVH, D, dtype=dtype)
        vc = torch.zeros_like(kc)
        q = impl(qkv, pos, cos, sin, kc, vc, slots, H=H, KVH=KVH, D=D)
        caches.append((q, kc, vc))
    for a, b in zip(*caches, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,N", [(4, 64), (2, 40)])
def test_silu_mul(interpret, dtype, T, N):
    gu = torch.randn(T, 2 * N, generator=torch.Generator().manual_seed(N)).to(dtype)
    torch.testing.assert_close(fd.silu_mul_triton(gu), fd.silu_mul_reference(gu), **_tol(dtype))


def test_self_check(interpret):
    shapes = dict(hidden=64, H=4, KVH=2, D=16, intermediate=96)
    assert fd.self_check(TRITON, "cpu", torch.float32, **shapes) == []

    def broken(gate_up):
        return fd.silu_mul_reference(gate_up) + 1

    bad = fd.self_check({**TRITON, fd.SILU_MUL: broken}, "cpu", torch.float32, **shapes)
    assert len(bad) == 1 and bad[0].startswith(fd.SILU_MUL)


def test_registered_in_kernel_table():
    for op in fd.OPS:
        names = {r.name for r in dispatch.lowerings(op)}
        assert {f"{op}_reference", f"{op}_triton"} <= names
        assert dispatch.resolve(op, torch.device("cpu"), torch.float32).name == f"{op}_reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_reference_cuda_bf16():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
    shapes = dict(hidden=4096, H=32, KVH=8, D=128, intermediate=14336)
    assert fd.self_check(TRITON, "cuda", torch.bfloat16, T=7, **shapes) == []
