"""Fused AdamW update (torch.optim.AdamW semantics), in place on lists of tensors.

Registered in the kernel table as op ``"adamw_update"``; the torch reference
runs everywhere, the Triton kernel on CUDA.

Signature of every lowering::

    impl(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps,
         weight_decay, step) -> None

``step`` is the 1-based step count used for bias correction. Each list holds
tensors of equal shapes pairwise; params, exp_avgs and exp_avg_sqs are updated
in place.
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch

OP = "adamw_update"


@torch.no_grad()
def adamw_update_reference_(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step
) -> None:
    """Pure torch, the maths of ``torch.optim.AdamW`` (decoupled decay, bias correction)."""
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
