"""FPx weights with e4m3 activations (``fpx_a8``): the kernels against the references.

The weight and row kernels run under Triton's interpreter on CPU (the ``interpret``
fixture) and must give the references' exact bits; the product then goes through
``torch._scaled_mm``, which this torch runs on the CPU too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import fpx, fpx_a8, intq

needs_triton = pytest.mark.skipif(fpx_a8.triton is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("fmt", fpx_a8.FORMATS)
def test_every_code_is_an_e4m3_value(fmt):
    """[Note: FPx codes as e4m3 bytes]: the e4m3 weight times its scale is the FPx
    weight exactly, for a weight holding every code of the format."""
    n_codes = 2 ** fpx.nbits(fmt)
    k = fpx.layout(fmt)["k_chunk"]
    codes = torch.arange(n_codes, dtype=torch.uint8).repeat(2 * k // n_codes + 1)[: 2 * k]
    scales = torch.tensor([0.5, 3.0])
    p = fpx.pack_codes(codes.reshape(2, k), fmt, scales)
    w8, s = fpx_a8.weight_fp8_reference(p)
    assert torch.equal(w8.float() * s[:, None], fpx.unpack(p))
    assert torch.equal(s, scales * 2.0 ** (7 - fpx.bias(fmt)))


@needs_triton
@settings(max_examples=6, deadline=None)
@given(
    fmt=st.sampled_from(fpx_a8.FORMATS),
    pairs=st.integers(1, 80),
    chunks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_weight_kernel_matches_reference(fmt, pairs, chunks, seed):
    """The Triton weight kernel writes the reference's bytes, for drawn shapes (N not
    a multiple of the 128 channels of a program, several K chunks)."""
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs outside the fixture's scope
        mp.setenv("TRITON_INTERPRET", "1")
        _check_weight_kernel(fmt, pairs, chunks, seed)


def _check_weight_kernel(fmt, pairs, chunks, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 2 * pairs, chunks * fpx.layout(fmt)["k_chunk"]
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    p = fpx.pack(w, fmt)
    w8_ref, s_ref = fpx_a8.weight_fp8_reference(p)
    w8, s = fpx_a8.weight_fp8(p)
    assert torch.equal(_bytes(w8), _bytes(w8_ref))
    assert torch.equal(s, s_ref)


@needs_triton
def test_weight_kernel_writes_a_slice(interpret):
    p = fpx.pack(torch.randn(320, 256), "e3m2")
    w8_ref, _ = fpx_a8.weight_fp8_reference(p)
    for width in (32, 64, 128):  # plane columns per program: the launch tuning's choices
        part = torch.empty(2 * 70, 256, dtype=torch.float8_e4m3fn)
        fpx_a8.weight_fp8_into(p, part, (30, 100), width=width)
        assert torch.equal(_bytes(part), _bytes(w8_ref[60:200]))
    with pytest.raises(ValueError, match=r"\[140, 256\] float8_e4m3fn"):
        fpx_a8.weight_fp8_into(p, torch.empty(140, 256), (30, 100))
    with pytest.raises(ValueError, match=r"must lie in \[0, 160\]"):
        fpx_a8.weight_fp8_into(p, torch.empty(40, 256, dtype=torch.float8_e4m3fn), (150, 170))


@needs_triton
def test_rows_kernel_matches_reference(interpret):
    """Per-token e4m3: the same bytes and scales as ``intq.rowwise_fp8``, over rows of
    many magnitudes, a zero row, an e4m3 tie in every binade (subnormals included: a
    row whose absmax is 448 keeps scale 1) and a strided input."""
    gen = torch.Generator().manual_seed(0)
    mags = 10.0 ** torch.randint(-6, 4, (24, 1), generator=gen).float()
    rows = [torch.randn(24, 300, generator=gen) * mags, torch.zeros(1, 300)]
    ties = torch.tensor([v * s for s in (2.0**e for e in range(-9, 8)) for v in (1.0625, 1.1875)])
    ties = torch.cat([ties, torch.arange(1, 17) * 2.0**-10, torch.tensor([448.0])])
    rows.append(torch.cat([ties, -ties]).reshape(1, -1)[:, :300])
    x = torch.cat([torch.nn.functional.pad(r, (0, 300 - r.shape[1])) for r in rows])
    for t in (x, x.to(torch.bfloat16), torch.cat([x, x], 1)[:, ::2]):
        q, s = fpx_a8.rows_fp8(t)
        q_ref, s_ref = intq.rowwise_fp8(t)
        assert torch.equal(_bytes(q), _bytes(q_ref))
        assert torch.equal(s, s_ref)


@needs_triton
def test_non_finite_activations_give_non_finite_rows(interpret):
    """A NaN or inf in a row makes that row's output NaN, never a finite number."""
    p = fpx.pack(torch.randn(32, 128), "e3m2")
    x = torch.randn(3, 128)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    y = fpx_a8.fpx_a8_linear_scaled_mm(x, p)
    assert y[0].isnan().all() and y[1].isnan().all() and y[2].isfinite().all()
    assert fpx_a8.fpx_a8_linear_reference(x, p)[:2].isnan().all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_mm_lowering_matches_reference(interpret, dtype):
    """Equal to the reference up to fp32 summation order and one rounding to bf16
    (the FP8 GEMM's output type); 3-D x, a bias."""
    gen = torch.Generator().manual_seed(1)
    p = fpx.pack(torch.randn(96, 384, generator=gen), "e3m2")
    x = (torch.randn(2, 7, 384, generator=gen) * 3).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    y = fpx_a8.fpx_a8_linear_scaled_mm(x, p, b)
    ref = fpx_a8.fpx_a8_linear_reference(x, p, b)
    assert y.shape == ref.shape == (2, 7, 96) and y.dtype == dtype
    # Roundings: the product to bf16, then (bias add) to x's dtype: one bf16 spacing
    # of each term bounds them.
    prod = fpx_a8.fpx_a8_linear_reference(x.float(), p).abs()
    ulp = (prod + b.float().abs()) * 2.0**-7 + 1e-6
    assert ((y.float() - ref.float()).abs() <= ulp).all()
    # W6A8 differs from the weight-only product by e4m3's rounding of the activations.
    w16 = fpx.fpx_linear_reference(x.float(), p, b.float())
    assert ((ref.float() - w16).norm() / w16.norm()).item() < 0.05


