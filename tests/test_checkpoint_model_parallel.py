"""fs.save / fs.load of expert- and tensor-parallel runs: exact resume and resharding.

The MoE GPT under ``tensor_parallel(expert_parallel(step))`` on (tp=2, ep=2), under
``tensor_parallel`` on (dp=2, tp=2) and under ``expert_parallel`` on (dp=2, ep=2),
in one gloo world of 4 (fp32):

- exact resume: N steps, ``fs.save`` (no ``mesh=``: the state records the mesh
  ``step.init`` laid it out on), ``fs.load`` into a fresh step of the same stack and
  mesh, M steps equals N + M uninterrupted steps bit for bit (every rank's params,
  every state tensor, every plain value); the loaded state equals the saved one.
  Also asynchronously and with ``mesh=step.mesh`` passed (dp=2, tp=2: training goes
  on while the fused blocks are written), and with ``shard_zero(3)`` over the (dp=2,
  ep=2) stack (ZeRO's rows of the experts composed with their ep split);
- to the world of one: each checkpoint loaded into a plain step (this process)
  gives the full tensors re-assembled from the ranks' pieces, params and AdamW
  moments alike (the fused qkv chunk by chunk, the TED banks over ep and tp);
- from the world of one: a plain step's checkpoint loaded into the (tp=2, ep=2)
  stack gives each rank the slices its ``step.init`` cuts from the full params, and
  moments that re-assemble to the plain step's;
- ``mesh=`` other than the state's mesh raises on every rank, naming both meshes:
  other dims, and the same dims and sizes over another order of the ranks (where
  only some ranks' coordinates differ, yet all must raise rather than wait in DCP);
  a state that records no mesh raises naming the fix. Nothing is written.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import fscale as fs
from fscale._checkpoint.chunks import _Coords, _pieces
from fscale.models import GPT, GPTConfig, gpt_loss
from fscale.placement import Placement
from fscale.state import StoredTensor, TensorEntry, describe
from tests.dist import run_world
from tests.helpers import error_text

N, M, SEQ, PER = 2, 2, 8, 2
# name -> (mesh dims, sizes); expert_parallel goes under tensor_parallel (TED).
STACKS = {
    "tp2_ep2": (("tp", "ep"), (2, 2)),
    "dp2_tp2": (("dp", "tp"), (2, 2)),
    "dp2_ep2": (("dp", "ep"), (2, 2)),
}


def _build(names=(), mesh=None, zero=False):
    torch.manual_seed(0)
    params, apply = fs.functional(GPT(GPTConfig.moe_tiny(n_head=4, seq_len=SEQ)))
    opt = fs.optim.adamw(fs.optim.linear_warmup(1e-2, 4), weight_decay=0.1)
    step = fs.train_step(gpt_loss(apply), opt, mesh=mesh, model=apply, clip_norm=1.0)
    if "ep" in names:
        step = fs.expert_parallel(step, dim="ep")
    if "tp" in names:
        step = fs.tensor_parallel(step, dim="tp")
    if zero:  # ZeRO-3's rows of the experts compose with their ep split: shard=(ep, dp)
        step = fs.shard_zero(step, 3, shard_dim="dp")
    return step, params


def _batches(n, seed, data_rank=0, data_ranks=1):
    """The global batches of ``n`` steps, this data rank's rows of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {k: torch.randint(0, 256, (PER * data_ranks, SEQ), generator=g) for k in ("x", "y")}
        out.append({k: v[PER * data_rank : PER * (data_rank + 1)] for k, v in b.items()})
    return out


def _train(step, params, state, batches):
    for b in batches:
        params, state, _ = step(params, state, b)
    return params, state


def _snapshot(params, state) -> dict:
    """This rank's params, every state tensor and plain value (not the call counter)."""
    out = {f"params/{k}": v.detach().clone() for k, v in params.items()}
    for path, e in describe(state).items():
        if isinstance(e, TensorEntry):
            out[path] = e.tensor.clone()
        elif not path.startswith(("layout/", "generation")):
            out[path] = e
    return out


def _differences(what: str, want: dict, got: dict) -> list[str]:
    if set(want) != set(got):
        return [f"{what}: entries differ {sorted(set(want) ^ set(got))[:6]}"]
    out = []
    for k, w in want.items():
        g = got[k]
        same = torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g
        if not same:
            out.append(f"{what}: {k} differs")
    return out


