"""Attention over a paged KV cache, for decode and chunked prefill in one call.

Registered in the kernel table as op ``"paged_attention"``: the torch reference
(gather each sequence's blocks, masked SDPA per sequence: slow, obviously right) for
``device="any"``, and a Triton kernel for CUDA. Signature of every lowering::

    out = impl(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
               *, scale, max_query_len)

- ``q``: ``[T, H, D]``, the new tokens of all sequences back to back (last dim contiguous);
- ``k_cache``/``v_cache``: ``[num_blocks, block_size, KVH, D]`` holding the new tokens'
  K/V already (the runner writes them first); ``H % KVH == 0`` (GQA);
- ``block_tables``: ``[B, max_blocks]`` int32; ``seq_lens``: ``[B]`` int32, keys per
  sequence after this step; ``query_start_loc``: ``[B + 1]`` int32, offsets into ``q``;
- sequence ``b``'s queries are its last ``q_len_b`` positions: query ``i`` sits at
  position ``seq_lens[b] - q_len_b + i`` and sees keys ``0 ..`` that position (causal
  inside the chunk, everything cached before it);
- returns ``[T, H, D]`` in ``q``'s dtype. ``max_query_len`` (a Python int) sizes the grid.

On CPU the Triton kernel runs only under ``TRITON_INTERPRET=1`` (the tests)::

    out = paged_attention_triton(q, kc, vc, bt, lens, qsl, scale=D**-0.5, max_query_len=5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fscale.hw import dispatch
from fscale.kernels._triton import (
    LazyJit,
    arrival_counters,
    gdc_launch_dependents,
    gdc_wait,
    pdl,
    sm_count,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

OP = "paged_attention"


def paged_attention_reference(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, scale, max_query_len=None
):
    """Per sequence: gather its blocks, expand GQA heads, SDPA with the causal-chunk mask."""
    T, H, D = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, L in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        nb = -(-L // block_size)
        blocks = block_tables[b, :nb].long()
        k = k_cache[blocks].reshape(nb * block_size, kvh, D)[:L].repeat_interleave(H // kvh, 1)
        v = v_cache[blocks].reshape(nb * block_size, kvh, D)[:L].repeat_interleave(H // kvh, 1)
        qpos = torch.arange(L - (e - s), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[s:e] = o.transpose(0, 1)
    return out


# [Note: the Triton kernel's tiling]
# One program per (sequence, kv head, block of BLOCK_Q queries). Its rows are the
# BLOCK_Q queries times the G = H / KVH query heads that share the kv head (padded to
# GP, a power of two), so GQA reads each K/V page once for the whole group, and a
# decode step (one query) still fills >= 16 rows for tl.dot. The loop walks the
# sequence's pages through its block table up to the last key any of its rows can
# see, with an online softmax (flash attention) in fp32. Rows past the sequence's
# queries or padding heads compute on zeros and are not stored. Row max / sum are
# tl.reduce with triton's own combine functions, not tl.max / tl.sum (@jit helpers):
# the interpreter recognises those combines even when TRITON_INTERPRET was switched
# on after triton was imported (as the tests do).
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    lens_ptr,
    qsl_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_bt,
    G: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    qblk = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if qblk * BLOCK_Q < q_len:
        L = tl.load(lens_ptr + b)
        ctx = L - q_len
        r = tl.arange(0, BLOCK_Q * GP)
        qi = qblk * BLOCK_Q + r // GP
        g = r % GP
        row_ok = (qi < q_len) & (g < G)
        head = kvh * G + g
        d = tl.arange(0, DP)
        d_ok = d < D
        q_off = (q_start + qi).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
        q = tl.load(q_ptr + q_off + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qpos = ctx + qi
        m_i = tl.full([BLOCK_Q * GP], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_Q * GP], 0.0, tl.float32)
        # tl.full, not tl.zeros: zeros is a @jit helper, which fails in a late interpreter.
        acc = tl.full([BLOCK_Q * GP, DP], 0.0, tl.float32)
        kv_stop = tl.minimum(L, ctx + (qblk + 1) * BLOCK_Q)
        s_off = tl.arange(0, PAGE)
        for p in range(0, (kv_stop + PAGE - 1) // PAGE):
            blk = tl.load(bt_ptr + b * stride_bt + p).to(tl.int64)
            kpos = p * PAGE + s_off
            kv_ok = kpos < L
            kv_off = blk * stride_kb + s_off[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            kv_mask = kv_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            seen = (kpos[None, :] <= qpos[:, None]) & kv_ok[None, :]
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
            alpha = tl.exp(m_i - m_safe)
            prob = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(prob, 1, tl.standard._sum_combine)
            if IEEE:
                pv = tl.dot(prob.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(prob.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = (q_start + qi).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(
            o_ptr + o_off + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


_kernel = LazyJit(_paged_attention_kernel)


# [Note: the decode kernel]
# Decode steps (one query per sequence) take a kernel of their own. Its grid is
# (sequence, kv head, split): the sequence's keys are cut into SPLITS ranges of whole
# KB-key tiles (sized from the sequence's own length, so a 128-token context still
# spreads over every split), which keeps the SMs busy at batch 1 (flash-decoding).
# Each iteration gathers KB keys across KB / PAGE pages through the block table (one
# vector load of block ids), so a short context is a couple of iterations, not one per
# page. Rows are the G query heads of the kv head, padded to 16 for tl.dot. With
# SPLITS == 1 the program normalises and stores; otherwise it stores its unnormalised
# accumulator with its row max and sum, and adds 1 to the (sequence, kv head)'s
# arrival counter (acq_rel: the partials are visible first); the program that arrives
# last merges the SPLITS partials in split order, writes the output and sets the
# counter back to 0 (as fpx's one-kernel split-K, [Note: split-K without extra
# kernels] in _fpx_triton_kernel.py). A decode is one kernel: at batch 1 a separate
# combine kernel cost ~2 us in each of 32 layers plus its launch gap.
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    lens_ptr,
    qsl_ptr,
    ws_acc_ptr,
    ws_ml_ptr,
    cnt_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_bt,
    H: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    SPLITS: tl.constexpr,
    KB: tl.constexpr,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # [Note: programmatic dependent launch] in _triton.py
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    L = tl.load(lens_ptr + b)
    tiles = (L + KB - 1) // KB
    per = (tiles + SPLITS - 1) // SPLITS
    lo = split * per * KB
    hi = tl.minimum(L, lo + per * KB)
    g = tl.arange(0, R)
    row_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, DP)
    d_ok = d < D
    q_off = q_start * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.full([R], 0.0, tl.float32)
    acc = tl.full([R, DP], 0.0, tl.float32)
    s_off = tl.arange(0, KB)
    for start in range(lo, hi, KB):
        kpos = start + s_off
        kv_ok = kpos < hi
        blk = tl.load(bt_ptr + b * stride_bt + kpos // PAGE, mask=kv_ok, other=0).to(tl.int64)
        kv_off = (
            blk[:, None] * stride_kb
            + (kpos % PAGE)[:, None] * stride_ks
            + kvh * stride_kh
            + d[None, :]
        )
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(kv_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        prob = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(prob, 1, tl.standard._sum_combine)
        if IEEE:
            pv = tl.dot(prob.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(prob.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = q_start * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        # Workspace rows: ((b * H + head) * SPLITS + split); acc [.., DP], (m, l) [.., 2].
        base = (b * H + head).to(tl.int64) * SPLITS
        wrow = base + split
        tl.store(ws_acc_ptr + wrow[:, None] * DP + d[None, :], acc, mask=mask)
        tl.store(ws_ml_ptr + wrow * 2, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + wrow * 2 + 1, l_i, mask=row_ok)
        tile = b * tl.num_programs(1) + kvh
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # the last split of this (sequence, kv head): merge
            m_max = tl.full([R], float("-inf"), tl.float32)
            for sp in tl.static_range(SPLITS):
                m_s = tl.load(
                    ws_ml_ptr + (base + sp) * 2, mask=row_ok, other=0.0, cache_modifier=".cg"
                )
                m_max = tl.maximum(m_max, m_s)
            num = tl.full([R, DP], 0.0, tl.float32)
            den = tl.full([R], 0.0, tl.float32)
            for sp in tl.static_range(SPLITS):
                r = base + sp
                m_s = tl.load(ws_ml_ptr + r * 2, mask=row_ok, other=0.0, cache_modifier=".cg")
                l_s = tl.load(ws_ml_ptr + r * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
                w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_max))
                a_s = tl.load(
                    ws_acc_ptr + r[:, None] * DP + d[None, :],
                    mask=mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
                num += a_s * w[:, None]
                den += l_s * w
            out = num / tl.where(den == 0.0, 1.0, den)[:, None]
            o_off = q_start * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch


_decode_kernel = LazyJit(_paged_decode_kernel)


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits of each sequence's keys for a decode launch: about two programs per SM."""
    want = max(1, (2 * sm_count(device)) // max(1, batch * kv_heads))
    return min(16, 1 << (want.bit_length() - 1))


def _paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, splits):
    T, H, D = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    B = block_tables.shape[0]
    G = H // kvh
    DP = max(16, _pow2(D))
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if splits is None:
        splits = decode_splits(B, kvh, q.device)
    if splits > 1:
        ws_acc = torch.empty(B * H * splits, DP, dtype=torch.float32, device=q.device)
        ws_ml = torch.empty(B * H * splits, 2, dtype=torch.float32, device=q.device)
        counters = arrival_counters(q.device, B * kvh)
    else:
        ws_acc = ws_ml = counters = out
    KB = max(block_size, 64 if D <= 128 else 32)
    kernel, _ = _decode_kernel()
    on = pdl(q.device)
    kernel[(B, kvh, splits)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        qsl,
        ws_acc,
        ws_ml,
        counters,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        H=H,
        G=G,
        R=max(16, _pow2(G)),
        SPLITS=splits,
        KB=KB,
        PAGE=block_size,
        D=D,
        DP=DP,
        IEEE=q.dtype == torch.float32,
        PDL=on,
        num_warps=4,
        launch_pdl=on,
    )
    return out


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_attention_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    *,
    scale,
    max_query_len,
    decode_kernel=True,
    splits=None,
):
    """The Triton lowering (see [Note: the Triton kernel's tiling]); same contract.
    Decode batches (``max_query_len == 1``) take the split-K decode kernel ([Note: the
    decode kernel]; ``decode_kernel=False`` keeps the general one, ``splits`` overrides
    the split count: tests and benches)."""
    T, H, D = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    if block_size < 16 or block_size & (block_size - 1) or q.stride(-1) != 1:
        # tl.dot needs >= 16 keys per page; such caches take the reference.
        return paged_attention_reference(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=scale
        )
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if max_query_len == 1 and decode_kernel:
        return _paged_decode_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, splits
        )
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    B = block_tables.shape[0]
    G = H // kvh
    GP = _pow2(G)
    rows = 16 if max_query_len == 1 else 64
    BLOCK_Q = max(1, rows // GP)
    kernel, _ = _kernel()
    grid = (B, kvh, triton.cdiv(max(1, max_query_len), BLOCK_Q))
    kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        G=G,
        GP=GP,
        BLOCK_Q=BLOCK_Q,
        PAGE=block_size,
        D=D,
        DP=max(16, _pow2(D)),
        IEEE=q.dtype == torch.float32,
    )
    return out


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, scale, max_query_len
):
    """Through the kernel table (the Triton kernel on CUDA, else the reference)."""
    impl = dispatch.resolve(OP, q).impl
    return impl(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale=scale,
        max_query_len=max_query_len,
    )


dispatch.register(OP, paged_attention_reference, name="paged_attention_reference")
if triton is not None:
    dispatch.register(
        OP,
        paged_attention_triton,
        device="cuda",
        min_capability=(8, 0),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        priority=10,
        name="paged_attention_triton",
    )