def test_rows_below_min_tokens_run_weight_only(monkeypatch):
    """Decode-sized products stay weight-only; from MIN_TOKENS rows the FP8 op runs."""
    calls = []
    saved = list(dispatch._TABLE[fpx_a8.OP])

    def spy(*args):
        calls.append(args[0].shape[0])
        return fpx_a8.fpx_a8_linear_reference(*args)

    monkeypatch.setattr(fpx_a8, "MIN_TOKENS", 8)
    dispatch.register(fpx_a8.OP, spy, device="cpu", priority=1000, name="spy")
    try:
        p = fpx.pack(torch.randn(64, 128), "e3m2")
        x = torch.randn(8, 128)
        assert torch.equal(fpx_a8.fpx_a8_linear(x[:7], p), fpx.fpx_linear_reference(x[:7], p))
        assert not calls
        assert torch.equal(fpx_a8.fpx_a8_linear(x, p), fpx_a8.fpx_a8_linear_reference(x, p))
        assert calls == [8]
    finally:
        dispatch._TABLE[fpx_a8.OP] = saved


def _ptx_for_sm90(rank, world) -> dict[str, str]:
    """Both kernels compiled for sm_90 without a GPU, in a fresh process without
    TRITON_INTERPRET (see test_fpx_triton.py's twin: a kernel interpreted meanwhile
    would corrupt it)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows_sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "K": "i32",
                "stride_x": "i32", "gain": "fp32"}  # fmt: skip
    weight_sig = {"hi_ptr": "*i32", "lo_ptr": "*i32", "w_ptr": "*u8", "NW": "i32",
                  "NC": "i32", "K": "i32"}  # fmt: skip
    kernels = {
        "rows": (fpx_a8._rows_fp8_kernel, rows_sig, {"BK": 2048, "FP8_MAX": 448.0}),
        "weight": (fpx_a8._weight_fp8_kernel, weight_sig, {**fpx_a8._constants("e3m2"), "C": 64}),
    }
    knobs = fpx_a8.triton.knobs.runtime
    out = {}
    for name, (raw, sig, const) in kernels.items():
        saved, knobs.interpret = knobs.interpret, False
        try:
            fn = fpx_a8.triton.jit(raw)
        finally:
            knobs.interpret = saved
        sig = {**sig, **{c: "constexpr" for c in const}}
        names = list(sig)
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
        compiled = fpx_a8.triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
        )
        out[name] = compiled.asm["ptx"]
    return out


@needs_triton
def test_kernels_compile_for_sm90_with_ieee_division():
    """What the interpreter cannot show: both kernels compile for Hopper, and the row
    scaling divides with IEEE rounding (Triton's ``/`` is div.full.f32 there, which
    would break the bit equality with ``rowwise_fp8``)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton cannot compile ahead of time")
    # A fresh interpreter without TRITON_INTERPRET: triton's own jitted helpers (the
    # max that tl.reduce combines with) are made interpreted when it is set at import,
    # and a compiled kernel cannot call them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from tests.kernels.test_fpx_a8 import _ptx_for_sm90; "
        "print(json.dumps(_ptx_for_sm90(0, 1)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.strip().splitlines()[-1])
    assert "div.rn.f32" in ptx["rows"] and "div.full.f32" not in ptx["rows"]
    assert "st.global" in ptx["weight"]


def test_formats_without_an_e4m3_image_are_refused():
    p = fpx.pack(torch.randn(4, 256), "e2m3")
    with pytest.raises(ValueError, match=r"available for \['e3m2', 'e2m2', 'e3m1'\]"):
        fpx_a8.fpx_a8_linear(torch.randn(2, 256), p)
    with pytest.raises(ValueError, match="in_features K=256"):
        fpx_a8.fpx_a8_linear(torch.randn(2, 128), fpx.pack(torch.randn(4, 256), "e3m2"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_launch_candidate_computes_the_same_product():
    """The tuned launches (program width, pipelined slices) agree with the reference."""
    dev = torch.device("cuda")
    if not fpx_a8.available(dev):
        pytest.skip("needs FP8 tensor cores (sm_89+)")
    gen = torch.Generator(device=dev).manual_seed(0)
    p = fpx.pack(torch.randn(1040, 1024, device=dev, generator=gen), "e3m2")
    x = torch.randn(300, 1024, device=dev, generator=gen, dtype=torch.bfloat16)
    ref = fpx_a8.fpx_a8_linear_reference(x, p).float()
    for cfg in fpx_a8.CANDIDATES:
        y = fpx_a8.fpx_a8_linear_scaled_mm(x, p, config=cfg).float()
        assert ((y - ref).norm() / ref.norm()).item() < 2e-3, cfg
