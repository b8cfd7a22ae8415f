"""AdamW on the host for ``offload``: one pass over memory on all intra-op threads.

``offload`` runs the optimizer on host copies of the state, where the torch
reference of ``"adamw_update"`` makes ~10 passes over memory on one op at a time.
The host lowering reads each of p, g, m, v once and writes p, m, v once (28 bytes
per parameter, bandwidth-bound like the GPU kernel: [Note: AdamW is a pure
bandwidth problem] in ``adamw.py``): fp32 through fscale's C loop, which can also
write the step into a second buffer ([Note: AdamW on the host, in place or
elsewhere] in ``host_adamw.py``; where it is not built, and for fp64,
``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` calls). On this
2-core box, 8M fp32 params: reference 27 M params/s, torch's fused 329 M params/s;
moments bit-identical, params within 1 ulp (the fused kernels round the decay and
the step in one expression). Inside ``writing_into`` ([Note: writing the step
elsewhere] in ``_elsewhere.py``) it writes redirected tensors' new values into the
target buffer.

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
from fscale.kernels import _elsewhere, host_adamw
from fscale.kernels.adamw import OP, adamw_update_reference_

NAME = "adamw_update_cpu_fused"
_FUSED_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()


@torch.no_grad()
def adamw_update_cpu_fused_(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, skip=None
) -> None:
    """``adamw_update`` by the C loop (fp32) or ``torch._fused_adamw_`` (fp64, or no C
    loop); other dtype mixes use the reference.

    ``skip`` (a nonzero 0-d tensor: change nothing) is read on the host: host tensors.
    """
    if skip is not None and bool(skip):
        return
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    c_loop = host_adamw.available()
    fused: dict[torch.dtype, tuple[list, list, list, list]] = {}
    rest: tuple[list, list, list, list] = ([], [], [], [])
    looped: tuple[list, ...] = ([], [], [], [], [], [], [])  # p, g, m, v, and where p, m, v go
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if c_loop and host_adamw.takes(p, g, m, v) and p.shape == g.shape == m.shape == v.shape:
            outs = [_elsewhere.target(t) for t in (p, m, v)]
            for t, o in zip((p, m, v), outs, strict=True):
                if o is not None:
                    _elsewhere.mark(t)
            for lst, t in zip(looped, (p, g, m, v, *outs), strict=True):
                lst.append(t)
            continue
        quad = (p, g, m, v)
        dtypes = {t.dtype for t in quad}
        ok = (
            len(dtypes) == 1
            and p.dtype in _FUSED_DTYPES
            and all(t.device.type == "cpu" and t.is_contiguous() for t in quad)
        )
        group = fused.setdefault(p.dtype, ([], [], [], [])) if ok else rest
        for lst, t in zip(group, quad, strict=True):
            lst.append(t)
    if looped[0]:
        ps, gs, ms, vs, *outs = looped
        dests = tuple(
            [t if o is None else o for t, o in zip(ts, os_, strict=True)]
            for ts, os_ in zip((ps, ms, vs), outs, strict=True)
        )
        host_adamw.adamw_(ps, gs, ms, vs, step=step, out=dests, **hyper)
    for ps, gs, ms, vs in fused.values():
        ps, ms, vs = _elsewhere.moved(ps), _elsewhere.moved(ms), _elsewhere.moved(vs)
        steps = [torch.tensor(float(step), dtype=torch.float32)] * len(ps)
        torch._fused_adamw_(
            ps, gs, ms, vs, [], steps, amsgrad=False, maximize=False, **hyper
        )  # fmt: skip
    if rest[0]:
        adamw_update_reference_(*rest, step=step, **hyper)


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
