"""Fused AdamW update (torch.optim.AdamW semantics), in place on lists of tensors.

Registered in the kernel table as op ``"adamw_update"``; the torch reference
runs everywhere, the Triton kernel on CUDA (sm_80 and newer).

Signature of every lowering::

    impl(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps,
         weight_decay, step, skip=None) -> None

``step`` is the 1-based step count used for bias correction. Each list holds
tensors of equal shapes pairwise; params, exp_avgs and exp_avg_sqs are updated
in place. ``skip``, a 0-d tensor on the tensors' device, makes the call change
nothing when it is nonzero, decided on the device: the non-finite guard's verdict
without a host read ([Note: skipping on the device]).

The Triton lowering takes contiguous tensors of float32, bfloat16 or float16 in
any of the four lists (fp32 moments are what you want with bf16 params), loads
each element once, does all the maths in fp32 registers and stores each result
once, rounding to the tensor's dtype. On CPU tensors it runs only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before the first call), which is how
the tests check it against the reference::

    os.environ["TRITON_INTERPRET"] = "1"
    adamw_update_triton_(ps, gs, ms, vs, lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.1, step=1)
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels._elsewhere import moved
from fscale.kernels._triton import LazyJit

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

OP = "adamw_update"


@torch.no_grad()
def adamw_update_reference_(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, skip=None
) -> None:
    """Pure torch, the maths of ``torch.optim.AdamW`` (decoupled decay, bias correction).

    ``skip`` is read on the host here (a sync on a GPU; the reference is not the fast path).
    """
    if skip is not None and bool(skip):
        return
    # [Note: writing the step elsewhere]: redirected tensors are updated in their targets.
    params, exp_avgs, exp_avg_sqs = moved(params), moved(exp_avgs), moved(exp_avg_sqs)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    step_size = lr / bias1
    bias2_sqrt = bias2**0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = g.to(m.dtype)
        p.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-step_size)


dispatch.register(OP, adamw_update_reference_, name="adamw_update_reference")


# [Note: AdamW is a pure bandwidth problem]
#
# Per fp32 parameter the update reads p, g, m, v (16 bytes) and writes p, m, v
# (12 bytes): 28 bytes, against ~15 flops. On an H200 (4.27 TB/s measured
# device-to-device copy, ~67 TFLOP/s fp32) that is 6.6 ms of memory traffic
# for 1B params and ~0.2 ms of arithmetic, so what matters is
#   1. one pass: each tensor is read once and written once (the reference
#      makes ~10 passes; torch's `foreach` ~6; `fused=True` is one pass too);
#   2. 16-byte accesses: a thread owns BLOCK / (32 * num_warps) contiguous
#      elements and moves them as 128-bit vectors (checked in the sm_90 PTX:
#      ld.global.v4 / st.global.v4). Triton emits those only if it can prove
#      the pointers 16-byte aligned and the mask constant over each vector.
#      The launch says so with tl.multiple_of; the host makes it true by
#      sending each tensor's first numel - numel % 16 elements to the aligned
#      launch and the < 16 tail (and any misaligned view) to an unhinted one;
#   3. one launch for all tensors: every tensor is cut into BLOCK-sized chunks
#      listed in one int64 table [chunk, (p, g, m, v address, start, end)],
#      and program i updates chunk i. A launch per tensor costs ~5-10 us of
#      host time, more than the GPU needs for a tensor under ~1M params, and
#      even for large tensors the launch boundaries cost (README.md, "AdamW").
#      The table is 48 B per chunk (0.2% of the traffic at BLOCK=1024; 47 MB
#      for 1B params), is expanded on the device from a per-tensor list, and
#      is cached by the addresses and sizes it describes, so a steady-state
#      step costs a dictionary lookup. Per-tensor launches remain
#      (`direct_min_numel`) for comparison.
#   BLOCK=1024 with 4 warps: 8 elements, two 16-byte vectors per tensor per
#   thread (the fastest of a sweep: README.md).
# sqrt and the two divisions are the IEEE-rounded ones (sqrt_rn, div_rn): the
# kernel has ~30x more arithmetic headroom than it uses, and it keeps the
# result within an ulp or two of the reference.

_BLOCK = 1024
_NUM_WARPS = 4
_ALIGN_ELEMS = 16

_TL_DTYPES = (
    {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if tl is not None
    else {}
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    table_ptr,
    decay,
    one_minus_beta1,
    beta1,
    beta2,
    one_minus_beta2,
    step_size,
    bias2_sqrt,
    eps,
    skip_ptr,
    BLOCK: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    LERP_FROM_END: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
):
    if HAS_SKIP:
        # [Note: skipping on the device]
        if tl.load(skip_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    if GROUPED:
        row = table_ptr + pid * 6
        p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DTYPE))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(V_DTYPE))
        start = tl.load(row + 4)
        end = tl.load(row + 5)
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            start = tl.multiple_of(start, BLOCK)
            end = tl.multiple_of(end, 16)
    else:
        start = pid * BLOCK
        end = n
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end

    p = tl.load(p_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)

    p = p * decay
    # torch's lerp, both branches, so m matches the reference to the last bit.
    if LERP_FROM_END:
        m = g - (g - m) * beta1
    else:
        m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


_kernel = LazyJit(_adamw_kernel)


_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs")


def _check(lists) -> torch.device:
    n = len(lists[0])
    for name, ts in zip(_NAMES[1:], lists[1:], strict=True):
        if len(ts) != n:
            raise ValueError(
                f"adamw_update_triton_: {len(ts)} {name} for {n} params; pass one per param."
            )
    device = lists[0][0].device
    for i in range(n):
        numel = lists[0][i].numel()
        for name, ts in zip(_NAMES, lists, strict=True):
            t = ts[i]
            if t.device != device:
                raise ValueError(
                    f"adamw_update_triton_: {name}[{i}] is on {t.device}, params[0] on {device}; "
                    "move all tensors to one device."
                )
            if t.dtype not in DTYPES:
                raise ValueError(
                    f"adamw_update_triton_: {name}[{i}] has dtype {t.dtype}; the Triton kernel "
                    f"takes {[str(d) for d in DTYPES]}. Use adamw_update_reference_ for others."
                )
            if t.numel() != numel:
                raise ValueError(
                    f"adamw_update_triton_: {name}[{i}] has {t.numel()} elements, params[{i}] "
                    f"{numel}; the lists must pair up tensor by tensor."
                )
            if not t.is_contiguous():
                raise ValueError(
                    f"adamw_update_triton_: {name}[{i}] is not contiguous (shape "
                    f"{tuple(t.shape)}, stride {t.stride()}); pass .contiguous() tensors (and keep "
                    "them: the update is in place) or use adamw_update_reference_."
                )
    return device


def _scalars(lr, beta1, beta2, eps, weight_decay, step) -> dict:
    # Python floats, as the reference computes them; the kernel receives fp32,
    # as torch casts a Python scalar to the op's fp32 math type.
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    return {
        "decay": 1.0 - lr * weight_decay,
        "one_minus_beta1": 1.0 - beta1,
        "beta1": beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "step_size": lr / bias1,
        "bias2_sqrt": bias2**0.5,
        "eps": eps,
        # torch.lerp(self, end, w) computes end - (end - self) * (1 - w) for w >= 0.5.
        "LERP_FROM_END": (1.0 - beta1) >= 0.5,
    }


# Chunk tables for the grouped launch, keyed by the tensors they describe
# (addresses and sizes: params and moments keep their addresses from step to
# step, grads usually do too, through the caching allocator).
_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 32


def _table(specs: list[tuple], block: int, device: torch.device) -> torch.Tensor:
    """int64 [chunks, 6]: (p, g, m, v address, chunk start, end) for each
    ``block``-sized chunk of each ``(addresses, start, end)`` in ``specs``."""
    key = (device, block, tuple(specs))
    table = _TABLES.get(key)
    if table is not None:
        return table
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.clear()
    counts = [-(-(end - start) // block) for _, start, end in specs]
    info = torch.tensor([(*addrs, start, end) for addrs, start, end in specs], dtype=torch.int64)
    counts = torch.tensor(counts, dtype=torch.int64)
    total = int(counts.sum())
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable copy would wait for the queued steps.
        info = info.pin_memory().to(device, non_blocking=True)
        counts = counts.pin_memory().to(device, non_blocking=True)
    # Expand per tensor -> per chunk on the device (1B params at BLOCK=1024 is
    # ~1M rows: too many to build in Python every time grads move).
    owner = torch.repeat_interleave(
        torch.arange(len(specs), device=device), counts, output_size=total
    )
    first = torch.cumsum(counts, 0) - counts
    table = info[owner]
    table[:, 4] += (torch.arange(total, device=device) - first[owner]) * block
    _TABLES[key] = table
    return table


@torch.no_grad()
def _update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    skip: torch.Tensor | None = None,
    block: int = _BLOCK,
    num_warps: int = _NUM_WARPS,
    direct_min_numel: int | None = None,
) -> None:
    """``adamw_update_triton_`` with its launch parameters open (for bench/ sweeps).

    ``direct_min_numel``: tensors at least this large get a launch of their own
    (the default, None, sends everything through the chunk table).
    """
    if triton is None:
        raise RuntimeError("adamw_update_triton_ needs triton; use adamw_update_reference_.")
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    if not lists[0]:
        return
    device = _check(lists)
    kernel, interpret = _kernel()
    if device.type == "cpu" and not interpret:
        raise RuntimeError(
            "adamw_update_triton_ got CPU tensors but Triton is not interpreting; set "
            "TRITON_INTERPRET=1 to run it on the CPU, or use adamw_update_reference_."
        )
    scalars = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    if skip is not None:
        if skip.device != device or skip.numel() != 1:
            raise ValueError(
                f"adamw_update_triton_: skip must be a one-element tensor on {device}, got "
                f"{tuple(skip.shape)} on {skip.device}."
            )
        skip = skip.reshape(()).to(torch.int32)  # one dtype: one compiled variant
    flags = {"skip_ptr": skip, "HAS_SKIP": skip is not None}

    # (dtypes, aligned) -> (addresses, start, end) of the pieces for the table launch.
    groups: dict[tuple, list[tuple]] = {}
    for p, g, m, v in zip(*lists, strict=True):
        n = p.numel()
        if n == 0:
            continue
        quads = (p, g, m, v)
        dtypes = tuple(_TL_DTYPES[t.dtype] for t in quads)
        addrs = tuple(t.data_ptr() for t in quads)
        body = n - n % _ALIGN_ELEMS
        if not all(a % 16 == 0 for a in addrs):
            groups.setdefault((dtypes, False), []).append((addrs, 0, n))
            continue
        if body < n:
            groups.setdefault((dtypes, False), []).append((addrs, body, n))
        if body == 0:
            continue
        if direct_min_numel is not None and n >= direct_min_numel:
            # Triton specialises the aligned pointers and body % 16 == 0 itself.
            kernel[(triton.cdiv(body, block),)](
                p, g, m, v, body, p, **scalars, **flags,
                BLOCK=block, GROUPED=False, ALIGNED=False,
                P_DTYPE=dtypes[0], G_DTYPE=dtypes[1], M_DTYPE=dtypes[2], V_DTYPE=dtypes[3],
                num_warps=num_warps,
            )  # fmt: skip
        else:
            groups.setdefault((dtypes, True), []).append((addrs, 0, body))

    for (dtypes, aligned), specs in groups.items():
        table = _table(specs, block, device)
        kernel[(table.shape[0],)](
            table, table, table, table, 0, table, **scalars, **flags,
            BLOCK=block, GROUPED=True, ALIGNED=aligned,
            P_DTYPE=dtypes[0], G_DTYPE=dtypes[1], M_DTYPE=dtypes[2], V_DTYPE=dtypes[3],
            num_warps=num_warps,
        )  # fmt: skip


def adamw_update_triton_(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, skip=None
) -> None:
    """One-pass Triton AdamW, the maths of ``adamw_update_reference_`` (see the module doc).

    Args:
      params, grads, exp_avgs, exp_avg_sqs: equal-length lists of contiguous
        tensors on one device, paired by index; fp32, bf16 or fp16 each.
      lr, beta1, beta2, eps, weight_decay: Python floats.
      step: the 1-based step count, for bias correction.
      skip: None, or a 0-d tensor on the same device: nonzero makes every program
        return before touching memory (no host read).

    Returns:
      None; params, exp_avgs and exp_avg_sqs are updated in place.
    """
    _update(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        skip=skip,
    )


if triton is not None:
    dispatch.register(
        OP,
        adamw_update_triton_,
        device="cuda",
        min_capability=(8, 0),
        dtypes=DTYPES,
        priority=10,
        name="adamw_update_triton",
    )
