"""Transforms ``Step -> Step``: one file per capability.

Usage::

    from fscale.transforms import shard_zero
    step = shard_zero(fs.train_step(loss_fn, fs.optim.adamw(3e-4)), stage=3)
"""

from fscale.transforms.checkpoint import checkpoint_activations
from fscale.transforms.offload import offload
from fscale.transforms.precision import mixed_precision
from fscale.transforms.quantize import dequantize, quantize, quantize_report
from fscale.transforms.zero import gather_params, shard_zero

__all__ = [
    "checkpoint_activations",
    "dequantize",
    "gather_params",
    "mixed_precision",
    "offload",
    "quantize",
    "quantize_report",
    "shard_zero",
]
