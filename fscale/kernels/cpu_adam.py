"""AdamW on the host for ``offload``: torch's one-pass, multi-threaded CPU kernel.

``offload`` runs the optimizer on host copies of the state, where the torch
reference of ``"adamw_update"`` makes ~10 passes over memory on one op at a time.
``torch._fused_adamw_`` (what ``torch.optim.AdamW(fused=True)`` calls) reads each of
p, g, m, v once and writes p, m, v once, vectorised and split over the intra-op
threads: 28 bytes per parameter, bandwidth-bound like the GPU kernel ([Note: AdamW
is a pure bandwidth problem] in ``adamw.py``). On this 2-core box, 8M fp32 params:
reference 27 M params/s, fused 329 M params/s; moments bit-identical, params
within 1 ulp (the fused kernel rounds the decay and the step in one expression).

The lowering is registered for ``device="cpu"`` only inside ``host_kernels()``,
which ``offload`` enters around its host updates: a plain CPU step keeps
resolving the reference (its tests compare against torch.optim bit for bit), and
``FSCALE_KERNELS=reference`` still forces the reference here too.

Usage::

    with host_kernels():
        params, state = apply_gradients(tx, grads, state, params)   # fused on CPU tensors
"""

from __future__ import annotations

import contextlib
import threading

import torch

from fscale.hw import dispatch
from fscale.kernels.adamw import OP, adamw_update_reference_

NAME = "adamw_update_cpu_fused"
_FUSED_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()


@torch.no_grad()
def adamw_update_cpu_fused_(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, skip=None
) -> None:
    """``adamw_update`` through ``torch._fused_adamw_``; other dtype mixes use the reference.

    ``skip`` (a nonzero 0-d tensor: change nothing) is read on the host: host tensors.
    """
    if skip is not None and bool(skip):
        return
    fused: dict[torch.dtype, tuple[list, list, list, list]] = {}
    rest: tuple[list, list, list, list] = ([], [], [], [])
    for quad in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        dtypes = {t.dtype for t in quad}
        ok = (
            len(dtypes) == 1
            and quad[0].dtype in _FUSED_DTYPES
            and all(t.device.type == "cpu" and t.is_contiguous() for t in quad)
        )
        group = fused.setdefault(quad[0].dtype, ([], [], [], [])) if ok else rest
        for lst, t in zip(group, quad, strict=True):
            lst.append(t)
    for ps, gs, ms, vs in fused.values():
        steps = [torch.tensor(float(step), dtype=torch.float32)] * len(ps)
        torch._fused_adamw_(
            ps,
            gs,
            ms,
            vs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
    if rest[0]:
        adamw_update_reference_(
            *rest,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
        )


@contextlib.contextmanager
def host_kernels():
    """Resolve ``"adamw_update"`` on CPU tensors to the fused kernel inside this block.

    fscale's adam family resolves its kernel once per (device, dtype) and keeps it,
    so the optimizer ``offload`` wraps keeps the host kernel for its lifetime.
    """
    with _LOCK:
        before = dispatch.lowerings(OP)
        dispatch.register(OP, adamw_update_cpu_fused_, device="cpu", name=NAME)
    try:
        yield
    finally:
        with _LOCK:
            # dispatch has no unregister; restore the op's rules as they were.
            dispatch._TABLE[OP] = before