def _rank(rank, world, tmp, w1_params):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    failures, pieces, coords, layouts, errors = [], {}, {}, {}, {}
    for name, (names, sizes) in {**STACKS, "dp2_ep2_zero3": STACKS["dp2_ep2"]}.items():
        zero = name.endswith("zero3")
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
        data = [n for n in names if n != "tp"]  # a tp group sees one batch
        data_rank = 0
        for n in data:
            data_rank = data_rank * mesh[n].size() + mesh[n].get_local_rank()
        data_ranks = math.prod(mesh[n].size() for n in data)
        first = _batches(N, 1, data_rank, data_ranks)
        rest = _batches(M, 2, data_rank, data_ranks)
        ckpt = os.path.join(tmp, name)

        step, params = _build(names, mesh, zero)
        params, state = step.init(params)
        params, state = _train(step, params, state, first)
        if name == "tp2_ep2":
            errors = _mesh_errors(tmp, params, state, DeviceMesh)
        # (dp=2, tp=2) saves asynchronously, with mesh= (still accepted): what it writes
        # is staged before training goes on. The others find their mesh in the state.
        if name == "dp2_tp2":
            handle = fs.save(ckpt, params, state, mesh=step.mesh, async_save=True)
        else:
            fs.save(ckpt, params, state)
        saved = _snapshot(params, state)
        params, state = _train(step, params, state, rest)
        want = _snapshot(params, state)
        if name == "dp2_tp2":
            handle.wait()

        step, params = _build(names, mesh, zero)
        params, state = fs.load(ckpt, step, params)
        # shard_zero records its unit order in the first step: a fresh step has none yet.
        first_step = lambda d: {k: v for k, v in d.items() if not k.startswith("shard_zero/order")}
        failures += _differences(
            f"{name} load", first_step(saved), first_step(_snapshot(params, state))
        )
        params, state = _train(step, params, state, rest)
        failures += _differences(f"{name} resume", want, _snapshot(params, state))
        if zero:
            continue

        pieces[name] = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}
        coords[name] = {n: mesh[n].get_local_rank() for n in names}
        layouts[name] = dict(zip(state["layout"].paths, state["layout"].placements, strict=True))

    # The world of one's checkpoint into (tp=2, ep=2): the slices step.init cuts.
    names, sizes = STACKS["tp2_ep2"]
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
    step, params = _build(names, mesh)
    sliced, _ = step.init({k: v.clone() for k, v in w1_params.items()})
    step, params = _build(names, mesh)
    params, state = fs.load(os.path.join(tmp, "w1"), step, params)
    loaded = _snapshot(params, state)
    failures += _differences(
        "w1 -> tp2_ep2 params",
        {f"params/{k}": v for k, v in sliced.items()},
        {k: v for k, v in loaded.items() if k.startswith("params/")},
    )
    pieces["w1"] = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return failures, pieces, coords, layouts, errors


def _mesh_errors(tmp, params, state, DeviceMesh) -> dict:  # noqa: N803
    """What saves of the (tp=2, ep=2) state with a wrong mesh, or none recorded, raise."""
    bad = os.path.join(tmp, "bad")
    # Same dims and sizes, ranks in another order: ranks 0 and 3 keep their coordinates.
    transposed = DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("tp", "ep"))
    unrecorded = {**state, "layout": dataclasses.replace(state["layout"], mesh=None)}
    return {
        "dims": error_text(lambda: fs.save(bad, params, state, mesh=_mesh((2, 2), ("dp", "tp")))),
        "transposed": error_text(lambda: fs.save(bad, params, state, mesh=transposed)),
        "unrecorded": error_text(lambda: fs.save(bad, params, unrecorded)),
        "written": os.path.exists(bad),
    }


def _mesh(sizes, names):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", sizes, mesh_dim_names=names)


def _assemble(pieces, placement: Placement, sizes: dict) -> torch.Tensor:
    """The full tensor from every rank's (piece, mesh coordinates): rank-major over the
    shard dims along ``dim``, in each of ``chunks`` fused blocks; ``extra`` splits
    evenly along their own dims."""
    full = torch.full(placement.shape, float("nan"), dtype=pieces[0][0].dtype)
    parts = math.prod(sizes[d] for d in placement.shard)
    dim, chunks = placement.dim, placement.chunks
    rows = placement.shape[dim] // chunks // parts
    for piece, at in pieces:
        index = [slice(None)] * len(placement.shape)
        for d, axis in placement.extra:
            n = placement.shape[axis] // sizes[d]
            index[axis] = slice(at[d] * n, (at[d] + 1) * n)
        part = 0
        for d in placement.shard:
            part = part * sizes[d] + at[d]
        for k in range(chunks):
            start = k * parts * rows + part * rows
            index[dim] = slice(start, start + rows)
            full[tuple(index)] = piece.narrow(dim, k * rows, rows)
    assert not torch.isnan(full).any()
    return full


