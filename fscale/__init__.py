"""fscale: DeepSpeed's techniques as pure, composable transforms over a train step.

Usage::

    import fscale as fs
    params, apply = fs.functional(model)
    step = fs.train_step(loss_fn, fs.optim.adamw(lr=3e-4))
    params, state = step.init(params)
    params, state, metrics = step(params, state, batch)
"""

from fscale import data, optim, tree
from fscale.checkpoint import latest, load, load_extra, save
from fscale.explain import explain, plan
from fscale.export import export, load_safetensors, load_state_dict
from fscale.functional import functional, load_params
from fscale.hw.launch import init_distributed
from fscale.metrics import MetricsLogger
from fscale.step import Stages, Step, StepContext, Transform, train_step
from fscale.transforms import (
    checkpoint_activations,
    compile_units,
    compress_comm,
    curriculum,
    expert_parallel,
    gather_params,
    layer_token_lr,
    mixed_precision,
    offload,
    onebit_adam,
    onebit_lamb,
    random_ltd,
    seqlen_discrete,
    seqlen_root,
    seqlen_warmup,
    shard_zero,
    tensor_parallel,
    zero_one_adam,
    zeropp,
)
from fscale.transforms.quantize import quantize, quantize_report

# Importing the kernels registers their lowerings in the dispatch table.
from fscale.kernels import adamw as _adamw_kernels  # noqa: F401  isort: skip

__all__ = [
    "MetricsLogger",
    "Stages",
    "Step",
    "StepContext",
    "Transform",
    "checkpoint_activations",
    "compile_units",
    "compress_comm",
    "curriculum",
    "data",
    "expert_parallel",
    "explain",
    "export",
    "functional",
    "gather_params",
    "init_distributed",
    "latest",
    "layer_token_lr",
    "load",
    "load_extra",
    "load_params",
    "load_safetensors",
    "load_state_dict",
    "mixed_precision",
    "offload",
    "onebit_adam",
    "onebit_lamb",
    "optim",
    "plan",
    "quantize",
    "quantize_report",
    "random_ltd",
    "save",
    "seqlen_discrete",
    "seqlen_root",
    "seqlen_warmup",
    "shard_zero",
    "tensor_parallel",
    "train_step",
    "tree",
    "zero_one_adam",
    "zeropp",
]
__version__ = "0.1.0"
