"""Transforms ``Step -> Step``: one file per capability.

Usage::

    from fscale.transforms import shard_zero
    step = shard_zero(fs.train_step(loss_fn, fs.optim.adamw(3e-4)), stage=3)
"""

from fscale.transforms.checkpoint import checkpoint_activations
from fscale.transforms.compile import compile_units
from fscale.transforms.compress import (
    compress_comm,
    onebit_adam,
    onebit_lamb,
    zero_one_adam,
    zeropp,
)
from fscale.transforms.curriculum import curriculum, seqlen_discrete, seqlen_root, seqlen_warmup
from fscale.transforms.expert_parallel import expert_parallel
from fscale.transforms.offload import offload
from fscale.transforms.precision import mixed_precision
from fscale.transforms.quantize import dequantize, quantize, quantize_report
from fscale.transforms.random_ltd import layer_token_lr, random_ltd
from fscale.transforms.tensor_parallel import tensor_parallel
from fscale.transforms.zero import gather_params, shard_zero

__all__ = [
    "checkpoint_activations",
    "compile_units",
    "compress_comm",
    "curriculum",
    "dequantize",
    "expert_parallel",
    "gather_params",
    "layer_token_lr",
    "mixed_precision",
    "offload",
    "onebit_adam",
    "onebit_lamb",
    "quantize",
    "quantize_report",
    "random_ltd",
    "seqlen_discrete",
    "seqlen_root",
    "seqlen_warmup",
    "shard_zero",
    "tensor_parallel",
    "zero_one_adam",
    "zeropp",
]
