"""The Triton lowering of ``fpx_linear`` (``fpx_triton`` and its private modules
``_fpx_triton_kernel``, ``_fpx_configs``, ``_fpx_dequant``) against the references.

The kernel runs under Triton's interpreter on CPU (the ``interpret`` fixture sets
``TRITON_INTERPRET=1``; the kernel is jitted at its first launch per mode) and is
compiled for sm_90 ahead of time; on a GPU it runs compiled at real sizes.
"""

from __future__ import annotations

import pytest
import torch

from fscale.kernels import _fpx_dequant, _fpx_triton_kernel, _triton, fpx, fpx_triton
from fscale.kernels._triton import COUNTERS, arrival_counters, split_mode
from tests.dist import run_world

FMTS = list(fpx.FORMATS)
needs_triton = pytest.mark.skipif(fpx_triton.triton is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (fmt, M, N, K, x dtype, config): each launch mode at least once, every format.
CASES = [
    ("e3m2", 1, 64, 256, torch.float32, None),
    ("e3m2", 5, 130, 384, torch.float16, None),  # N not a multiple of BN, odd M
    ("e3m2", 33, 32, 128, torch.float32, dict(bm=16, bn=32, split=1)),  # several M tiles
    ("e2m3", 3, 64, 256, torch.bfloat16, dict(bm=16, bn=64, split=2)),
    ("e2m2", 2, 64, 512, torch.float32, dict(bm=16, bn=64, split=2)),
    ("e3m2", 20, 64, 512, torch.float16, dict(bm=32, bn=64, split=2)),  # atomic split-K
    ("e3m1", 4, 96, 256, torch.float16, dict(bm=16, bn=32, split=1)),
    ("e2m1", 7, 66, 384, torch.float32, dict(bm=16, bn=64, split=3)),
    # K per dot ([Note: K per dot]): 128 rows (fp5: two dots per chunk), 64, 32.
    ("e3m2", 37, 130, 384, torch.float16, dict(bm=64, bn=64, kdot=128, split=1)),
    ("e3m1", 3, 64, 512, torch.bfloat16, dict(bm=16, bn=64, kdot=128, split=2)),
    ("e2m3", 2, 64, 256, torch.float32, dict(bm=16, bn=32, kdot=64, split=1)),
    ("e2m1", 9, 64, 384, torch.float16, dict(bm=32, bn=64, kdot=32, split=3)),
    ("e3m2", 3, 64, 256, torch.float16, dict(dequant=True)),  # dequantize + matmul
    ("e2m1", 2, 192, 256, torch.bfloat16, dict(dequant=True, pieces=3)),
    ("e3m2", 2, 64, 128, torch.float32, dict(dequant=True)),  # fp32 x: fused kernel instead
]


@needs_triton
@pytest.mark.parametrize("fmt,m,n,k,dtype,config", CASES)
def test_triton_matches_reference(interpret, fmt, m, n, k, dtype, config):
    """Fresh random weights, activations and bias per case; the kernel's dot runs in
    fp32 under the interpreter, so the only differences are summation order and the
    output's rounding to x's dtype."""
    gen = torch.Generator().manual_seed(hash((fmt, m, n, k)) % 2**31)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    p = fpx.pack(w, fmt)
    got = fpx_triton.fpx_linear_triton(x, p, bias, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ fpx.unpack(p).double().t() + bias.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(got, want) <= tol
    # And against the reference in x's dtype (what dispatch would run elsewhere).
    ref = fpx.fpx_linear_reference(x.float(), p, bias.float())
    assert _rel(got, ref) <= tol


@needs_triton
def test_split_k_sums_partials_in_one_kernel_and_leaves_counters_zeroed(interpret):
    """[Note: split-K without extra kernels]: the last program of each tile sums the
    partials in a fixed order, so repeated launches agree bit for bit, the sum equals
    the split=1 result to fp32 rounding, and the arrival counters end at 0."""
    gen = torch.Generator().manual_seed(11)
    p = fpx.pack(torch.randn(96, 4 * 128, generator=gen), "e3m2")
    x = torch.randn(3, 4 * 128, generator=gen)
    bias = torch.randn(96, generator=gen)
    cfg = dict(bm=16, bn=32, split=4, num_warps=4, num_stages=1)
    first = fpx_triton.fpx_linear_triton(x, p, bias, config=cfg)
    again = fpx_triton.fpx_linear_triton(x, p, bias, config=cfg)
    assert torch.equal(first, again)
    one = fpx_triton.fpx_linear_triton(x, p, bias, config=dict(cfg, split=1))
    assert _rel(first, one) <= 1e-6 and not torch.equal(first, torch.zeros_like(first))
    counters = arrival_counters(x.device, 3)  # the buffer the launches used
    assert counters.numel() >= 3 and not counters.any()


# (fmt, M, I, K, x dtype, bn, split): split 1 still pairs gate and up programs.
SWIGLU_CASES = [
    ("e3m2", 1, 64, 256, torch.float32, 64, 1),
    ("e3m2", 5, 128, 384, torch.float16, 64, 3),
    ("e2m3", 3, 64, 512, torch.bfloat16, 32, 2),
    ("e2m1", 16, 96, 384, torch.float32, 32, 4),
]


@needs_triton
@pytest.mark.parametrize("fmt,m,inter,k,dtype,bn,split", SWIGLU_CASES)
def test_swiglu_epilogue_is_silu_of_gate_times_up(interpret, fmt, m, inter, k, dtype, bn, split):
    """[Note: the SwiGLU epilogue] in the Triton kernel: a [2I, K] weight's product ends
    in silu(gate) * up, summed over the split in order (the same sums as the plain
    launch's), bias included, and the arrival counters end at 0."""
    gen = torch.Generator().manual_seed(hash((fmt, m, inter, k)) % 2**31)
    p = fpx.pack(torch.randn(2 * inter, k, generator=gen), fmt)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(2 * inter, generator=gen).to(dtype)
    cfg = dict(bm=16, bn=bn, split=split, num_warps=4, num_stages=1)
    y = torch.empty(m, inter, dtype=dtype)
    _fpx_triton_kernel.launch(x, p, bias, y, mode=2, swiglu=True, **cfg)
    plain = torch.empty(m, 2 * inter, dtype=torch.float32)
    _fpx_triton_kernel.launch(x.float(), p, bias.float(), plain, mode=2, **cfg)
    gate, up = plain.split(inter, dim=1)
    want = gate / (1.0 + torch.exp(-gate)) * up
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(y, want) <= tol
    ref = fpx.fpx_linear_reference(x.float(), p, bias.float())
    assert _rel(y, torch.nn.functional.silu(ref[:, :inter]) * ref[:, inter:]) <= max(tol, 1e-5)
    assert not arrival_counters(x.device, 1).any()
    # The entry point: the default launch under the interpreter, leading dims kept.
    got = fpx_triton.fused_swiglu(x.reshape(1, m, k), p, bias)
    assert got.shape == (1, m, inter) and _rel(got[0], want) <= tol


@needs_triton
def test_swiglu_declines_what_it_cannot_fuse_and_refuses_split_tiles(interpret):
    p = fpx.pack(torch.randn(2 * 72, 128), "e3m2")  # I = 72: no bn divides it
    x = torch.randn(2, 128)
    assert fpx_triton.fused_swiglu(x, p) is None
    assert fpx_triton.fused_swiglu(torch.randn(300, 128), p) is None  # dequantize + cuBLAS M
    y = torch.empty(2, 72)
    with pytest.raises(ValueError, match="multiple of bn"):
        _fpx_triton_kernel.launch(x, p, None, y, bm=16, bn=64, split=1, num_warps=4,
                                  num_stages=1, swiglu=True)  # fmt: skip
    assert fpx_triton.fused_swiglu(x, torch.randn(144, 128)) is None  # not a packed weight


@needs_triton
@pytest.mark.parametrize("fmt", FMTS)
def test_triton_dequantize_is_exact(interpret, fmt):
    w = torch.randn(6, fpx.layout(fmt)["k_chunk"] * 2)
    p = fpx.pack(w, fmt)
    for dtype in (torch.float16, torch.bfloat16):
        got = fpx_triton.dequantize_triton(p, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, fpx.unpack(p).to(dtype))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        fpx_triton.dequantize_triton(p, torch.float32)


@needs_triton
def test_triton_dequantize_writes_only_its_column_window(interpret):
    """A piece of W^T (plane columns [c0, c1)) lands at column 0 of its buffer; the rest
    of the buffer is untouched (the pipelined dequantize + cuBLAS path relies on both)."""
    p = fpx.pack(torch.randn(256, 128), "e3m2")
    buf = torch.full((128, 160), 7.0, dtype=torch.float16)
    _fpx_dequant.dequantize_into(p, buf, (32, 96), torch.float16)
    want = fpx.unpack(p).to(torch.float16).t()[:, 64:192]
    assert torch.equal(buf[:, :128], want)
    assert bool((buf[:, 128:] == 7.0).all())


@needs_triton
def test_triton_leading_dims_and_errors(interpret):
    p = fpx.pack(torch.randn(8, 128), "e3m2")
    x = torch.randn(2, 3, 128)
    got = fpx_triton.fpx_linear_triton(x, p)
    assert got.shape == (2, 3, 8)
    assert _rel(got, x @ fpx.unpack(p).t()) <= 1e-6
    with pytest.raises(ValueError, match="in_features K=128"):
        fpx_triton.fpx_linear_triton(torch.randn(2, 64), p)
    with pytest.raises(ValueError, match="dtype"):
        fpx_triton.fpx_linear_triton(torch.ones(2, 128, dtype=torch.int32), p)


@needs_triton
def test_triton_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    # (Not by pinning triton.knobs.runtime.interpret: restoring it would pin it for
    # every later test instead of leaving it to TRITON_INTERPRET.)
    monkeypatch.setattr(_fpx_triton_kernel, "interpreting", lambda: False)
    p = fpx.pack(torch.randn(8, 128), "e3m2")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fpx_triton.fpx_linear_triton(torch.randn(2, 128), p)


@needs_triton
def test_first_gpu_call_tunes_once_and_keeps_the_fastest(interpret, monkeypatch):
    """``_tune`` (run on CUDA only) with a fake do_bench: the fastest candidate is
    kept, per (fmt, N, K, M bucket, device), and later calls reuse it."""
    import triton.testing

    calls = []

    def fake_bench(fn, **kwargs):
        cfg = fn.__defaults__[0]
        calls.append(cfg)
        fn()  # each candidate must really run
        return 1.0 if cfg.get("bn") == 64 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_bench)
    monkeypatch.setattr(fpx_triton, "_TUNED", {})
    p = fpx.pack(torch.randn(64, 256), "e3m2")
    x = torch.randn(3, 256)
    cfg = fpx_triton._tune(x, p, None)
    assert cfg["bn"] == 64
    assert len(calls) == len(fpx_triton.candidate_configs(3))
    assert fpx_triton._tune(torch.randn(4, 256), p, None) is cfg  # same bucket (4)
    assert len(calls) == len(fpx_triton.candidate_configs(3))
    assert [c.get("dequant") for c in fpx_triton.candidate_configs(512)][-1] is True


def test_streamed_copies_read_twice_the_l2_or_stay_one(monkeypatch):
    """[Note: tuning on streamed weights]: enough separate copies that a chain reads
    at least twice the L2, at most MAX_STREAM_COPIES; one weight on CPU, where there is
    no L2 to stream past, for a weight already that large, and with
    FSCALE_TUNE_STREAMED=0; those that fit on a full device."""
    from fscale.kernels._triton import streamed_copies

    p = fpx.pack(torch.randn(64, 256), "e3m2")
    ws = streamed_copies(p, p.nbytes, lambda w: w.clone(), "cuda", l2_bytes=5 * p.nbytes)
    assert len(ws) == 10 and ws[0] is p
    assert len({w.hi.data_ptr() for w in ws}) == 10  # each its own planes
    for w in ws[1:]:
        assert torch.equal(w.hi, p.hi) and torch.equal(w.lo, p.lo)
        assert torch.equal(w.scales, p.scales) and w.shape == p.shape
    assert len(streamed_copies(p, p.nbytes, torch.clone, "cuda", l2_bytes=p.nbytes // 3)) == 1
    many = streamed_copies(p, p.nbytes, lambda w: w, "cuda", l2_bytes=1000 * p.nbytes)
    assert len(many) == _triton.MAX_STREAM_COPIES  # a tiny weight: a capped chain
    assert streamed_copies(p, p.nbytes, lambda w: w.clone(), "cpu") == [p]
    made = []

    def clone_until_full(w):
        if len(made) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        made.append(w.clone())
        return made[-1]

    ws = streamed_copies(p, p.nbytes, clone_until_full, "cuda", l2_bytes=5 * p.nbytes)
    assert [id(w) for w in ws] == [id(w) for w in (p, *made)]  # the copies that fit
    monkeypatch.setenv("FSCALE_TUNE_STREAMED", "0")
    assert streamed_copies(p, p.nbytes, torch.clone, "cuda", l2_bytes=5 * p.nbytes) == [p]


@pytest.mark.parametrize("m, streamed", [(3, True), (512, False)])
def test_tuning_times_fused_launches_over_copies_of_the_weight(interpret, monkeypatch, m, streamed):
    """Each candidate of a fused-kernel M is timed as one launch per copy of the weight
    (the time kept is per launch); an M whose candidates include dequantize + cuBLAS
    times them on the weight itself."""
    import triton.testing

    seen: list[list] = []

    def fake_bench(fn, **kwargs):
        seen.clear()
        fn()
        return 6.0

    def fake_linear(x, p, bias, cfg, gluon=False):
        seen.append(p)
        return x.new_zeros(x.shape[0], p.shape[0])

    def copies(w, nbytes, clone, device):
        return [w] + [clone(w) for _ in range(2)]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_bench)
    monkeypatch.setattr(fpx_triton, "_TUNED", {})
    monkeypatch.setattr(fpx_triton, "_TUNE_LOG", {})
    monkeypatch.setattr(_triton, "streamed_copies", copies)
    monkeypatch.setattr(fpx_triton, "_linear", fake_linear)
    p = fpx.pack(torch.randn(64, 256), "e3m2")
    fpx_triton._tune(torch.randn(m, 256), p, None)
    assert seen[0] is p and len(seen) == (3 if streamed else 1)
    assert len({id(w) for w in seen}) == len(seen)
    (times,) = fpx_triton._TUNE_LOG.values()
    assert {t for t, _ in times} == {2.0 if streamed else 6.0}
    fpx_triton.clear_tuned()
    assert fpx_triton.tuned() == {} and fpx_triton._TUNE_LOG == {}


@needs_triton
def test_tuning_during_graph_capture_is_a_clear_error(interpret, monkeypatch):
    """The first call per shape times launches; inside a CUDA graph capture it would
    record them into the graph, so it says to make an eager call first (and keeps no
    choice)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(fpx_triton, "_TUNED", {})
    p = fpx.pack(torch.randn(64, 256), "e3m2")
    with pytest.raises(RuntimeError, match="eager call first"):
        fpx_triton._tune(torch.randn(3, 256), p, None)
    assert fpx_triton._TUNED == {}


def _ptx_for_sm90(rank, world, **const) -> str:
    """Compiled in a fresh process: Triton's interpreter patches the language module
    while it runs a kernel, so a kernel interpreted on another thread of the test
    process corrupts a compile running meanwhile (seen once under pytest-xdist: the
    compile ran on the interpreter's builder)."""
    return _compile_for_sm90(**const).asm["ptx"]


def _compile_for_sm90(**const):
    """Compile the kernel for sm_90 without a GPU (catches what the interpreter cannot:
    Triton's typing and constexpr rules, shared-memory limits)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # A compiled (not interpreted) JITFunction, even when the suite runs under
    # TRITON_INTERPRET=1 (the README's test command): jit reads the mode as it wraps.
    knobs = fpx_triton.triton.knobs.runtime
    saved, knobs.interpret = knobs.interpret, False
    try:
        fn = fpx_triton.triton.jit(_fpx_triton_kernel._fpx_kernel)
    finally:
        knobs.interpret = saved
    dt = const.pop("dtype")
    sig = {
        "x_ptr": f"*{dt}", "hi_ptr": "*i32", "lo_ptr": "*i32", "s_ptr": "*fp32",
        "b_ptr": f"*{dt}", "y_ptr": "*fp32" if const["SPLIT"] == 1 else f"*{dt}",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32",
        "M": "i32", "N": "i32", "NW": "i32", "K": "i32", "stride_xm": "i32",
        "stride_ym": "i32", "chunks_per_prog": "i32", "exp_scale": "fp32",
        "c_begin": "i32", "c_end": "i32",
    }  # fmt: skip
    if const["DEQUANT"]:
        sig["y_ptr"] = "*i32"  # W^T written as words of two 16-bit weights
    sig.update({name: "constexpr" for name in const})
    names = list(sig)
    div16 = ["x_ptr", "hi_ptr", "lo_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "NW", "K", "stride_xm"]
    div16 += ["c_begin", "c_end"]  # as Triton specialises them when launched (0, N / 2)
    src = ASTSource(
        fn,
        sig,
        constexprs={(names.index(k),): v for k, v in const.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16},
    )
    return fpx_triton.triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}
    )


@needs_triton
@pytest.mark.parametrize(
    "fmt,dtype,bm,kdot,split,dequant,pdl,swiglu",
    [("e3m2", "fp16", 16, 16, 2, False, True, False),
     ("e2m2", "bf16", 64, 16, 1, False, False, False),
     ("e3m2", "fp16", 64, 128, 0, False, False, False),
     ("e2m1", "fp16", 16, 16, 0, True, True, False),
     ("e3m2", "bf16", 16, 16, 2, False, True, True)],
)  # fmt: skip
def test_kernel_compiles_for_sm90(fmt, dtype, bm, kdot, split, dequant, pdl, swiglu):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton cannot compile ahead of time")
    lay, pl = fpx.layout(fmt), fpx.planes(fmt)
    ptx = run_world(
        _ptx_for_sm90, 1,
        dtype=dtype, E=fpx.FORMATS[fmt][0], LB=lay["lo_bits"], NQ=lay["nq"],
        BYTE=pl["byte"], HI_MASK=pl["hi_mask"] * 0x01010101, LO_MASK=pl["lo_mask"] * 0x01010101,
        BM=bm, BN=128, T=kdot // 16,
        SPLIT=split, HAS_BIAS=True, DOT_FP32=False, DEQUANT=dequant,
        OUT_BF16=dtype == "bf16", PDL=pdl, SWIGLU=swiglu,
    )[0]  # fmt: skip
    assert ("ex2.approx" in ptx) == swiglu  # the epilogue's SiLU
    # [Note: programmatic dependent launch] (_triton.py): the wait comes before any
    # load but the scales' (weights), and lets the next kernel launch right after.
    if pdl:
        lines = ptx.splitlines()
        (wait,) = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        (let,) = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
        early = [line for line in lines[:wait] if "ld.global" in line or "cp.async" in line]
        # Only the fp32 scales (4-byte loads), no plane copies, no x.
        assert wait < let and early and all("ld.global.b32 " in line for line in early)
    else:
        assert "griddepcontrol" not in ptx
    if not dequant:
        assert "mma" in ptx  # tensor cores
        assert "cp.async.cg.shared.global" in ptx  # 16-byte, pipelined plane loads
    if kdot > 16 and bm >= 64:
        # One warpgroup MMA chain per 128 rows of K, not one per 16-row sub-tile.
        assert ptx.count("wgmma.mma_async") == 8 * (128 // kdot)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
@pytest.mark.parametrize("fmt", ["e3m2", "e2m3", "e2m2", "e2m1"])
@pytest.mark.parametrize("split", [1, 3, 8])
def test_cuda_kernel_matches_reference_with_and_without_split_k(fmt, split):
    """Compiled kernel (byte and shift images), fp16 and bf16, one tile row and several,
    16 or 128 rows of K per dot; split-K results without atomics are deterministic and
    leave the counters of this stream zeroed."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    k = 8 * fpx.layout(fmt)["k_chunk"]
    p = fpx.pack(torch.randn(384, k, generator=gen, device="cuda"), fmt)
    for dtype, m in ((torch.float16, 1), (torch.bfloat16, 20), (torch.float16, 130)):
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        bias = torch.randn(384, generator=gen, device="cuda").to(dtype)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        kdot = 128 if bm == 64 else 16  # bm 64: wgmma, K per dot 128
        cfg = dict(bm=bm, bn=64, kdot=kdot, split=split, num_warps=4, num_stages=3)
        got = fpx_triton.fpx_linear_triton(x, p, bias, config=cfg)
        want = x.double() @ fpx.unpack(p).double().t() + bias.double()
        assert _rel(got, want) <= 1e-2
        if split_mode(bm, split) != 1:  # fp32 atomics add in any order
            assert torch.equal(got, fpx_triton.fpx_linear_triton(x, p, bias, config=cfg))
    torch.cuda.synchronize()
    key = (str(x.device), torch.cuda.current_stream().cuda_stream)
    assert key in COUNTERS or split == 1
    assert not arrival_counters(x.device, 1).any()