def _full(results, name, stack) -> dict:
    """Every tensor entry of ``name``'s pieces, re-assembled (a per-param moment by
    its param's placement)."""
    names, sizes = STACKS[stack]
    layout = results[0][3][stack]
    out = {}
    for key in results[0][1][name]:
        placement = layout.get(key.rsplit("/", 1)[-1])
        if placement is None or not placement.split_dims:
            out[key] = results[0][1][name][key]
            continue
        pieces = [(r[1][name][key], r[2][stack]) for r in results]
        out[key] = _assemble(pieces, placement, dict(zip(names, sizes, strict=True)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    step, params = _build()
    params, state = step.init(params)
    params, state = _train(step, params, state, _batches(N, 1))
    fs.save(tmp / "w1", params, state)
    w1 = _snapshot(params, state)
    w1_params = {k[len("params/") :]: v for k, v in w1.items() if k.startswith("params/")}
    results = run_world(_rank, 4, str(tmp), w1_params, timeout=240)
    return tmp, w1, results


def test_expert_and_tensor_parallel_checkpoints_resume_exactly_and_reshard(world):
    tmp, w1, results = world
    failures = [f"rank {r}: {f}" for r, res in enumerate(results) for f in res[0]]
    assert not failures, "\n".join(failures)

    # Each stack's checkpoint into the world of one: the ranks' pieces re-assembled.
    for name in STACKS:
        step, params = _build()
        params, state = fs.load(tmp / name, step, params)
        got = _snapshot(params, state)
        full = _full(results, name, name)
        assert {k for k, v in got.items() if isinstance(v, torch.Tensor)} == set(full)
        for k, v in full.items():
            assert torch.equal(got[k], v), f"{name} -> world of one: {k}"
        assert got["count"] == N and got["optimizer/count"] == N

    # The world of one's checkpoint into (tp=2, ep=2): pieces re-assemble to it.
    full = _full(results, "w1", "tp2_ep2")
    for k, v in full.items():
        assert torch.equal(w1[k], v), f"world of one -> tp2_ep2: {k}"
    split = results[0][3]["tp2_ep2"]
    assert split["blocks.0.attn.qkv.weight"].chunks == 3
    assert split["blocks.0.moe.experts.w_in"].extra == (("tp", 2),)

    # mesh= other than the state's: every rank raises, naming both meshes; nothing written.
    for rank, res in enumerate(results):
        errors = res[4]
        assert not errors["written"], rank
        for what in ("dims", "transposed"):
            message = errors[what]
            assert message.startswith("ValueError: fs.save(mesh="), (rank, what, message)
            assert "laid out by step.init on Mesh(tp=2, ep=2)" in message, (rank, message)
            assert "Leave mesh= out" in message
        assert "of Mesh(dp=2, tp=2)" in errors["dims"], errors["dims"]
        # Ranks 0 and 3 sit at the same coordinates in both meshes: they raise with the rest.
        moved = rank in (1, 2)
        assert ("agrees on this rank but not on another" in errors["transposed"]) != moved
        message = errors["unrecorded"]
        assert "is split over mesh dims" in message and "records no mesh" in message, message
        assert "mesh=step.mesh" in message


def test_stored_tensors_take_only_dim_0_row_blocks(tmp_path):
    stored = StoredTensor(str(tmp_path / "swap"), 0, (6, 4), torch.float32, None)
    for placement in (
        Placement((12, 4), ("tp",), (), 0, chunks=3),
        Placement((12, 8), ("ep",), (), 0, extra=(("tp", 1),)),
        Placement((6, 8), ("tp",), (), 1),
    ):
        with pytest.raises(ValueError, match="whole dim-0 row blocks only"):
            _pieces(placement, _Coords(0, 2, ((0, 2),) * len(placement.extra)), local=stored)


def test_fused_blocks_and_extra_splits_become_one_region_per_block():
    p = Placement((12, 8, 6), ("tp",), ("dp",), 0, chunks=3, extra=(("ep", 2),))
    local = torch.arange(6 * 8 * 3).view(6, 8, 3)  # 12 / 3 blocks / 2 parts: 2 rows each
    regions = _pieces(p, _Coords(1, 2, ((1, 2),)), local=local).parts
    assert [r.offsets for r in regions] == [(2, 0, 3), (6, 0, 3), (10, 0, 3)]
    assert all(r.sizes == (2, 8, 3) for r in regions)
    assert torch.equal(regions[1].local, local[2:4])
