"""The state protocol: every slot of every stack's state describes itself for a checkpoint.

``fscale.state.describe(state)`` must return only ``TensorEntry`` / ``StoredTensor`` /
plain metadata, for the plain step, fp16 mixed precision (its loss-scale slot),
shard_zero 1/2/3 on a 1-D and a 2-D mesh, and offload to the host or NVMe; the
placement of a shard (master rows, flat stage-3 shards, optimizer moments) names the
mesh dim it is split over and describes the tensor it sits beside; the layout slot
names every param with its shape, dtype and placement; and anything that cannot
describe itself (a closure) is refused, naming its path.
"""

from __future__ import annotations

import copy
import enum
import io
import os

import pytest
import torch

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.state import StoredTensor, TensorEntry, describe
from fscale.step import Transform
from tests.dist import run_world
from tests.helpers import lm_batches, lm_loss

WORLD = 4
# Uneven: vocab 37 and d_model 10 are padded rows over 2 and 4 ranks.
CFG = GPTConfig(vocab_size=37, n_layer=2, n_head=2, d_model=10, seq_len=6, bias=False)
CFG = CFG.replace(tie_embeddings=False)
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)
_MOMENTS = ("exp_avg", "exp_avg_sq")  # fs.optim.adamw's per-param state

# name -> (transforms innermost first, mesh): ("zero", stage), ("mp", dtype), ("offload", tier)
STACKS = {
    "plain": ((), "1d"),
    "fp16": ((("mp", "fp16"),), "1d"),
    **{f"zero{s}": ((("zero", s),), "1d") for s in (1, 2, 3)},
    **{f"zero{s} hsdp": ((("zero", s),), "2d") for s in (1, 2, 3)},
    "offload cpu": ((("offload", "cpu"),), "1d"),
    "offload nvme": ((("offload", "nvme"),), "1d"),
    "zero3 hsdp offload cpu": ((("zero", 3), ("offload", "cpu")), "2d"),
    "zero2 offload nvme": ((("zero", 2), ("offload", "nvme")), "1d"),
}


def _model():
    torch.manual_seed(0)
    return GPT(CFG)


def _build(layers, mesh, path):
    params, apply = fs.functional(copy.deepcopy(_model()))
    step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-2, weight_decay=0.1), clip_norm=1.0)
    for kind, arg in layers:
        if kind == "mp":
            step = fs.mixed_precision(step, arg, init_scale=1024.0)
        elif kind == "zero":
            step = fs.shard_zero(step, arg, mesh=mesh)
        else:
            step = fs.offload(
                step, arg, subgroup_mb=2e-3, **({"path": path} if arg == "nvme" else {})
            )
    return step, params


def _summary(entries: dict, mesh) -> dict:
    """``describe``'s entries as plain data a test process can check."""
    out = {}
    for path, e in entries.items():
        if isinstance(e, TensorEntry):
            shape = tuple(e.tensor.shape)
            local = e.placement.local_shape(mesh)
            out[path] = ("tensor", shape, e.placement, local, e.tensor.detach().clone())
        elif isinstance(e, StoredTensor):
            local = e.placement.local_shape(mesh)
            out[path] = ("stored", tuple(e.shape), e.placement, local, e.read())
        elif isinstance(e, _PLAIN):
            out[path] = ("plain", e)
        else:
            out[path] = ("other", type(e).__name__)
    return out


