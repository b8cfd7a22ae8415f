"""fp6/fp5 linear for Hopper in Gluon: the rebuilt weights are wgmma's register operand.

Usage: ``y = fpx_linear_gluon(x, fpx.pack(w, "e3m2"))`` on sm_90 with fp16/bf16 x and a
"byte"-image format (e3m2, e2m2, e3m1: ``FORMATS``). In the kernel table it is the
lowering ``"fpx_linear_gluon"`` (sm_90; ``fpx_triton.fpx_linear_hopper``), whose
tuning times this kernel's launches (``{"gluon": True}`` candidates) beside the
Triton kernel's wherever ``available`` says it can run. GPU only (Gluon has no
interpreter): CPU tests compile it for sm_90 and read the PTX, and run its integer
rebuild in torch; the Triton kernel serves every other format and GPU.

[Note: weights as the register operand]
y^T = W x^T: a program's 64 output channels are the warpgroup MMA's M side, taken from
registers, and x^T (BNT = 8..256 tokens) its N side, from shared memory. The weights
never touch shared memory, and a few tokens cost a 64 x 8 MMA, not a 16- or 64-row
tile of padding. Each chunk's MMA is retired before the next chunk is rebuilt ([Note:
an MMA reads its A registers until it retires]); co-resident programs hide its latency.
Layout: thread (warp w, lane 4g + t) must hold A[row, k] for rows 16w + g (+8) and k
pairs (2t, 2t+1), (2t+8, 2t+9) of each 16-row sub-tile. Row 16w + 8h + g is channel
2(c0 + 8w + g) + h, so the two halves of a plane word (channels 2c, 2c+1) are the
thread's two rows; the thread reads plane rows 2t + e + 8i of word column 8w + g
(``plane_regs``), rebuilds a masked byte word per (row, sub-tile) as the Triton kernel
does, and one PRMT per A register takes the image bytes of rows 2t and 2t+1 for one
channel (selectors 0x4501 / 0x6723 when the images sit in bytes 0 and 2, 0x5410 /
0x7632 in bytes 1 and 3: that also replaces the shift the Triton kernel needed). The
8 sub-tiles of a 128-row chunk are joined along K into one [64, 128] operand whose
layout *is* the MMA's (``convert_layout(..., assert_trivial=True)`` proves it at
compile time). Planes and x come by 16-byte cp.async into a STAGES-deep ring; plane
rows are XOR-swizzled so the 4 rows a warp reads at once hit different banks.
A program of two warpgroups (``warps=8``) covers 128 channels with one x tile: x is
re-read from L2 once per channel tile, M/24 times the plane bytes at 64 channels (at
M=128, 5x), which is what bounds M >= 32. Split-K sums partials in one kernel, as the
Triton kernel does ([Note: split-K without extra kernels] in _fpx_triton_kernel.py).
fp5 (e2m2, e3m1: 1 lo bit, 256-row chunks) runs the same walk over two 128-row halves
of a chunk, one MMA each.

[Note: the SwiGLU epilogue]
For a Llama MLP's stacked [gate; up] weight (2I rows) the product can end in
silu(gate) * up instead of writing 2I outputs for a separate kernel (at batch 1 that
kernel's launch is ~2-3 us of a ~80 us layer). The programs are unchanged; their
split-K arrival counts a gate tile and the up tile of the same channels (program
pid_n and pid_n + half) as one tile, so the last of those 2 x split programs holds
every partial of both, sums each in order from the workspace and writes
silu(g) * u: the same sums as the plain launch, then the SiLU in fp32. I must be a
multiple of a program's channels so no program straddles gate and up.
Instruction counts, measurements and what is left: README.md here.
"""

from __future__ import annotations

import torch

from fscale.kernels import fpx as _fpx
from fscale.kernels._triton import pdl, split_workspace

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # cp.async into shared memory: renamed after triton 3.6 (the GPU machines' version).
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # bar.sync of the CTA
except ImportError:  # no triton, or one without Gluon's Hopper module
    gluon = gl = None

