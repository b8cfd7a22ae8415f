"""The one-row GEMV (fscale/kernels/gemv.py) against F.linear (TRITON_INTERPRET=1 on
CPU): drawn shapes with ragged K chunks and biases, the products it hands back to
F.linear, its self-check, and its place in the kernel table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import _triton as triton_helpers
from fscale.kernels import gemv
from fscale.kernels._triton import pdl
from fscale.transforms.quantize import quantize


@pytest.fixture
def interpret(monkeypatch):
    if gemv.triton is None:
        pytest.fail("triton is not installed")


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    N=st.integers(1, 70),
    K=st.integers(1, 600),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    config=st.sampled_from([None, (2, 128, 4, 1), (16, 512, 8, 3), (4, 64, 4, 2)]),
)
def test_equals_f_linear(interpret, N, K, bias, dtype, config):
    g = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(1, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = gemv.gemv_launch(x, w, b, config=config)
    assert y.shape == (1, N) and y.dtype == dtype
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    # fp32: two orders of K fp32 sums; bf16: the output's rounding (one ulp).
    tol = (
        dict(atol=1e-4 * K**0.5, rtol=1e-5)
        if dtype == torch.float32
        else dict(atol=1e-2, rtol=8e-3)
    )
    torch.testing.assert_close(y.float(), want, **tol)
    assert torch.equal(gemv.gemv_launch(x, w, b, config=config), y)  # same bits again


def test_other_products_go_to_f_linear(interpret):
    x2, w = torch.randn(2, 64), torch.randn(48, 64)
    assert not gemv.covers(x2, w)
    assert torch.equal(gemv.gemv_triton(x2, w), F.linear(x2, w))
    x1 = torch.randn(1, 64)
    assert gemv.covers(x1, w) and gemv.covers(x1, torch.nn.Parameter(w))
    assert not gemv.covers(x1, w.t().contiguous().t())  # rows not contiguous
    assert not gemv.covers(x1.double(), w.double())
    x_wide, w_wide = torch.randn(1, gemv.MAX_K + 1), torch.randn(3, gemv.MAX_K + 1)
    assert not gemv.covers(x_wide, w_wide)  # K > MAX_K: unmeasured, cuBLAS
    q = quantize({"w": torch.randn(64, 128)}, "int8", group_size=64, select=lambda n, t: True)["w"]
    x = torch.randn(1, 128)
    assert not gemv.covers(x, q)
    assert torch.equal(gemv.gemv_triton(x, q), F.linear(x, q))


def test_self_check(interpret):
    assert gemv.self_check(gemv.gemv_triton, torch.device("cpu"), torch.float32, 96) is None

    def off_by_one(x, w, b=None):
        return F.linear(x, w, b) + 1

    def raises(x, w, b=None):
        raise RuntimeError("no kernel image")

    assert "relative error" in gemv.self_check(off_by_one, "cpu", torch.float32, 96)
    assert "no kernel image" in gemv.self_check(raises, "cpu", torch.float32, 96)


def test_kernel_table():
    assert dispatch.resolve(gemv.OP, torch.device("cpu"), torch.float32).is_reference
    names = {r.name for r in dispatch._TABLE[gemv.OP]}
    assert names == {"gemv_reference", "gemv_triton"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_on_cuda_equals_f_linear():
    """The compiled kernel at the 8B Llama's shapes (each K and config branch)."""
    dev = torch.device("cuda")
    assert dispatch.resolve(gemv.OP, dev, torch.bfloat16).name == "gemv_triton"
    g = torch.Generator(device="cpu").manual_seed(0)
    for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1000, 4100)]:
        x = torch.randn(1, K, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(N, K, generator=g) * 0.02).to(dev, torch.bfloat16)
        y = gemv.gemv_launch(x, w).float()
        want = F.linear(x.float(), w.float())
        assert ((y - want).norm() / want.norm()).item() < 4e-3, (N, K)


def test_pdl_only_where_it_can_run(monkeypatch):
    """Programmatic dependent launch: CUDA only, never under the interpreter."""
    assert not pdl(torch.device("cpu"))
    monkeypatch.setattr(triton_helpers, "interpreting", lambda: True)
    assert not pdl(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch):
    """Kernels launched with PDL wait for their inputs: a captured chain in which every
    launch reads the one before gives the bits of the same chain launched without it."""
    from fscale.kernels import fused_decoder as fd

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    ws = [(torch.randn(4096, 4096, generator=g) * 0.02).to(dev, torch.bfloat16) for _ in range(4)]
    norm_w = torch.rand(4096, generator=g).to(dev, torch.bfloat16)
    x0 = torch.randn(1, 4096, generator=g).to(dev, torch.bfloat16)

    def chain():
        res, x = x0, None
        for w in ws:
            res, h = fd.add_rms_norm_triton(res, x, norm_w, 1e-6)
            x = gemv.gemv_launch(h, w)
        return x

    captured_chain_ignores_pdl(chain, monkeypatch)


def captured_chain_ignores_pdl(chain, monkeypatch) -> None:
    """``chain()`` captured in a CUDA graph gives the bits it gives eagerly, with PDL
    off (``FSCALE_PDL=0``) and on, and the same bits both ways."""
    dev = torch.device("cuda")
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FSCALE_PDL", flag)
        assert pdl(dev) == (flag == "1" and torch.cuda.get_device_capability() >= (9, 0))
        eager = chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager), flag
        outs[flag] = y.clone()
    assert torch.equal(outs["0"], outs["1"])
