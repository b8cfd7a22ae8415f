"""Fused elementwise pieces of a Llama-style decoder layer (the serving engine's decode).

Three ops in the kernel table, each a torch reference (``device="any"``, the exact
math of the eager decoder) and a Triton kernel for CUDA:

- ``add_rms_norm(x, delta, weight, eps) -> (residual, h)``: ``residual = x + delta``
  (rounded to x's dtype; ``delta=None`` skips the add), ``h = weight * rms_norm(residual)``
  with the norm in fp32 and rounded to x's dtype before the weight multiply (as the
  eager decoder and HF Llama do). One kernel instead of ~8.
- ``rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, *, H, KVH, D)
  -> q``: splits the fused qkv projection ``[T, (H + 2 KVH) D]``, rotates q and k
  (HF's rotate_half convention, fp32, ``cos``/``sin`` ``[max_pos, D/2]`` fp32), returns q
  ``[T, H, D]`` and writes rotated k and v into the paged caches at ``slot_mapping``.
  One kernel instead of ~20 (indexing, casts, chunk/cat, index_copy).
- ``silu_mul(gate_up) -> silu(gate) * up`` over ``[T, 2I]`` -> ``[T, I]``.

Every lowering takes the same arguments; the decoder resolves each op once. On CPU the
Triton kernels run only under ``TRITON_INTERPRET=1`` (tests)::

    res, h = add_rms_norm_triton(x, d, w, 1e-5)
    q = rope_kv_write_triton(qkv, pos, cos, sin, kc, vc, slots, H=32, KVH=8, D=128)

``self_check(device, dtype, ...)`` runs each resolved lowering against its reference at
the given shapes and returns the names of those that disagree (the decoder falls back
to its eager path, with a warning, when any does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fscale.hw import dispatch
from fscale.kernels._triton import LazyJit, gdc_launch_dependents, gdc_wait, pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

ADD_RMS_NORM = "add_rms_norm"
ROPE_KV_WRITE = "rope_kv_write"
SILU_MUL = "silu_mul"
OPS = (ADD_RMS_NORM, ROPE_KV_WRITE, SILU_MUL)


# -- references (the eager decoder's math) -------------------------------------------------


def add_rms_norm_reference(x, delta, weight, eps):
    res = x if delta is None else x + delta
    y = F.rms_norm(res.float(), (res.shape[-1],), eps=eps)
    return res, weight * y.to(res.dtype)


def _rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_kv_write_reference(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, *, H, KVH, D):
    T = qkv.shape[0]
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    q, k = _rotate(q.view(T, H, D), c, s), _rotate(k.view(T, KVH, D), c, s)
    slots = slot_mapping.long()
    k_cache.view(-1, KVH, D).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, KVH, D).index_copy_(0, slots, v.view(T, KVH, D).to(v_cache.dtype))
    return q


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- Triton kernels ------------------------------------------------------------------------
# Sums are tl.reduce with triton's own combine function and constants tl.full, not
# tl.sum / tl.zeros (@jit helpers): the interpreter recognises them even when
# TRITON_INTERPRET was switched on after triton was imported (see paged_attention.py).


def _add_rms_norm_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    res_ptr,
    h_ptr,
    N,
    eps,
    stride_x,
    stride_d,
    stride_r,
    stride_h,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)  # a weight: before the wait
    if PDL:  # [Note: programmatic dependent launch] in _triton.py
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + cols, mask=m, other=0.0).to(tl.float32)
        s = (x + d).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, s, mask=m)
        x = s.to(tl.float32)
    ms = tl.reduce(x * x, 0, tl.standard._sum_combine) / N
    rstd = 1.0 / tl.sqrt(ms + eps)
    y = (x * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (w * y).to(h_ptr.dtype.element_ty), mask=m)


def _rope_kv_write_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    stride_qkv,
    stride_cos,
    stride_qt,
    stride_qh,
    stride_slot,
    stride_kh,
    H: tl.constexpr,
    KVH: tl.constexpr,
    HALF: tl.constexpr,
    HALFP: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # [Note: programmatic dependent launch] in _triton.py
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1)
    D = 2 * HALF
    i = tl.arange(0, HALFP)
    m = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cos + i, mask=m, other=0.0)
    s = tl.load(sin_ptr + pos * stride_cos + i, mask=m, other=0.0)
    base = qkv_ptr + t * stride_qkv + hd * D
    x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if hd < H:
        dst = q_ptr + t * stride_qt + hd * stride_qh
        # Round to q's dtype as the eager path does (a no-op when q is fp32).
        tl.store(dst + i, o1.to(qkv_ptr.dtype.element_ty).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + i, o2.to(qkv_ptr.dtype.element_ty).to(q_ptr.dtype.element_ty), mask=m)
    else:
        kh = hd - H
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = k_ptr + slot * stride_slot + kh * stride_kh
        tl.store(dst + i, o1.to(qkv_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + i, o2.to(qkv_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty), mask=m)
        vsrc = qkv_ptr + t * stride_qkv + (H + KVH + kh) * D
        vdst = v_ptr + slot * stride_slot + kh * stride_kh
        v1 = tl.load(vsrc + i, mask=m, other=0.0)
        v2 = tl.load(vsrc + HALF + i, mask=m, other=0.0)
        tl.store(vdst + i, v1.to(v_ptr.dtype.element_ty), mask=m)
        tl.store(vdst + HALF + i, v2.to(v_ptr.dtype.element_ty), mask=m)


def _silu_mul_kernel(
    gu_ptr, out_ptr, N, stride_gu, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    if PDL:  # [Note: programmatic dependent launch] in _triton.py
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + N + cols, mask=m, other=0.0).to(tl.float32)
    # silu rounded to the dtype first, then the product (F.silu(gate) * up).
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (a * u).to(out_ptr.dtype.element_ty), mask=m)


_norm_kernel = LazyJit(_add_rms_norm_kernel)
_rope_kernel = LazyJit(_rope_kv_write_kernel)
_silu_kernel = LazyJit(_silu_mul_kernel)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rms_norm_triton(x, delta, weight, eps):
    """The Triton lowering of ``add_rms_norm`` (one program per row); same contract."""
    shape, N = x.shape, x.shape[-1]
    x2 = _rows(x.reshape(-1, N))
    T = x2.shape[0]
    h = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if delta is not None:
        d2 = _rows(delta.reshape(-1, N))
        res = torch.empty(T, N, dtype=x.dtype, device=x.device)
    else:
        d2, res = x2, x
    if T:
        BLOCK = max(16, _pow2(N))
        kernel, _ = _norm_kernel()
        on = pdl(x.device)
        kernel[(T,)](
            x2,
            d2,
            weight,
            res if delta is not None else h,
            h,
            N,
            float(eps),
            x2.stride(0),
            d2.stride(0),
            res.stride(0) if delta is not None else 0,
            h.stride(0),
            HAS_DELTA=delta is not None,
            BLOCK=BLOCK,
            PDL=on,
            num_warps=8 if BLOCK >= 4096 else 4,
            launch_pdl=on,
        )
    if delta is not None:
        res = res.view(shape)
    return res, h.view(shape)


def rope_kv_write_triton(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, *, H, KVH, D):
    """The Triton lowering of ``rope_kv_write`` (one program per token and q/k head)."""
    T = qkv.shape[0]
    qkv = _rows(qkv)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and D % 2 == 0
    assert cos.stride(-1) == 1 and sin.stride() == cos.stride()
    q = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device)
    if T:
        kernel, _ = _rope_kernel()
        on = pdl(qkv.device)
        kernel[(T, H + KVH)](
            qkv,
            positions,
            cos,
            sin,
            q,
            k_cache,
            v_cache,
            slot_mapping,
            qkv.stride(0),
            cos.stride(0),
            q.stride(0),
            q.stride(1),
            k_cache.stride(1),
            k_cache.stride(2),
            H=H,
            KVH=KVH,
            HALF=D // 2,
            HALFP=max(16, _pow2(D // 2)),
            PDL=on,
            num_warps=1 if D <= 128 else 2,
            launch_pdl=on,
        )
    return q


def silu_mul_triton(gate_up):
    """The Triton lowering of ``silu_mul``."""
    shape = gate_up.shape
    N = shape[-1] // 2
    gu = _rows(gate_up.reshape(-1, 2 * N))
    T = gu.shape[0]
    out = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        BLOCK = min(2048, max(16, _pow2(N)))
        kernel, _ = _silu_kernel()
        on = pdl(gu.device)
        kernel[(T, triton.cdiv(N, BLOCK))](
            gu, out, N, gu.stride(0), out.stride(0), BLOCK=BLOCK, PDL=on, num_warps=4,
            launch_pdl=on,
        )  # fmt: skip
    return out.view(*shape[:-1], N)


# -- table -----------------------------------------------------------------------------------

_REFERENCES = {
    ADD_RMS_NORM: add_rms_norm_reference,
    ROPE_KV_WRITE: rope_kv_write_reference,
    SILU_MUL: silu_mul_reference,
}
for _op, _ref in _REFERENCES.items():
    dispatch.register(_op, _ref, name=f"{_op}_reference")
if triton is not None:
    for _op, _impl in (
        (ADD_RMS_NORM, add_rms_norm_triton),
        (ROPE_KV_WRITE, rope_kv_write_triton),
        (SILU_MUL, silu_mul_triton),
    ):
        dispatch.register(
            _op,
            _impl,
            device="cuda",
            min_capability=(8, 0),
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            priority=10,
            name=f"{_op}_triton",
        )


def resolve_all(device, dtype) -> dict:
    """``{op: impl}`` of the best lowering of each op for ``device``/``dtype``."""
    return {op: dispatch.resolve(op, torch.device(device), dtype).impl for op in OPS}


@torch.no_grad()
def self_check(impls: dict, device, dtype, *, hidden, H, KVH, D, intermediate, T=3) -> list[str]:
    """Names of the ops whose lowering in ``impls`` disagrees with the reference at these
    shapes (random inputs, ``T`` tokens); an op that raises counts as disagreeing."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    bad = []
    x, d, w = rnd(T, hidden), rnd(T, hidden), rnd(hidden)
    qkv = rnd(T, (H + 2 * KVH) * D)
    pos = torch.arange(5, 5 + T, device=dev)
    freqs = torch.outer(torch.arange(16, dtype=torch.float32), torch.rand(D // 2, generator=g))
    cos, sin = freqs.cos().to(dev), freqs.sin().to(dev)
    slots = torch.tensor([3, 17, 8, 30, 21, 11, 25, 2][:T], device=dev)
    gu = rnd(T, 2 * intermediate)
    cases = {
        ADD_RMS_NORM: lambda f: f(x, d, w, 1e-5) + f(x, None, w, 1e-5),
        SILU_MUL: lambda f: (f(gu),),
    }

    def rope(f):
        kc = torch.zeros(2, 16, KVH, D, device=dev, dtype=dtype)
        vc = torch.zeros_like(kc)
        q = f(qkv, pos, cos, sin, kc, vc, slots, H=H, KVH=KVH, D=D)
        return q, kc, vc

    cases[ROPE_KV_WRITE] = rope
    for op, case in cases.items():
        try:
            got = case(impls[op])
            want = case(_REFERENCES[op])
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a.float(), b.float(), **tol)
        except Exception as e:  # noqa: BLE001  (any failure means: do not use it)
            bad.append(f"{op} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return bad
