"""The Hopper fp6/fp5 kernel in Gluon (``fpx_gluon``).

Gluon has no interpreter, so on CPU the kernel is compiled for sm_90 ahead of time and
its PTX checked for the structure the design rests on (weights as wgmma's register
operand, never in shared memory), and its integer rebuild is run in torch with the
kernel's constants; on a Hopper GPU it is checked against the fp64 reference, directly
and through the tuning of its lowering (``fpx_triton.fpx_linear_hopper``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fscale.kernels import fpx, fpx_gluon, fpx_triton
from fscale.kernels._triton import COUNTERS
from tests.dist import run_world

needs_gluon = pytest.mark.skipif(fpx_gluon.gluon is None, reason="triton without Gluon")
on_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU",
)


def _ptx_for_sm90(rank, world, *args, **kwargs) -> str:
    """Compiled in a fresh process: Triton's interpreter patches the language module
    while it runs a kernel, so a kernel interpreted on another thread of the test
    process corrupts a compile running meanwhile (seen once under pytest-xdist: the
    compile ran on the interpreter's builder)."""
    return _compile_for_sm90(*args, **kwargs).asm["ptx"]


def _compile_for_sm90(
    bnt: int, dtype: str, split: int, warps: int, fmt: str, pdl=False, swiglu=False
):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    pl, lay = fpx.planes(fmt), fpx.layout(fmt)
    const = dict(
        BNT=bnt, STAGES=4, SPLIT=split, HAS_BIAS=True, HI_MASK=pl["hi_mask"] * 0x01010101,
        LO_MASK=pl["lo_mask"] * 0x01010101, X_BF16=dtype == "bf16", W=warps,
        LB=lay["lo_bits"], NQ=lay["nq"], PDL=pdl, SWIGLU=swiglu,
    )  # fmt: skip
    sig = {
        "x_ptr": f"*{dtype}", "hi_ptr": "*i32", "lo_ptr": "*i32", "s_ptr": "*fp32",
        "b_ptr": f"*{dtype}", "y_ptr": "*fp32" if split == 1 else f"*{dtype}",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "NW": "i32",
        "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "chunks_per_prog": "i32",
        "exp_scale": "fp32",
    }  # fmt: skip
    sig.update({name: "constexpr" for name in const})
    names = list(sig)
    div16 = ["x_ptr", "hi_ptr", "lo_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "NW", "K", "stride_xm"]
    src = GluonASTSource(
        fpx_gluon._kernel,
        sig,
        constexprs={(names.index(k),): v for k, v in const.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16},
    )
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


@needs_gluon
@pytest.mark.parametrize(
    "fmt,bnt,dtype,split,warps",
    [("e3m2", 8, "fp16", 0, 4), ("e3m2", 16, "bf16", 1, 4), ("e3m2", 128, "fp16", 0, 8),
     ("e3m2", 8, "fp16", 2, 8), ("e2m2", 8, "fp16", 2, 4), ("e3m1", 32, "bf16", 0, 8)],
)  # fmt: skip
def test_kernel_compiles_for_sm90_with_the_weights_in_registers(fmt, bnt, dtype, split, warps):
    """Per 128 rows of K each warpgroup issues 8 MMAs m64 x bnt x 16 whose A operand is 4
    registers, each register one PRMT of two rebuilt byte words; the weights never go
    to shared memory (no st.shared before the split-K epilogue), the planes and x
    arrive by 16-byte cp.async."""
    ptx = run_world(_ptx_for_sm90, 1, bnt, dtype, split, warps, fmt)[0]
    halves = fpx.layout(fmt)["k_chunk"] // 128
    ab = "bf16.bf16" if dtype == "bf16" else "f16.f16"
    mma = f"wgmma.mma_async.sync.aligned.m64n{bnt}k16.f32.{ab} {{"
    lines = [line for line in ptx.splitlines() if mma in line]
    assert len(lines) == 8 * halves
    assert all("}, {%r" in line for line in lines)  # A from registers, not a descriptor
    # 64 channels x 128 k / 128 threads / 2 per register, per half
    assert ptx.count("prmt.b32") == 32 * halves
    # (Split-K's arrival count is broadcast through shared memory after the atomic.)
    end = ptx.index("atom.global.gpu.acq_rel.add") if split == 2 else len(ptx)
    assert "st.shared" not in ptx[:end]
    assert "cp.async.cg.shared.global" in ptx and ", 0x10," in ptx


@needs_gluon
@pytest.mark.parametrize("fmt,warps", [("e3m2", 4), ("e2m2", 8)])
def test_pdl_requests_the_first_planes_before_waiting_and_x_after(fmt, warps):
    """[Note: programmatic dependent launch] (_triton.py): with PDL the prologue's plane
    copies (weights) come before ``griddepcontrol.wait``, every x copy after it, and
    the next kernel is let launch right after the wait; without PDL neither appears."""
    ptx = run_world(_ptx_for_sm90, 1, 8, "bf16", 2, warps, fmt, pdl=True)[0].splitlines()
    (wait,) = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
    (let,) = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
    copies = [i for i, line in enumerate(ptx) if "cp.async.cg.shared.global" in line]
    halves = fpx.layout(fmt)["k_chunk"] // 128
    # STAGES - 1 = 3 chunks ahead, per thread 2 hi copies per half and 1 lo copy of
    # 16 bytes; x (8 tokens x 128 bf16 per half) is one copy per half after the wait.
    assert sum(c < wait for c in copies) == 3 * (2 * halves + 1)
    assert wait < let < min(c for c in copies if c > wait)
    assert not any("commit_group" in line for line in ptx[:wait])
    off = run_world(_ptx_for_sm90, 1, 8, "bf16", 2, warps, fmt, pdl=False)[0]
    assert "griddepcontrol" not in off
    assert off.count("cp.async.cg.shared.global") == len(copies)


@needs_gluon
@pytest.mark.parametrize("fmt,warps,split", [("e3m2", 4, 0), ("e3m2", 4, 2), ("e2m2", 8, 1)])
def test_no_copy_refills_a_slot_before_every_warp_retired_the_mma_reading_it(fmt, warps, split):
    """[Note: refilling a slot the MMA read]: in the loop, between each warp's wait that
    retires a chunk's MMA (``wgmma.wait_group``) and the next copy into the ring, the
    CTA meets at a barrier (a warp's wait retires only its own part)."""
    ptx = run_world(_ptx_for_sm90, 1, 8, "fp16", split, warps, fmt)[0].splitlines()
    waits = [i for i, line in enumerate(ptx) if "wgmma.wait_group.sync.aligned" in line]
    copies = [i for i, line in enumerate(ptx) if "cp.async.cg.shared.global" in line]
    bars = [i for i, line in enumerate(ptx) if "bar.sync" in line or "barrier.sync" in line]
    refills = [(w, min(c for c in copies if c > w)) for w in waits if any(c > w for c in copies)]
    assert refills  # the loop refills its ring after the waits
    for wait, copy in refills:
        assert any(wait < b < copy for b in bars), (ptx[wait], ptx[copy])


def _sass_for_sm90(rank, world, *args, **kwargs) -> str:
    """The kernel's SASS (ptxas and nvdisasm as Triton ships them), in a fresh process
    as ``_ptx_for_sm90``."""
    import subprocess
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(_compile_for_sm90(*args, **kwargs).asm["cubin"])
        return subprocess.run(
            [str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True
        ).stdout


_SASS_OP = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")


def _writes_to_unretired_mma_registers(sass: str) -> list[str]:
    """Instructions that write a register an HGMMA reads as its A operand before the
    ``WARPGROUP.DEPBAR`` that retires it ([Note: an MMA reads its A registers until it
    retires] in fpx_gluon.py). Loops are walked twice, so a write in the next
    iteration counts."""
    code, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(code)
        elif m := _SASS_OP.match(line):
            code.append((m.group(1), m.group(2)))
    walk, start = [], 0
    for i, (op, args) in enumerate(code):
        target = re.search(r"\(\.(L_x_\d+)\)", args) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) <= i:  # a loop's back edge
            head = labels[target.group(1)]
            walk += code[start:head] + 2 * code[head : i + 1]
            start = i + 1
    walk += code[start:]
    retired_after, open_group, bad = [], set(), []
    for op, args in walk:
        regs = [a.strip() for a in args.split(",")]
        if op.startswith("HGMMA"):
            if re.fullmatch(r"R\d+", regs[1]):
                open_group |= {int(regs[1][1:]) + j for j in range(4)}
            if "gsb0" in args:
                retired_after.append(open_group)
                open_group = set()
        elif op.startswith("WARPGROUP.DEPBAR"):
            keep = int(regs[1], 16)
            retired_after = retired_after[len(retired_after) - keep :] if keep else []
        elif regs and re.fullmatch(r"R\d+", regs[0]):
            width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
            written = {int(regs[0][1:]) + j for j in range(width)}
            if written & set().union(open_group, *retired_after):
                bad.append(f"{op} {args}")
    return bad


def test_the_register_check_sees_a_rebuild_writing_an_unretired_mma():
    """The check above on a hand-made loop: the MMA left in flight across the back edge
    (retired by ``DEPBAR.LE gsb0, 0x1`` after the next one issues) and the next
    iteration's rebuild writing R57 (the order before 2026-12-06) is caught; retired
    at once (``0x0``), it is not."""
    loop = """
.L_x_1:
        /*0010*/                   LOP3.LUT R57, R10, 0x1e1e1e1e, R13, 0xe2, !PT ;
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x8x16.F32.BF16 R48, R56, gdesc[UR8], R48, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x{keep} ;
        /*0050*/               @P2 BRA `(.L_x_1) ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
"""
    assert _writes_to_unretired_mma_registers(loop.format(keep=1)) == [
        "LOP3.LUT R57, R10, 0x1e1e1e1e, R13, 0xe2, !PT"
    ]
    assert _writes_to_unretired_mma_registers(loop.format(keep=0)) == []


@needs_gluon
@pytest.mark.parametrize(
    "fmt,bnt,warps,split",
    [("e3m2", 8, 4, 2), ("e3m2", 8, 8, 0), ("e2m2", 8, 4, 2), ("e3m2", 64, 4, 1)],
)
def test_no_instruction_writes_the_registers_of_an_unretired_mma(fmt, bnt, warps, split):
    """[Note: an MMA reads its A registers until it retires]: in the compiled kernel no
    instruction writes an HGMMA's A registers before the wait that retires it (with the
    MMA left in flight across the next chunk's rebuild, ptxas reused them: outputs
    changed between launches on an H100)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("this triton ships no nvdisasm")
    sass = run_world(_sass_for_sm90, 1, bnt, "bf16", split, warps, fmt)[0]
    assert sass.count("HGMMA") >= 8  # one MMA per 16 rows of a 128-row chunk
    assert _writes_to_unretired_mma_registers(sass) == []


@needs_gluon
@pytest.mark.parametrize("fmt,warps,split", [("e3m2", 4, 0), ("e3m2", 4, 2), ("e2m2", 8, 1)])
def test_every_thread_fences_its_copies_before_the_barrier_the_mma_follows(fmt, warps, split):
    """[Note: x reaches the MMA through the async proxy]: in the loop, between each wait
    for a chunk's copies (``cp.async.wait_group``) and the chunk's first MMA, the
    thread's proxy fence is followed by a CTA barrier (the fence after the last
    barrier left some outputs launch-dependent on an H100)."""
    ptx = run_world(_ptx_for_sm90, 1, 8, "fp16", split, warps, fmt)[0].splitlines()
    mmas = [i for i, line in enumerate(ptx) if "wgmma.mma_async" in line]
    waits = [i for i, line in enumerate(ptx) if "cp.async.wait_group" in line]
    fences = [i for i, line in enumerate(ptx) if "fence.proxy.async" in line]
    bars = [i for i, line in enumerate(ptx) if "bar.sync" in line or "barrier.sync" in line]
    # each wait the loop's MMAs follow, with the first MMA after it
    feeding = {max(w for w in waits if w < m): m for m in reversed(mmas) if min(waits) < m}
    assert feeding
    for wait, mma in feeding.items():
        assert any(wait < f < b < mma for f in fences for b in bars), (ptx[wait], ptx[mma])


@needs_gluon
@pytest.mark.parametrize("fmt,warps", [("e3m2", 4), ("e2m2", 8)])
def test_swiglu_epilogue_compiles_and_counts_both_tiles(fmt, warps):
    """[Note: the SwiGLU epilogue]: the loop is the plain split-K kernel's (the same
    MMAs from registers); the last arrival reads twice the partials (gate and up) and
    takes one exp per output, which the plain launch never does."""
    ptx = run_world(_ptx_for_sm90, 1, 8, "bf16", 2, warps, fmt, swiglu=True)[0]
    plain = run_world(_ptx_for_sm90, 1, 8, "bf16", 2, warps, fmt)[0]
    mma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert len(mma) == len([line for line in plain.splitlines() if "wgmma.mma_async" in line])
    assert "ex2.approx" in ptx and "ex2.approx" not in plain
    assert ptx.count("ld.global.cg") == 2 * plain.count("ld.global.cg")


def test_swiglu_needs_whole_tiles_of_gate_and_up(monkeypatch):
    """A weight whose I is not a multiple of a program's channels is refused by name;
    ``swiglu_fits`` says which fit, and ``fused_swiglu`` declines (None) on a CPU that
    does not interpret Triton (under the interpreter the Triton kernel's epilogue runs:
    tests/kernels/test_fpx_triton.py)."""
    assert fpx_gluon.swiglu_fits(fpx.pack(torch.randn(2 * 128, 256), "e3m2"))
    assert not fpx_gluon.swiglu_fits(fpx.pack(torch.randn(2 * 96, 256), "e3m2"))
    assert not fpx_gluon.swiglu_fits(fpx.pack(torch.randn(2 * 64, 256), "e3m2"), warps=8)
    p = fpx.pack(torch.randn(2 * 96, 256), "e3m2")
    with pytest.raises(ValueError, match="swiglu needs a"):
        fpx_gluon.fpx_linear_gluon(torch.randn(2, 256, dtype=torch.bfloat16), p, swiglu=True)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(fpx_triton, "interpreting", lambda: False)
    assert fpx_triton.fused_swiglu(x, fpx.pack(torch.randn(256, 256), "e3m2")) is None


def _rotl(w: torch.Tensor, n: int) -> torch.Tensor:
    return ((w << n) | (w >> (32 - n))) & 0xFFFFFFFF if n else w


def _prmt(a: torch.Tensor, b: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX prmt.b32: byte i of the result is byte (selector >> 4 i) & 7 of b:a."""
    src = [(a >> (8 * j)) & 0xFF for j in range(4)] + [(b >> (8 * j)) & 0xFF for j in range(4)]
    return sum(src[(selector >> (4 * i)) & 7] << (8 * i) for i in range(4))


