"""Multi-tensor dtype cast: ``dsts[i].copy_(srcs[i])`` for a list of pairs, one launch.

Registered in the kernel table as op ``"cast_into"``; the torch reference runs
everywhere, the Triton kernel on CUDA (sm_80 and newer). Signature of every lowering::

    impl(dsts, srcs) -> None        # equal-length lists, paired tensors of equal numel

Mixed precision casts every param to the compute dtype each step and every grad back
in backward: a few hundred tensors per step on a GPT. torch runs each as its own
launch, and a cast from a narrower float (bf16 -> fp32, the grads) takes
TensorIterator's dynamic-cast path, which does not vectorise: ~1.1 TB/s on an H200,
7.8 ms per step for the grads of a 1.4B model (``bench/results/compile-profile-*``).
The Triton lowering moves each element once with 16-byte accesses and covers all the
pairs of a call in one launch through a chunk table (``chunk_table`` in
``_triton.py``; [Note: AdamW is a pure bandwidth problem] in ``adamw.py``). Rounding
is round-to-nearest-even, as torch's; widening is exact, so both lowerings give the
same bits.

On CPU tensors the Triton lowering runs under ``TRITON_INTERPRET=1`` only (tests).

Usage::

    from fscale.kernels.cast import cast_all
    halves = cast_all(params, torch.bfloat16)     # new tensors, one launch on CUDA
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels._triton import LazyJit, chunk_table

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

OP = "cast_into"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048
_NUM_WARPS = 4
_ALIGN_ELEMS = 16


@torch.no_grad()
def cast_into_reference_(dsts, srcs) -> None:
    """``dst.copy_(src)`` pair by pair."""
    for d, s in zip(dsts, srcs, strict=True):
        d.copy_(s)


dispatch.register(OP, cast_into_reference_, name="cast_into_reference")


def _cast_kernel(
    table_ptr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4
    src = tl.load(row + 0).to(tl.pointer_type(SRC_DTYPE))
    dst = tl.load(row + 1).to(tl.pointer_type(DST_DTYPE))
    start = tl.load(row + 2)
    end = tl.load(row + 3)
    if ALIGNED:
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
        start = tl.multiple_of(start, BLOCK)
        end = tl.multiple_of(end, 16)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    x = tl.load(src + offs, mask=mask, eviction_policy="evict_first")
    # Through fp32, exactly: every source dtype widens to fp32 without rounding.
    if SRC_DTYPE == tl.bfloat16:
        # bf16 is fp32's top half (the interpreter's widening flushes subnormals).
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    if DST_DTYPE == tl.float32:
        y = x
    elif BF16_BY_BITS:
        # The interpreter truncates to bf16; round to nearest even by hand (torch's
        # CPU formula: add 0x7FFF plus the kept LSB, keep the top 16 bits).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = tl.where(x != x, 0x7FC0, bits).to(tl.uint16).to(DST_DTYPE, bitcast=True)
    else:
        y = x.to(DST_DTYPE, fp_downcast_rounding="rtne")
    tl.store(dst + offs, y, mask=mask)


_kernel = LazyJit(_cast_kernel)
_TL_DTYPES = (
    {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if tl is not None
    else {}
)


def _pairs_ok(dsts, srcs) -> torch.device:
    if len(dsts) != len(srcs):
        raise ValueError(f"cast_into: {len(dsts)} destinations for {len(srcs)} sources.")
    device = srcs[0].device
    for i, (d, s) in enumerate(zip(dsts, srcs, strict=True)):
        if d.numel() != s.numel():
            raise ValueError(
                f"cast_into: dsts[{i}] has {d.numel()} elements, srcs[{i}] {s.numel()}; "
                "pair tensors of equal size."
            )
        for what, t in (("dsts", d), ("srcs", s)):
            if t.device != device:
                raise ValueError(
                    f"cast_into: {what}[{i}] is on {t.device}, srcs[0] on {device}; "
                    "one device per call."
                )
            if t.dtype not in DTYPES or not t.is_contiguous():
                raise ValueError(
                    f"cast_into_triton_: {what}[{i}] is {t.dtype}, contiguous={t.is_contiguous()};"
                    f" the kernel takes contiguous {[str(x) for x in DTYPES]} (cast_all sends "
                    "other tensors to torch)."
                )
    return device


@torch.no_grad()
def cast_into_triton_(dsts, srcs) -> None:
    """One launch per (source dtype, destination dtype, alignment) for all pairs."""
    if not srcs:
        return
    device = _pairs_ok(dsts, srcs)
    kernel, interpret = _kernel()
    if device.type == "cpu" and not interpret:
        raise RuntimeError(
            "cast_into_triton_ got CPU tensors but Triton is not interpreting; set "
            "TRITON_INTERPRET=1, or use cast_into_reference_."
        )
    groups: dict[tuple, list[tuple]] = {}
    for d, s in zip(dsts, srcs, strict=True):
        n = s.numel()
        if n == 0:
            continue
        dtypes = (_TL_DTYPES[s.dtype], _TL_DTYPES[d.dtype])
        addrs = (s.data_ptr(), d.data_ptr())
        body = n - n % _ALIGN_ELEMS
        if not all(a % 16 == 0 for a in addrs):
            groups.setdefault((dtypes, False), []).append((addrs, 0, n))
            continue
        if body:
            groups.setdefault((dtypes, True), []).append((addrs, 0, body))
        if body < n:
            groups.setdefault((dtypes, False), []).append((addrs, body, n))
    for ((src_dtype, dst_dtype), aligned), specs in groups.items():
        table = chunk_table(specs, _BLOCK, device)
        kernel[(table.shape[0],)](
            table,
            BLOCK=_BLOCK,
            ALIGNED=aligned,
            SRC_DTYPE=src_dtype,
            DST_DTYPE=dst_dtype,
            BF16_BY_BITS=interpret and dst_dtype == tl.bfloat16,
            num_warps=_NUM_WARPS,
        )


if triton is not None:
    dispatch.register(
        OP,
        cast_into_triton_,
        device="cuda",
        min_capability=(8, 0),
        dtypes=DTYPES,
        priority=10,
        name="cast_into_triton",
    )


def cast_all(tensors, dtype: torch.dtype) -> list:
    """``[t.to(dtype) for t in tensors]`` in as few launches as the device allows.

    A tensor already of ``dtype`` comes back as is (``.to`` returns it too); ``None``
    stays ``None``; tensors the kernel cannot take (non-contiguous, other dtypes) go
    through ``.to``. Floating tensors of one device share a launch.
    """
    out = list(tensors)
    todo: dict[torch.device, list[int]] = {}
    for i, t in enumerate(out):
        if t is None or t.dtype == dtype:
            continue
        if t.dtype in DTYPES and dtype in DTYPES and t.is_contiguous():
            todo.setdefault(t.device, []).append(i)
        else:
            out[i] = t.to(dtype)
    for device, idx in todo.items():
        srcs = [out[i] for i in idx]
        dsts = [torch.empty(s.shape, dtype=dtype, device=device) for s in srcs]
        dispatch.resolve(OP, device, dtype).impl(dsts, srcs)
        for i, d in zip(idx, dsts, strict=True):
            out[i] = d
    return out


def cast_into(dsts, srcs) -> None:
    """``d.copy_(s)`` for each pair, in as few launches as the device allows (same-dtype
    pairs included: a copy is a cast to the same dtype). Pairs the kernel cannot take
    (non-contiguous, other dtypes, mismatched devices) go through ``copy_``."""
    todo: dict[torch.device, tuple[list, list]] = {}
    for d, s in zip(dsts, srcs, strict=True):
        if (
            d.device == s.device
            and d.dtype in DTYPES
            and s.dtype in DTYPES
            and d.is_contiguous()
            and s.is_contiguous()
        ):
            pair = todo.setdefault(d.device, ([], []))
            pair[0].append(d)
            pair[1].append(s)
        else:
            d.copy_(s)
    for device, (ds, ss) in todo.items():
        dispatch.resolve(OP, device, ds[0].dtype).impl(ds, ss)