FORMATS = ("e3m2", "e2m2", "e3m1")  # the "byte"-image formats: fp6 and both fp5
#: PRMT selectors [v][h]: the image bytes of sub-tile 2q + v, channel 2c + h, of k rows
#: 2p' and 2p' + 1 into the high bytes of an A register's two fp16 halves (bytes 0, 2
#: hold v = 0, bytes 1, 3 hold v = 1; selector nibble i names the source byte of byte i).
SELECTORS = ((0x4501, 0x6723), (0x5410, 0x7632))
if gl is not None:
    KC = gl.constexpr(128)  # rows of K per MMA: an fp6 chunk, half an fp5 chunk
    _SEL = gl.constexpr(SELECTORS)


def _prmt_and(a, b, selector: gl.constexpr, keep: gl.constexpr):
    """prmt(a, b, selector) & keep, in one asm block: written as two operations the
    compiler narrows the AND to 16-bit halves and repacks them (3 more per word)."""
    return gl.inline_asm_elementwise(
        f"{{ prmt.b32 $0, $1, $2, {selector}; and.b32 $0, $0, {keep}; }}", "=r,r,r", [a, b],
        dtype=gl.uint32, is_pure=True, pack=1,
    )  # fmt: skip


_prmt_and = gluon.jit(_prmt_and) if gluon is not None else None


def _bitselect(a, b, mask: gl.constexpr):
    """(a & mask) | (b & ~mask) in one LOP3 (the compiler makes two of the plain form)."""
    return gl.inline_asm_elementwise(
        f"lop3.b32 $0, $1, $2, {mask}, 0xE4;", "=r,r,r", [a, b], dtype=gl.uint32,
        is_pure=True, pack=1,
    )  # fmt: skip


_bitselect = gluon.jit(_bitselect) if gluon is not None else None


def _sub_tile(both, V: gl.constexpr, HI_MASK: gl.constexpr, LO_MASK: gl.constexpr):
    """[16 rows r, 8 W columns] byte words -> [8 (k pair), 8 W, 2 (half)] A-operand words
    of sub-tile 2q + V: half h holds channel 2c + h at rows (2p', 2p' + 1) of the pair.
    ``both`` has each byte's hi-plane bits and lo-plane bits elsewhere; the PRMT moves
    the image bytes of sub-tile V to the fp16 high bytes and one AND keeps their image
    bits (zeroing the low bytes): after the PRMT, so the compiler cannot split it into
    two masks again."""
    keep: gl.constexpr = ((HI_MASK | LO_MASK) & 0xFF) * 0x01000100
    # rows r = 2 p' + e: the two rows of a k pair are in one thread.
    e0, e1 = gl.split(gl.permute(gl.reshape(both, [8, 2, both.shape[1]]), [0, 2, 1]))
    h0 = _prmt_and(e0, e1, _SEL[V][0], keep)
    h1 = _prmt_and(e0, e1, _SEL[V][1], keep)
    return gl.join(h0, h1)


_sub_tile = gluon.jit(_sub_tile) if gluon is not None else None


def _quarter(
    h, lo, Q: gl.constexpr, LB: gl.constexpr, HI_MASK: gl.constexpr, LO_MASK: gl.constexpr
):
    """Sub-tiles 2Q and 2Q + 1 from a hi tile (codes of q = 2 qh + ql) and the lo tile
    (``LB`` bits per code)."""
    hq = h
    if Q % 2 == 1:
        hq = (h << 28) | (h >> 4)
    lq = lo
    if Q > 0:
        lq = (lo << (LB * Q)) | (lo >> (32 - LB * Q))
    # One bit-select (a LOP3) serves both sub-tiles: (hq & HI) | (lq & LO) per byte is
    # (hq & HI | lq & ~HI) & (HI | LO), and the & comes after the PRMT (``_sub_tile``).
    both = _bitselect(hq, lq, HI_MASK)
    return gl.join(_sub_tile(both, 0, HI_MASK, LO_MASK), _sub_tile(both, 1, HI_MASK, LO_MASK))