@pytest.mark.parametrize("fmt", fpx_gluon.FORMATS)
def test_rebuild_gives_each_weights_fp16_image(fmt):
    """The kernel's integer path in torch, with its constants (plane masks, rotations,
    ``SELECTORS``, the image mask): every A-register half is the fp16 whose value times
    2**(15 - bias) is the decoded code at (channel, k), every weight exactly once."""
    lay, pl = fpx.layout(fmt), fpx.planes(fmt)
    lb, nq, kc = lay["lo_bits"], lay["nq"], lay["k_chunk"]
    n = 32
    p = fpx.pack(torch.randn(n, kc, generator=torch.Generator().manual_seed(1)), fmt)
    # unpack(p) = decode(codes) * scale, and the kernel applies scale * 2**(15 - bias).
    want = fpx.decode(fpx.unpack_codes(p), fmt) * 2.0 ** (fpx.bias(fmt) - 15)
    hi, lo = p.hi.long() & 0xFFFFFFFF, p.lo.long() & 0xFFFFFFFF  # chunk 0
    hi_mask = pl["hi_mask"] * 0x01010101
    keep = ((pl["hi_mask"] | pl["lo_mask"]) & 0xFF) * 0x01000100
    seen = 0
    for q in range(nq):
        hq = _rotl(hi[(q // 2) * 16 : (q // 2 + 1) * 16], 28 * (q % 2))
        lq = _rotl(lo[:16], lb * q)
        both = (hq & hi_mask) | (lq & (hi_mask ^ 0xFFFFFFFF))
        for v in range(2):
            for h in range(2):
                words = _prmt(both[0::2], both[1::2], fpx_gluon.SELECTORS[v][h]) & keep
                for e in range(2):  # low half: k row 2p', high half: 2p' + 1
                    bits = ((words >> (16 * e)) & 0xFFFF).to(torch.int16)
                    got = bits.view(torch.float16).float()  # [8 p', n / 2 c]
                    k = 16 * (2 * q + v) + 2 * torch.arange(8) + e
                    assert torch.equal(got, want[h::2, k].t()), (q, v, h, e)
                    seen += got.numel()
    assert seen == n * kc


def test_tokens_per_program_is_a_legal_mma_n():
    assert [fpx_gluon.tokens_per_program(m) for m in (1, 8, 9, 16, 33, 200, 256, 300)] == [
        8, 8, 16, 16, 64, 256, 256, 256
    ]  # fmt: skip


def test_not_available_on_cpu_or_other_formats(monkeypatch):
    x = torch.randn(2, 256, dtype=torch.float16)
    assert not fpx_gluon.available(x, "e3m2")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fpx_gluon.available(x, "e3m1") == (fpx_gluon.gluon is not None)
    assert not fpx_gluon.available(x, "e2m1") and not fpx_gluon.available(x, "e2m3")
    assert not fpx_gluon.available(x.float(), "e3m2")
    monkeypatch.undo()
    assert "gluon" not in str(fpx_triton.candidate_configs(4))
    with_gluon = fpx_triton.candidate_configs(4, gluon=True)
    first = len(fpx_triton.gluon_configs(4))
    assert with_gluon[:first] == fpx_triton.gluon_configs(4) and with_gluon[first:] == (
        fpx_triton.candidate_configs(4)
    )
    assert fpx_triton.gluon_configs(512) == []


def test_formats_the_kernel_cannot_take_are_a_clear_error():
    p = fpx.pack(torch.randn(64, 256), "e2m1")
    with pytest.raises(ValueError, match="fpx_linear_triton"):
        fpx_gluon.fpx_linear_gluon(torch.randn(2, 256, dtype=torch.float16), p)


def test_asking_for_gluon_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = fpx.pack(torch.randn(64, 256), "e3m2")
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="drop 'gluon'"):
        fpx_triton.fpx_linear_triton(x, p, config={"gluon": True, "split": 1})


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize(
    "fmt,n,k,m,dtype,split",
    [("e3m2", 128, 256, 1, torch.float16, 1), ("e3m2", 200, 512, 20, torch.bfloat16, 2),
     ("e3m2", 1000, 1024, 70, torch.float16, 4), ("e3m2", 384, 1024, 130, torch.bfloat16, 1),
     ("e3m2", 256, 512, 300, torch.float16, 3), ("e2m2", 200, 1024, 5, torch.float16, 2),
     ("e3m1", 1000, 768, 40, torch.bfloat16, 3)],
)  # fmt: skip
@pytest.mark.parametrize("warps", [4, 8])
def test_cuda_kernel_matches_reference(fmt, n, k, m, dtype, split, warps):
    """Partial column tiles (200, 1000 channels), partial token tiles, split-K in one
    kernel (deterministic, counters left at 0) and with fp32 atomics, bias, fp16 and
    bf16, one or two warpgroups; and the tuned path gives the same product."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    p = fpx.pack(torch.randn(n, k, generator=gen, device="cuda"), fmt)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    want = x.double() @ fpx.unpack(p).double().t() + bias.double()
    got = fpx_gluon.fpx_linear_gluon(x, p, bias, split=split, warps=warps)
    assert got.dtype == dtype and got.shape == (m, n)
    assert fpx_gluon.fpx_linear_gluon(x[:0], p, bias).shape == (0, n)
    assert _rel(got, want) <= 1e-2
    assert torch.equal(got, fpx_gluon.fpx_linear_gluon(x, p, bias, split=split, warps=warps))
    atomic = fpx_gluon.fpx_linear_gluon(x, p, bias, split=split, warps=warps, atomic=True)
    assert _rel(atomic, want) <= 1e-2
    torch.cuda.synchronize()
    counters = COUNTERS.get((str(x.device), torch.cuda.current_stream().cuda_stream))
    assert counters is None or not counters.any()
    cfg = {"gluon": True, "split": split, "stages": 6, "warps": warps}
    assert _rel(fpx_triton.fpx_linear_triton(x, p, bias, config=cfg), want) <= 1e-2
    assert _rel(fpx_triton.fpx_linear_hopper(x, p, bias), want) <= 1e-2


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize(
    "inter,k,m,dtype,split,warps",
    [(128, 256, 1, torch.bfloat16, 4, 4), (320, 512, 5, torch.float16, 3, 4),
     (256, 1024, 16, torch.bfloat16, 1, 8), (4096, 4096, 1, torch.bfloat16, 4, 4)],
)  # fmt: skip
def test_swiglu_epilogue_equals_silu_of_the_product(inter, k, m, dtype, split, warps):
    """[Note: the SwiGLU epilogue]: silu(gate) * up of the fp64 product (bias included),
    the same bits on a second launch, the stream's counters back at 0; also through
    ``fused_swiglu`` (the tuned launch), which declines only where tuning chose another
    kernel."""
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(11)
    p = fpx.pack(torch.randn(2 * inter, k, generator=gen, device="cuda") * 0.05, "e3m2")
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(2 * inter, generator=gen, device="cuda").to(dtype)
    full = x.double() @ fpx.unpack(p).double().t() + bias.double()
    want = F.silu(full[:, :inter]) * full[:, inter:]
    got = fpx_gluon.fpx_linear_gluon(x, p, bias, split=split, warps=warps, swiglu=True)
    assert got.shape == (m, inter) and got.dtype == dtype
    assert _rel(got, want) <= 1e-2
    again = fpx_gluon.fpx_linear_gluon(x, p, bias, split=split, warps=warps, swiglu=True)
    assert torch.equal(got, again)
    torch.cuda.synchronize()
    counters = COUNTERS.get((str(x.device), torch.cuda.current_stream().cuda_stream))
    assert counters is None or not counters.any()
    tuned = fpx_triton.fused_swiglu(x, p, bias)
    assert tuned is None or _rel(tuned, want) <= 1e-2
    torch.cuda.synchronize()
    assert counters is None or not counters.any()  # whichever kernel tuning chose


def _counters_clear() -> bool:
    torch.cuda.synchronize()
    counters = COUNTERS.get((str(torch.device("cuda", torch.cuda.current_device())),
                             torch.cuda.current_stream().cuda_stream))  # fmt: skip
    return counters is None or not counters.any()


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("inter,m,split", [(4096, 1, 4), (14336, 1, 1), (4096, 5, 8)])
def test_split_k_over_many_waves_gives_the_same_bits_every_launch(swiglu, inter, m, split):
    """gate_up weights of I = 4096 and 14336 (Llama-3-8B's) at small batch, with grids
    of 448 to 1,024 programs, more than one per SM. Every launch gives the same
    bits and leaves the stream's counters at 0, the plain product and the SwiGLU
    epilogue. On an H100 (2026-12-05) all three differed by 8-1,500 outputs between
    launches at 4 warps, with and without split-K (split 1 too): a warp's copies
    refilled a ring slot under another warp's MMA ([Note: refilling a slot the MMA
    read])."""
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(5)
    k = 4096
    p = fpx.pack(torch.randn(2 * inter, k, generator=gen, device="cuda") * 0.05, "e3m2")
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    assert _counters_clear()
    outs = []
    for _ in range(8):
        outs.append(fpx_gluon.fpx_linear_gluon(x, p, split=split, warps=4, swiglu=swiglu))
        assert _counters_clear()
    full = x.double() @ fpx.unpack(p).double().t()
    want = F.silu(full[:, :inter]) * full[:, inter:] if swiglu else full
    assert _rel(outs[0], want) <= 1e-2
    differing = [int((o != outs[0]).sum()) for o in outs[1:]]
    assert differing == [0] * len(differing)


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("bn,split", [(32, 1), (32, 4), (64, 2), (64, 4)])
def test_triton_swiglu_epilogue_on_the_gpu(bn, split):
    """The Triton kernel's SwiGLU epilogue compiled (not interpreted): silu(gate) * up of
    the fp64 product, the same bits on every launch, the counters at 0 after each."""
    import torch.nn.functional as F

    from fscale.kernels import _fpx_triton_kernel

    gen = torch.Generator(device="cuda").manual_seed(7)
    inter, k, m = 1024, 2048, 3
    p = fpx.pack(torch.randn(2 * inter, k, generator=gen, device="cuda") * 0.05, "e3m2")
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.float16)
    bias = torch.randn(2 * inter, generator=gen, device="cuda").to(torch.float16)
    full = x.double() @ fpx.unpack(p).double().t() + bias.double()
    want = F.silu(full[:, :inter]) * full[:, inter:]
    cfg = dict(bm=16, bn=bn, split=split, num_warps=4, num_stages=3)
    assert _counters_clear()
    outs = []
    for _ in range(4):
        y = torch.empty(m, inter, dtype=x.dtype, device="cuda")
        _fpx_triton_kernel.launch(x, p, bias, y, mode=2, swiglu=True, **cfg)
        outs.append(y)
        assert _counters_clear()
    assert _rel(outs[0], want) <= 1e-2
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.gpu
@on_hopper
@needs_gluon
def test_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch):
    """Each launch reads what the one before wrote (a PDL norm, then fp6 products with
    one-kernel split-K sharing the stream's counters): captured with PDL the chain gives
    the bits of the chain launched without it, and of itself run eagerly."""
    from fscale.kernels import fused_decoder as fd
    from tests.kernels.test_gemv import captured_chain_ignores_pdl

    gen = torch.Generator(device="cuda").manual_seed(5)
    ps = [fpx.pack(torch.randn(4096, 4096, generator=gen, device="cuda") * 0.02, "e3m2")]
    ps.append(fpx.pack(torch.randn(4096, 4096, generator=gen, device="cuda") * 0.02, "e2m2"))
    norm_w = torch.rand(4096, generator=gen, device="cuda").to(torch.bfloat16)
    x0 = torch.randn(1, 4096, generator=gen, device="cuda").to(torch.bfloat16)

    def chain():
        res, x = x0, None
        for p in ps * 2:
            res, h = fd.add_rms_norm_triton(res, x, norm_w, 1e-6)
            x = fpx_gluon.fpx_linear_gluon(h, p, split=4)
        return x

    captured_chain_ignores_pdl(chain, monkeypatch)
    assert not COUNTERS or all(int(c.abs().sum()) == 0 for c in COUNTERS.values())