def _describe_fn(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for name, (layers, mesh_kind) in STACKS.items():
        step, params = _build(layers, mesh2d if mesh_kind == "2d" else None, path)
        full = {k: tuple(v.shape) for k, v in params.items()}
        params, state = step.init(params)
        per = 2
        for batch in lm_batches(2, per * world, CFG.seq_len, vocab=CFG.vocab_size):
            local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
            params, state, _ = step(params, state, local)
        entries = describe(state)
        try:  # what a checkpoint writer does with it
            torch.save(entries, io.BytesIO())
            saved = None
        except Exception as e:
            saved = f"{type(e).__name__}: {e}"
        out[name] = {
            "entries": _summary(entries, step.mesh),
            "layout": state["layout"].describe_state(),
            "full": full,
            "local": {k: tuple(v.shape) for k, v in params.items()},
            "dims": step.mesh.dims,
            "saved": saved,
        }
        if hasattr(state.get("offload"), "close"):
            state["offload"].close()
    return out


def test_every_stack_describes_itself(tmp_path):
    # One world for every stack, in one test: tests sharing a module fixture may land on
    # both pytest-xdist workers, which would then start the world twice.
    results = run_world(_describe_fn, WORLD, str(tmp_path))
    failures = []
    for rank, by_stack in enumerate(results):
        for name, case in by_stack.items():
            for check in (_only_tensors_and_plain_metadata, _moments, _shards, _layout):
                try:
                    check(name, case)
                except AssertionError as e:
                    failures.append(f"rank {rank}, {name}, {check.__name__}: {e}")
        _loss_scale_slot(by_stack["fp16"]["entries"])
        _nvme_reads_back_the_host_tier(by_stack)
    assert not failures, "\n\n".join(failures)
    assert os.listdir(tmp_path) == []  # offload's swap files removed at close


# ----------------------------------------------------------------------------- checks


def _only_tensors_and_plain_metadata(name, case):
    entries = case["entries"]
    other = {p: e[1] for p, e in entries.items() if e[0] == "other"}
    assert not other, f"not describable: {other}"
    for path, e in entries.items():
        if e[0] in ("tensor", "stored"):
            _, shape, placement, local, tensor = e
            # A placement describes the tensor beside it: this rank's rows of it.
            assert shape == local == tuple(tensor.shape), (path, placement)
            assert isinstance(placement.describe(), dict)
    # Tensors and plain data only: nothing torch.save cannot write (a process group
    # riding on a shard, a closure).
    assert case["saved"] is None, case["saved"]


def _moments(name, case):
    """Every param has its AdamW moments at the usual paths, placed like the param."""
    layers, _ = STACKS[name]
    tier = next((arg for kind, arg in layers if kind == "offload"), None)
    entries = case["entries"]
    for param, full in case["full"].items():
        for moment in _MOMENTS:
            path = f"optimizer/{moment}/{param}"
            assert path in entries, (path, sorted(entries)[:8])
            kind, _, placement, _, _ = entries[path]
            assert kind == ("stored" if tier == "nvme" else "tensor"), (path, kind)
            assert tuple(placement.shape) == full, (path, placement)
            if _stage(layers):  # shards: the moments are split as the masters are
                assert list(placement.shard) == [case["dims"][-1]], (path, placement)


def _stage(layers) -> int:
    return next((arg for kind, arg in layers if kind == "zero"), 0)


def _shards(name, case):
    """shard_zero's shards (master rows, stage-3 flats) name the shard dim."""
    layers, mesh_kind = STACKS[name]
    stage = _stage(layers)
    if not stage:
        return
    shard_dim, replicate = ("shard", ["replicate"]) if mesh_kind == "2d" else ("dp", [])
    entries = case["entries"]
    # Stages 1/2 keep fp32 master rows; stage 3 one flat buffer of shards per unit.
    prefix = "shard_zero/master/" if stage < 3 else "shard_zero/flats/"
    shards = {p: e for p, e in entries.items() if p.startswith(prefix)}
    assert shards, sorted(entries)[:20]
    for path, (kind, shape, placement, _, _) in shards.items():
        assert kind == "tensor", path
        assert list(placement.shard) == [shard_dim], (path, placement)
        assert list(placement.replicate) == replicate, (path, placement)
        if stage < 3:
            param = path[len(prefix) :]
            assert tuple(placement.shape) == case["full"][param], (path, placement)
            assert shape != case["full"][param], (path, "not a shard")
    # The layout: stage 3's params are shards; stages 1/2 keep whole params.
    for param, info in case["layout"].items():
        p = info["placement"]
        if stage == 3:
            assert p["shard"] == [shard_dim] and p["replicate"] == replicate, (param, p)
        else:
            assert p["shard"] == [] and set(p["replicate"]) == {shard_dim, *replicate}


def _layout(name, case):
    """The layout slot names every param with its shape, dtype and placement."""
    layout, entries = case["layout"], case["entries"]
    assert set(layout) == set(case["full"])
    for param, info in layout.items():
        assert info["shape"] == list(case["local"][param]), (param, info)
        assert info["dtype"] == torch.float32
        placement = info["placement"]
        keys = {"shape", "shard", "replicate", "dim", "chunks", "extra"}
        assert set(placement) == keys, placement
        assert placement["shape"] == list(case["full"][param]), (param, placement)
        # describe(state) walks it into plain entries under layout/<param>/.
        assert entries[f"layout/{param}/dtype"] == ("plain", torch.float32)


def _loss_scale_slot(entries):
    kind, shape, _, _, scale = entries["mixed_precision/scale"]
    assert kind == "tensor" and shape == () and scale.item() == 1024.0
    for key in ("clean_steps", "hysteresis", "skipped_steps"):
        assert entries[f"mixed_precision/{key}"][0] == "plain"
        assert isinstance(entries[f"mixed_precision/{key}"][1], int)


def _nvme_reads_back_the_host_tier(by_stack):
    # The same training offloaded to the host and to NVMe: the moments read from the
    # swap files equal the host tier's.
    cpu, nvme = by_stack["offload cpu"]["entries"], by_stack["offload nvme"]["entries"]
    moments = [p for p in cpu if p.startswith("optimizer/exp_avg")]
    assert moments
    for path in moments:
        torch.testing.assert_close(nvme[path][4], cpu[path][4], rtol=0, atol=0)


# ----------------------------------------------------------------------------- refusals


def _plain_state():
    step, params = _build((), None, None)
    return step, step.init(params)[1]


def _closure_slot(step):
    """A transform that (wrongly) keeps a closure in its own state slot."""
    inner = step.stages.init

    def init(s, params):
        params, state = inner(s, params)
        scale = 2.0
        state["leaky"] = {"count": 0, "hooks": [None, lambda g: g * scale]}
        return params, state

    return step.with_transform(Transform("leaky"), init=init)


def test_a_closure_in_state_is_refused_naming_its_path():
    step, _ = _plain_state()
    step = _closure_slot(step)
    _, state = step.init(fs.functional(_model())[0])
    with pytest.raises(TypeError, match=r"'leaky/hooks/1' is a function"):
        describe(state)
    # Anywhere in the tree, optimizer state included.
    _, state = _plain_state()
    state["optimizer"] = state["optimizer"]._replace(count=lambda: 0)
    with pytest.raises(TypeError, match=r"'optimizer/count' is a function"):
        describe(state)


def test_describe_needs_the_state_dict():
    with pytest.raises(TypeError, match="state must be the dict step.init returns"):
        describe([1, 2])