_quarter = gluon.jit(_quarter) if gluon is not None else None


def _plane_layout(rows, W):
    """Plane words [rows, 8 W]: thread (warp w, lane 4g + t) holds rows 2t + e + 8i
    (+ 16 qh) of column 8w + g, the rows of its A-operand k pairs."""
    regs = [[1, 0], [8, 0]] + ([[16, 0]] if rows == 32 else [])
    return gl.DistributedLinearLayout(
        reg_bases=regs, lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 8 << i] for i in range(W.bit_length() - 1)], block_bases=[],
        shape=[rows, 8 * W],
    )  # fmt: skip


def _copy_layout(width, elems, W):
    """Coalesced cp.async of a [rows, width] tile, ``elems`` per thread and copy."""
    cols = width // elems
    return gl.BlockedLayout([1, elems], [32 // cols, cols], [W, 1], [1, 0])


if gluon is not None:
    _plane_layout = gluon.constexpr_function(_plane_layout)
    _copy_layout = gluon.constexpr_function(_copy_layout)


def _fill_planes(
    hi_s, lo_s, hi_ptr, lo_ptr, b, slot, live, rows32, rows16, cols, col_ok, c0, NW,
    HALVES: gl.constexpr,
):  # fmt: skip
    """cp.async chunk b's plane tiles into ring slot ``slot`` (not committed)."""
    for hf in gl.static_range(HALVES):
        hp = hi_ptr + (b * (32 * HALVES) + 32 * hf + rows32)[:, None] * NW + (c0 + cols)[None, :]
        _async_load(hi_s.index(slot * HALVES + hf), hp, mask=col_ok[None, :] & live)
    lp = lo_ptr + (b * 16 + rows16)[:, None] * NW + (c0 + cols)[None, :]
    _async_load(lo_s.index(slot), lp, mask=col_ok[None, :] & live)


def _fill_x(x_s, x_ptr, b, slot, live, xm, xk, x_ok, m0, stride_xm, HALVES: gl.constexpr):
    """cp.async chunk b's x tiles into ring slot ``slot`` (not committed)."""
    for hf in gl.static_range(HALVES):
        xk_b = b * (128 * HALVES) + 128 * hf + xk
        xp = x_ptr + (m0 + xm)[:, None] * stride_xm + xk_b[None, :]
        _async_load(x_s.index(slot * HALVES + hf), xp, mask=x_ok[:, None] & live)


def _wait_for_previous_kernel():
    """``griddepcontrol.wait`` ([Note: programmatic dependent launch] in _triton.py;
    Gluon has no wrapper for it). The memory clobber keeps loads after it."""
    gl.inline_asm_elementwise(
        "griddepcontrol.wait; // $0", "=r,~{memory}", [], dtype=gl.int32, is_pure=False, pack=1
    )


def _let_next_kernel_launch():
    """``griddepcontrol.launch_dependents``: the next PDL kernel may start."""
    gl.inline_asm_elementwise(
        "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


if gluon is not None:
    _fill_planes = gluon.jit(_fill_planes)
    _fill_x = gluon.jit(_fill_x)
    _wait_for_previous_kernel = gluon.jit(_wait_for_previous_kernel)
    _let_next_kernel_launch = gluon.jit(_let_next_kernel_launch)


def _kernel(
    x_ptr, hi_ptr, lo_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, NW, K, stride_xm, stride_ym, chunks_per_prog, exp_scale,
    BNT: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
    HI_MASK: gl.constexpr, LO_MASK: gl.constexpr, X_BF16: gl.constexpr, W: gl.constexpr,
    LB: gl.constexpr, NQ: gl.constexpr, PDL: gl.constexpr, SWIGLU: gl.constexpr = False,
):  # fmt: skip
    CH: gl.constexpr = 16 * W  # channels: 64 per warpgroup, one x tile for all of them
    # A chunk is NQ / 4 halves of 128 rows of K (fp6: 1, fp5: 2), one MMA each.
    HALVES: gl.constexpr = NQ // 4
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    c0 = pid_n * (8 * W)
    m0 = pid_m * BNT
    chunk0 = pid_k * chunks_per_prog
    n_chunks = gl.minimum(chunks_per_prog, K // (KC * HALVES) - chunk0)

    plane_regs: gl.constexpr = _plane_layout(32, W)
    lo_regs: gl.constexpr = _plane_layout(16, W)
    # Banks: row r's 8-word groups are XOR-swizzled by (r / 2) % 4, so the 4 rows a
    # warp reads at once (t = 0..3) hit 4 different groups of 8 banks.
    plane_smem: gl.constexpr = gl.SwizzledSharedLayout(8, 2, 4, order=[1, 0])
    copy_layout: gl.constexpr = _copy_layout(8 * W, 4, W)
    x_copy: gl.constexpr = _copy_layout(KC, min(8, BNT * KC // (32 * W)), W)
    x_dtype: gl.constexpr = gl.bfloat16 if X_BF16 else gl.float16
    x_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BNT, KC], x_dtype)
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BNT, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)

    hi_s = gl.allocate_shared_memory(gl.int32, [STAGES * HALVES, 32, 8 * W], plane_smem)
    lo_s = gl.allocate_shared_memory(gl.int32, [STAGES, 16, 8 * W], plane_smem)
    x_s = gl.allocate_shared_memory(x_dtype, [STAGES * HALVES, BNT, KC], x_smem)

    rows32 = gl.arange(0, 32, layout=gl.SliceLayout(1, copy_layout))
    rows16 = gl.arange(0, 16, layout=gl.SliceLayout(1, copy_layout))
    cols = gl.arange(0, 8 * W, layout=gl.SliceLayout(0, copy_layout))
    col_ok = (c0 + cols) < NW
    xm = gl.arange(0, BNT, layout=gl.SliceLayout(1, x_copy))
    xk = gl.arange(0, KC, layout=gl.SliceLayout(0, x_copy))
    x_ok = (m0 + xm) < M

    # Prologue: chunks 0 .. STAGES - 2 in flight (empty groups past the end). Their
    # planes (weights: no kernel of a step writes them) are requested before the wait
    # on the previous kernel, x after it ([Note: programmatic dependent launch] in
    # _triton.py); the first group holds all of those planes and chunk 0's x.
    for st in gl.static_range(STAGES - 1):
        _fill_planes(
            hi_s, lo_s, hi_ptr, lo_ptr, chunk0 + st, st, st < n_chunks, rows32, rows16, cols,
            col_ok, c0, NW, HALVES,
        )  # fmt: skip
    if PDL:
        _wait_for_previous_kernel()
        _let_next_kernel_launch()
    for st in gl.static_range(STAGES - 1):
        _fill_x(x_s, x_ptr, chunk0 + st, st, st < n_chunks, xm, xk, x_ok, m0, stride_xm, HALVES)
        async_copy.commit_group()

    acc = gl.zeros([CH, BNT], gl.float32, layout=mma)
    for it in range(n_chunks):
        slot = it % STAGES
        async_copy.wait_group(STAGES - 2)
        # [Note: x reaches the MMA through the async proxy] cp.async wrote x through the
        # generic proxy and wgmma reads it through the async one, each warp's part of
        # the MMA on its own (its sub-partition's tensor core, its own rows, the shared
        # x). So every writer fences its own copies *before* the barrier, which then
        # publishes them to every warp's MMA (a fence after the barrier orders only the
        # fencing thread's copies: another warp's MMA may read x before they are
        # visible to the async proxy).
        fence_async_shared()
        _barrier()  # every thread's copies of chunk `it` have landed
        lo = lo_s.index(slot).load(lo_regs).to(gl.uint32, bitcast=True)
        for hf in gl.static_range(HALVES):
            hi = hi_s.index(slot * HALVES + hf).load(plane_regs).to(gl.uint32, bitcast=True)
            h0, h1 = gl.split(gl.permute(gl.reshape(hi, [2, 16, 8 * W]), [1, 2, 0]))
            h0 = gl.convert_layout(h0, lo_regs, assert_trivial=True)
            h1 = gl.convert_layout(h1, lo_regs, assert_trivial=True)
            # Sub-tile s = 2q + v (q = 4 hf + 2 qh + ql) stacked along K as
            # [8 p, 8 W c, 2 h, s0 = v, s1 = ql, s2 = qh].
            q01 = gl.join(
                _quarter(h0, lo, 4 * hf, LB, HI_MASK, LO_MASK),
                _quarter(h0, lo, 4 * hf + 1, LB, HI_MASK, LO_MASK),
            )
            q23 = gl.join(
                _quarter(h1, lo, 4 * hf + 2, LB, HI_MASK, LO_MASK),
                _quarter(h1, lo, 4 * hf + 3, LB, HI_MASK, LO_MASK),
            )
            words = gl.join(q01, q23)
            words = gl.reshape(words, [8, W, 8, 2, 2, 2, 2])  # p, w, g, h, s0, s1, s2
            words = gl.permute(words, [1, 3, 2, 6, 5, 4, 0])  # w, h, g, s2, s1, s0, p
            words = gl.reshape(words, [CH, KC // 2])
            lo16 = (words & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True)
            hi16 = (words >> 16).to(gl.uint16).to(gl.float16, bitcast=True)
            a = gl.reshape(gl.join(lo16, hi16), [CH, KC])
            a = gl.convert_layout(a, a_layout, assert_trivial=True)
            if X_BF16:
                a = a.to(gl.bfloat16)
            xt = x_s.index(slot * HALVES + hf).permute((1, 0))
            acc = warpgroup_mma(a, xt, acc, is_async=True)
            # [Note: an MMA reads its A registers until it retires] wgmma reads its
            # register operand asynchronously, but ptxas treats those registers as free
            # once the instruction issues, and `deps` keeps alive only the unpacked
            # values, not the packed words the MMA reads. With the MMA left in flight
            # across the next chunk's rebuild (a wait for all but one), the rebuild wrote
            # its registers (SASS: LOP3/LDS into the HGMMA's A registers before the
            # DEPBAR that retired it): a few programs' outputs were wrong and
            # launch-dependent on multi-wave grids (H100, 2026-12-06). So the MMA is
            # retired here, before any instruction can reuse them.
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # [Note: refilling a slot the MMA read] The copies below overwrite the slot of
        # chunk it - 1, which every warp's part of that chunk's MMA read; a warp's wait
        # above retires only its own part, so no thread may copy until every warp has
        # waited (no time measurable at M = 1 on an H100).
        _barrier()
        nxt = it + STAGES - 1
        live = nxt < n_chunks
        _fill_planes(
            hi_s, lo_s, hi_ptr, lo_ptr, chunk0 + nxt, nxt % STAGES, live, rows32, rows16, cols,
            col_ok, c0, NW, HALVES,
        )  # fmt: skip
        _fill_x(x_s, x_ptr, chunk0 + nxt, nxt % STAGES, live, xm, xk, x_ok, m0, stride_xm, HALVES)
        async_copy.commit_group()
    async_copy.wait_group(0)

    # Row rho = 16 w + 8 h + g is channel 2 (c0 + 8 w + g) + h (w: warp 0 .. W - 1).
    rho = gl.arange(0, CH, layout=gl.SliceLayout(1, mma))
    ch = 2 * (c0 + 8 * (rho // 16) + rho % 8) + (rho // 8) % 2
    ch_ok = ch < N
    tok = m0 + gl.arange(0, BNT, layout=gl.SliceLayout(0, mma))
    scale = gl.load(s_ptr + ch, mask=ch_ok, other=0.0) * exp_scale
    out = acc * scale[:, None]
    mask = ch_ok[:, None] & (tok < M)[None, :]
    if SPLIT == 2:
        # [Note: split-K without extra kernels] (_fpx_triton_kernel.py): the partial goes to
        # the workspace; the last of the tile's programs to arrive sums them in order.
        gl.store(ws_ptr + (pid_k * M + tok[None, :]) * N + ch[:, None], out, mask=mask)
        _barrier()  # every thread's partial is stored before the release below
        if SWIGLU:
            # [Note: the SwiGLU epilogue]: a gate tile and the up tile of the same
            # channels count as one tile; the last of their programs writes silu(g) * u.
            half = gl.num_programs(0) // 2
            tile = pid_m * half + pid_n % half
            parts = 2 * gl.num_programs(2)
        else:
            tile = pid_m * gl.num_programs(0) + pid_n
            parts = gl.num_programs(2)
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if SWIGLU and arrived == parts - 1:
            inter = N // 2
            chg = ch % inter  # this tile's gate channels (an up tile's, less N / 2)
            gmask = (chg < inter)[:, None] & (tok < M)[None, :]
            gate = gl.zeros([CH, BNT], gl.float32, layout=mma)
            up = gl.zeros([CH, BNT], gl.float32, layout=mma)
            for part in range(gl.num_programs(2)):
                ws = ws_ptr + (part * M + tok[None, :]) * N + chg[:, None]
                gate += gl.load(ws, mask=gmask, other=0.0, cache_modifier=".cg")
                up += gl.load(ws + inter, mask=gmask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                gate += gl.load(b_ptr + chg, mask=chg < inter, other=0.0).to(gl.float32)[:, None]
                up += gl.load(b_ptr + inter + chg, mask=chg < inter, other=0.0).to(gl.float32)[
                    :, None
                ]
            act = gate / (1.0 + gl.exp(-gate)) * up
            ptrs = y_ptr + tok[None, :] * stride_ym + chg[:, None]
            gl.store(ptrs, act.to(y_ptr.dtype.element_ty), mask=gmask)
            gl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch
        if not SWIGLU and arrived == parts - 1:
            total = gl.zeros([CH, BNT], gl.float32, layout=mma)
            for part in range(gl.num_programs(2)):
                ws = ws_ptr + (part * M + tok[None, :]) * N + ch[:, None]
                total += gl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += gl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(gl.float32)[:, None]
            ptrs = y_ptr + tok[None, :] * stride_ym + ch[:, None]
            gl.store(ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            gl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            bias = gl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(gl.float32)
            out = out + gl.where(pid_k == 0, 1.0, 0.0) * bias[:, None]
        ptrs = y_ptr + tok[None, :] * stride_ym + ch[:, None]
        if SPLIT == 1:
            gl.atomic_add(ptrs, out, mask=mask)  # into a zeroed fp32 y
        else:
            gl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


_kernel = gluon.jit(_kernel) if gluon is not None else None


def available(x: torch.Tensor, fmt: str) -> bool:
    """Whether this kernel can run x @ W^T for a ``fmt`` weight (Hopper, fp16/bf16)."""
    return (
        gluon is not None
        and fmt in FORMATS
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(x.device)[0] == 9
    )


def tokens_per_program(m: int) -> int:
    """The MMA's N: the tokens a program covers (a multiple of 8, at most 256)."""
    return min(256, max(8, 1 << (m - 1).bit_length()))


def fpx_linear_gluon(
    x, p, bias=None, *, split: int = 1, stages: int = 4, bnt: int | None = None,
    atomic: bool = False, warps: int = 4, swiglu: bool = False,
):  # fmt: skip
    """y = x @ W^T (+ bias) for a packed ``FORMATS`` weight ``p`` on Hopper.

    Usage: ``y = fpx_linear_gluon(x, fpx.pack(w, "e3m2"), split=4)``; ``split`` programs
    along K sum their partials in one kernel (the last to arrive adds them in order),
    or with ``atomic`` add them into a zeroed fp32 y (then a cast). A program covers
    16 ``warps`` channels (4 or 8 warps: one or two warpgroups sharing one x tile).
    ``swiglu``: ``p`` stacks gate over up ([2I, K]); returns silu(x Wg^T) * (x Wu^T)
    ``[M, I]`` from the split-K epilogue ([Note: the SwiGLU epilogue]; ``swiglu_fits``).
    """
    if warps not in (4, 8):
        raise ValueError(f"fpx_linear_gluon: warps={warps}; use 4 or 8 (whole warpgroups).")
    if p.fmt not in FORMATS:
        raise ValueError(
            f"fpx_linear_gluon: format {p.fmt!r} is not one of {FORMATS}; use "
            "fpx_linear_triton (it serves every format)."
        )
    n, k = p.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8:  # rows of 16-byte cp.async copies
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m = x2.shape[0]
    if swiglu and not swiglu_fits(p, warps):
        raise ValueError(
            f"fpx_linear_gluon: swiglu needs a [2I, K] weight whose I ({n // 2}) is a "
            f"multiple of the {16 * warps} channels a program covers (no padding); use "
            "the product, then silu(gate) * up."
        )
    out_n = n // 2 if swiglu else n
    if m == 0:
        return x.new_empty(*x.shape[:-1], out_n)
    bnt = bnt or tokens_per_program(m)
    lay = _fpx.layout(p.fmt)
    halves = lay["nq"] // 4
    # Shared memory per stage: per 128 rows of K x's [bnt, 128] tile and 1 KB of hi
    # plane per warp, and 512 B of lo plane per warp; keep under ~200 KB.
    stage_bytes = halves * (bnt * 256 + 1024 * warps) + 512 * warps
    stages = max(2, min(stages, 200 * 1024 // stage_bytes))
    chunks = k // lay["k_chunk"]
    per = -(-chunks // max(1, min(split, chunks)))
    grid = (-(-(n // 2) // (8 * warps)), -(-m // bnt), -(-chunks // per))
    mode = 2 if swiglu else 0 if grid[2] == 1 else 1 if atomic else 2
    if mode == 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    ws, counters = split_workspace(mode, y, grid, shape=(m, n))
    pl = _fpx.planes(p.fmt)
    on = pdl(x.device)
    _kernel[grid](
        x2, p.hi, p.lo, p.scales, bias if bias is not None else p.scales, y, ws, counters,
        m, n, n // 2, k, x2.stride(0), y.stride(0), per,
        float(2.0 ** (15 - _fpx.bias(p.fmt))),
        BNT=bnt, STAGES=stages, SPLIT=mode, HAS_BIAS=bias is not None,
        HI_MASK=pl["hi_mask"] * 0x01010101, LO_MASK=pl["lo_mask"] * 0x01010101,
        X_BF16=x.dtype == torch.bfloat16, W=warps, LB=lay["lo_bits"], NQ=lay["nq"],
        PDL=on, SWIGLU=swiglu, num_warps=warps, launch_pdl=on,
    )  # fmt: skip
    if mode == 1:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_n)


def swiglu_fits(p, warps: int = 4) -> bool:
    """Whether ``fpx_linear_gluon(..., swiglu=True)`` takes ``p``: gate and up tiles never
    share a program (I a multiple of its channels; ``p`` unpadded: its rows are 2I)."""
    n = p.shape[0]
    return n % 2 == 0 and (n // 2) % (16 * warps) == 0
