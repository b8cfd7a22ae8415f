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


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("swap"))
    return run_world(_describe_fn, WORLD, path)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(STACKS))
def test_describe_returns_only_tensors_and_plain_metadata(described, name):
    for rank, by_stack in enumerate(described):
        entries = by_stack[name]["entries"]
        other = {p: e[1] for p, e in entries.items() if e[0] == "other"}
        assert not other, f"rank {rank} {name}: not describable: {other}"
        for path, e in entries.items():
            if e[0] in ("tensor", "stored"):
                _, shape, placement, local, tensor = e
                # A placement describes the tensor beside it: this rank's rows of it.
                assert shape == local == tuple(tensor.shape), (rank, name, path, placement)
                assert isinstance(placement.describe(), dict)
        # Tensors and plain data only: nothing that torch.save cannot write (a process
        # group riding on a shard, a closure).
        assert by_stack[name]["saved"] is None, (rank, name, by_stack[name]["saved"])


@pytest.mark.parametrize("name", list(STACKS))
def test_every_param_has_its_optimizer_moments_with_the_param_placement(described, name):
    layers, _ = STACKS[name]
    tier = next((arg for kind, arg in layers if kind == "offload"), None)
    for rank, by_stack in enumerate(described):
        case = by_stack[name]
        entries = case["entries"]
        for param, full in case["full"].items():
            for moment in _MOMENTS:
                path = f"optimizer/{moment}/{param}"
                assert path in entries, (rank, name, path, sorted(entries)[:8])
                kind, _, placement, _, _ = entries[path]
                assert kind == ("stored" if tier == "nvme" else "tensor"), (name, path, kind)
                assert tuple(placement.shape) == full, (name, path, placement)
                if _stage(layers):  # shards: the moments are split as the masters are
                    assert list(placement.shard) == [case["dims"][-1]], (name, path, placement)


def _stage(layers) -> int:
    return next((arg for kind, arg in layers if kind == "zero"), 0)


@pytest.mark.parametrize("name", [n for n in STACKS if _stage(STACKS[n][0])])
def test_shard_zero_shards_name_the_shard_dim(described, name):
    layers, mesh_kind = STACKS[name]
    shard_dim, replicate = ("shard", ["replicate"]) if mesh_kind == "2d" else ("dp", [])
    stage = _stage(layers)
    for by_stack in described:
        case = by_stack[name]
        entries = case["entries"]
        # Stages 1/2 keep fp32 master rows; stage 3 one flat buffer of shards per unit.
        prefix = "shard_zero/master/" if stage < 3 else "shard_zero/flats/"
        shards = {p: e for p, e in entries.items() if p.startswith(prefix)}
        assert shards, (name, sorted(entries)[:20])
        for path, (kind, shape, placement, _, _) in shards.items():
            assert kind == "tensor", (name, path)
            assert list(placement.shard) == [shard_dim], (name, path, placement)
            assert list(placement.replicate) == replicate, (name, path, placement)
            if stage < 3:
                param = path[len(prefix) :]
                assert tuple(placement.shape) == case["full"][param], (name, path, placement)
                assert shape != case["full"][param], (name, path, "not a shard")
        # The layout: stage 3's params are shards; stages 1/2 keep whole params.
        for param, info in case["layout"].items():
            p = info["placement"]
            if stage == 3:
                assert p["shard"] == [shard_dim] and p["replicate"] == replicate, (param, p)
            else:
                assert p["shard"] == [] and set(p["replicate"]) == {shard_dim, *replicate}


def test_fp16_loss_scale_slot_is_a_tensor_and_counters(described):
    entries = described[0]["fp16"]["entries"]
    kind, shape, _, _, scale = entries["mixed_precision/scale"]
    assert kind == "tensor" and shape == () and scale.item() == 1024.0
    for key in ("clean_steps", "hysteresis", "skipped_steps"):
        assert entries[f"mixed_precision/{key}"][0] == "plain"
        assert isinstance(entries[f"mixed_precision/{key}"][1], int)


def test_nvme_state_reads_back_what_the_host_tier_holds(described):
    # The same training offloaded to the host and to NVMe: the moments read from the
    # swap files equal the host tier's.
    for by_stack in described:
        cpu, nvme = by_stack["offload cpu"]["entries"], by_stack["offload nvme"]["entries"]
        moments = [p for p in cpu if p.startswith("optimizer/exp_avg")]
        assert moments
        for path in moments:
            torch.testing.assert_close(nvme[path][4], cpu[path][4], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(STACKS))
def test_layout_describes_every_param_with_shape_dtype_and_placement(described, name):
    for rank, by_stack in enumerate(described):
        case = by_stack[name]
        layout, entries = case["layout"], case["entries"]
        assert set(layout) == set(case["full"]), (rank, name)
        for param, info in layout.items():
            assert info["shape"] == list(case["local"][param]), (name, param, info)
            assert info["dtype"] == torch.float32
            placement = info["placement"]
            assert set(placement) == {"shape", "shard", "replicate", "dim"}, placement
            assert placement["shape"] == list(case["full"][param]), (name, param, placement)
            # describe(state) walks it into plain entries under layout/<param>/.
            assert entries[f"layout/{param}/dtype"] == ("plain", torch.float32)


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
