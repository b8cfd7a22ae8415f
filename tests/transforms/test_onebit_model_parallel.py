"""The 1-bit methods refuse params split across ranks, by name, instead of averaging
different slices: over tensor_parallel at build time, over expert_parallel's banks at
init. (Before, a tp=2 world trained 1-bit Adam to params 200% away from the world of
one, silently.)"""

from __future__ import annotations

import copy

import torch

import fscale as fs
from fscale.models import GPT, GPTConfig, gpt_loss
from tests.dist import run_world
from tests.helpers import error_text

METHODS = {
    "onebit_adam": lambda: fs.onebit_adam(freeze_step=2),
    "zero_one_adam": lambda: fs.zero_one_adam(var_freeze_step=2),
    "onebit_lamb": lambda: fs.onebit_lamb(freeze_step=2),
}


def _attempt(dim: str, method: str, zero: bool, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(dim,))
    torch.manual_seed(0)
    cfg = GPTConfig.moe_tiny(n_head=4, seq_len=8) if dim == "ep" else GPTConfig.tiny(n_head=4)
    params, apply = fs.functional(copy.deepcopy(GPT(cfg)))
    opt = fs.optim.lamb(1e-2) if method == "onebit_lamb" else fs.optim.adam(1e-2)
    step = fs.train_step(gpt_loss(apply), opt, mesh=mesh, model=apply)
    step = fs.tensor_parallel(step, dim="tp") if dim == "tp" else fs.expert_parallel(step, dim="ep")
    if zero:
        step = fs.shard_zero(step, 1)

    def build_and_init():
        fs.compress_comm(step, METHODS[method]()).init(params)

    return error_text(build_and_init)


def _world_fn(rank, world):
    return {
        (dim, method, zero): _attempt(dim, method, zero, world)
        for dim, zero in (("tp", False), ("ep", False), ("ep", True))  # ZeRO needs a data dim
        for method in METHODS
    }


def test_onebit_methods_refuse_params_split_across_ranks():
    for by_case in run_world(_world_fn, 2):
        for (dim, method, _zero), text in by_case.items():
            assert text.startswith(f"ValueError: compress_comm({method}) cannot"), text
            if dim == "tp":
                assert "over tensor_parallel (mesh dims ['tp'] split the model)" in text, text
            else:
                assert "params split across ranks" in text and "experts" in text, text
            assert "Not built: compress a step whose params are whole" in text, text
