"""fs.save / fs.load: exact resume, resharding across worlds, meshes and stacks, bad input.

- Exact resume: N steps + save + load into a fresh step + M steps equals N + M
  uninterrupted steps bit for bit (params, every state tensor, every plain value) in
  fp32 on worlds 1 and 2: plain, shard_zero 1/2/3, bf16, fp16 (loss scale and its
  window), offload cpu and nvme. AdamW with a warmup schedule: a lost step count
  changes the learning rate and shows.
- Reshard: ZeRO-3 on world 4 -> ZeRO-1 on world 2 -> plain on world 1, and HSDP
  (2, 2) -> plain: the loaded params equal the saved run's gathered params exactly,
  and training on equals the saved run's continued training (to reduction order).
- Async saves of offloaded state: copied lazily, or with offload's buffers kept while
  the next update writes second ones; either way the checkpoint holds the call's
  state and training goes on bit for bit as without the save.
- Run directories: ``at=``/``keep=`` rotation, the ``latest`` pointer, a killed
  save's temp directory ignored.
- Bad checkpoints and bad calls raise naming the fix.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.state import StoredTensor, TensorEntry, describe
from tests.dist import run_world
from tests.helpers import lm_batches, lm_loss

# Uneven: vocab 37 and d_model 10 are padded row blocks over 2 and 4 ranks.
CFG = GPTConfig(vocab_size=37, n_layer=2, n_head=2, d_model=10, seq_len=6, bias=False)
CFG = CFG.replace(tie_embeddings=False)
GLOBAL_BATCH = 4
N, M = 3, 3

# name -> transforms, innermost first: ("mp", dtype), ("zero", stage), ("offload", tier)
STACKS = {
    "plain": (),
    "zero1": (("zero", 1),),
    "zero2": (("zero", 2),),
    "zero3": (("zero", 3),),
    "bf16": (("mp", "bf16"),),
    "fp16": (("mp", "fp16"),),
    "bf16 zero1": (("mp", "bf16"), ("zero", 1)),
    "offload cpu": (("offload", "cpu"),),
    "zero2 offload cpu": (("zero", 2), ("offload", "cpu")),
    # The checkpoint keeps the masters alone ([Note: mirrored params]).
    "bf16 zero3 offload cpu": (("mp", "bf16"), ("zero", 3), ("offload", "cpu")),
    "offload nvme": (("offload", "nvme"),),
    # ZeRO-Offload's DPU: at the save, step N's update is still pending on the host.
    "offload cpu delayed": (("offload-delayed", "cpu"),),
}


def _model(cfg=CFG):
    torch.manual_seed(0)
    return GPT(cfg)


def _build(layers, *, mesh=None, swap=None, cfg=CFG, optimizer=None, clip_norm=1.0):
    params, apply = fs.functional(copy.deepcopy(_model(cfg)))
    lr = fs.optim.linear_warmup(1e-2, 4)
    opt = optimizer or fs.optim.adamw(lr, weight_decay=0.1)
    step = fs.train_step(lm_loss(apply), opt, clip_norm=clip_norm, mesh=mesh)
    for kind, arg in layers:
        if kind == "mp":
            # A small growth interval: the window counters move within the run.
            step = fs.mixed_precision(step, arg, init_scale=2.0**15, growth_interval=2)
        elif kind == "zero":
            step = fs.shard_zero(step, arg, mesh=mesh)
        else:
            kw = {"path": swap} if swap else {}
            if kind == "offload-delayed":
                kw["delayed_update"] = True
            if kind == "offload-params":  # the params' host shards are the masters
                kw["what"] = ("params", "optimizer")
            step = fs.offload(step, arg, subgroup_mb=2e-3, **kw)
    return step, params


def _batches(rank, world, n, seed):
    per = GLOBAL_BATCH // world
    out = []
    for b in lm_batches(n, GLOBAL_BATCH, CFG.seq_len, vocab=CFG.vocab_size, seed=seed):
        out.append({k: v[rank * per : (rank + 1) * per] for k, v in b.items()})
    return out


def _train(step, params, state, batches):
    for b in batches:
        params, state, _ = step(params, state, b)
    return params, state


def _snapshot(params, state) -> dict:
    """Everything a resume must reproduce: gathered params, every state entry."""
    out = {f"params/{k}": v.clone() for k, v in fs.gather_params(params, state).items()}
    for path, e in describe(state).items():
        if isinstance(e, TensorEntry):
            out[path] = e.tensor.clone()
        elif isinstance(e, StoredTensor):
            out[path] = e.read()
        elif path.startswith("generation"):
            continue  # the stale-state guard counts calls since step.init, not steps
        elif not path.startswith(("layout/", "offload/groups/")) or path.endswith("updates"):
            out[path] = e
    return out


def _close(state) -> None:
    if hasattr(state.get("offload"), "close"):
        state["offload"].close()


def _resume_case(rank, world, name, tmp) -> list[str]:
    """N + M steps straight vs N steps, save, load into a fresh step, M steps."""
    layers = STACKS[name]
    swap = os.path.join(tmp, f"swap-{rank}") if ("offload", "nvme") in layers else None
    if swap:
        os.makedirs(swap, exist_ok=True)
    first, rest = _batches(rank, world, N, seed=1), _batches(rank, world, M, seed=2)
    ckpt = os.path.join(tmp, name.replace(" ", "_"))
    step, params = _build(layers, swap=swap)
    params, state = step.init(params)
    params, state = _train(step, params, state, first)
    fs.save(ckpt, params, state, extra={"rank": rank, "rng": torch.get_rng_state()})
    params, state = _train(step, params, state, rest)
    want = _snapshot(params, state)
    _close(state)

    step, params = _build(layers, swap=swap)
    params, state = fs.load(ckpt, step, params)
    params, state = _train(step, params, state, rest)
    got = _snapshot(params, state)
    _close(state)
    failures = []
    if set(want) != set(got):
        failures.append(f"{name}: entries differ {sorted(set(want) ^ set(got))[:6]}")
    for path in sorted(set(want) & set(got)):
        w, g = want[path], got[path]
        same = torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g
        if not same:
            failures.append(f"{name}: {path} differs after resume")
    extra = fs.load_extra(ckpt)
    if extra["rank"] != rank:
        failures.append(f"{name}: extra of rank {extra['rank']} read on rank {rank}")
    return failures


def _kept_async_case(rank, world, tmp) -> list[str]:
    """ZeRO-2 + offload(cpu) on every rank: an async save keeping offload's buffers
    ([Note: keeping the owner's buffers]) while M steps run; the run equals one
    without the save and the checkpoint holds the call's state, on each rank."""
    layers = STACKS["zero2 offload cpu"]
    first, rest = _batches(rank, world, N, seed=1), _batches(rank, world, M, seed=2)
    ckpt = os.path.join(tmp, f"kept-w{world}")
    step, params = _build(layers)
    params, state = step.init(params)
    params, state = _train(step, params, state, first)
    at_call = _snapshot(params, state)
    io = fs.checkpoint.SaveIO(snapshot="second_buffer")
    handle = fs.save(ckpt, params, state, async_save=True, io=io)
    params, state = _train(step, params, state, rest)
    handle.wait()
    with_save = _snapshot(params, state)
    kept = state["offload"].seconds is not None
    _close(state)
    step, params = _build(layers)
    params, state = step.init(params)
    params, state = _train(step, params, state, first + rest)
    straight = _snapshot(params, state)
    _close(state)
    step, params = _build(layers)
    params, state = fs.load(ckpt, step, params)
    loaded = _snapshot(params, state)
    _close(state)
    failures = [] if kept else ["kept async: offload allocated no second buffers"]
    for what, got, want in (("run", with_save, straight), ("checkpoint", loaded, at_call)):
        for k in sorted(set(want) & set(got)):
            w, g = want[k], got[k]
            if not (torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g):
                failures.append(f"kept async: {what} differs at {k}")
    return failures


def _resume_world(rank, world, tmp) -> list[str]:
    failures = []
    for name in STACKS:
        failures += _resume_case(rank, world, name, os.path.join(tmp, f"w{world}"))
    return failures + _kept_async_case(rank, world, tmp)


def test_exact_resume_world_2(tmp_path):
    results = run_world(_resume_world, 2, str(tmp_path))
    failures = [f"rank {r}: {f}" for r, fs_ in enumerate(results) for f in fs_]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", list(STACKS))
def test_exact_resume_world_1(tmp_path, name):
    failures = _resume_case(0, 1, name, str(tmp_path))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- reshard


def _save_world_4(rank, world, tmp):
    """ZeRO-3 on a 1-D mesh and ZeRO-2 HSDP on (2, 2): N steps, save, M more."""
    from torch.distributed.device_mesh import init_device_mesh

    first, rest = _batches(rank, world, N, seed=1), _batches(rank, world, M, seed=2)
    out = {}
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for name, layers, mesh in (
        ("zero3", (("zero", 3),), None),
        ("hsdp", (("zero", 2),), mesh2d),
    ):
        step, params = _build(layers, mesh=mesh)
        params, state = step.init(params)
        params, state = _train(step, params, state, first)
        fs.save(os.path.join(tmp, name), params, state, at=N, keep=2)
        saved = fs.gather_params(params, state)
        params, state = _train(step, params, state, rest)
        out[name] = (saved, fs.gather_params(params, state))
    return out


def _reshard_world_2(rank, world, tmp):
    """ZeRO-1 on world 2, with and without offload, loads the world-4 ZeRO-3 checkpoint,
    saves asynchronously and trains on while it is written (offload's host state is
    copied lazily: [Note: lazy snapshot])."""
    out = {}
    for name, layers in (
        ("zero1", (("zero", 1),)),
        ("zero1-offload", (("zero", 1), ("offload", "cpu"))),
    ):
        step, params = _build(layers)
        params, state = fs.load(os.path.join(tmp, "zero3"), step, params)
        loaded = fs.gather_params(params, state)
        handle = fs.save(os.path.join(tmp, name), params, state, async_save=True)
        params, state = _train(step, params, state, _batches(rank, world, M, seed=2))
        assert handle.wait() == os.path.join(tmp, name)
        out[name] = (loaded, fs.gather_params(params, state), state["count"])
        _close(state)
    return out


@pytest.mark.parametrize(
    "layers, left_out",
    [
        ((("zero", 3), ("offload", "cpu")), "params/"),  # the flat shards: fp32 params
        ((("mp", "bf16"), ("zero", 1), ("offload", "cpu")), "shard_zero/master/"),
        ((("offload-delayed", "cpu"),), None),  # DPU: the params lag the masters
    ],
    ids=["zero3", "bf16-zero1", "delayed"],
)
def test_a_mirrored_master_is_saved_alone_and_loads_into_a_plain_step(tmp_path, layers, left_out):
    """[Note: mirrored params]: offload's masters stand for the copies of their params
    with their dtype, which the checkpoint leaves out; a plain step loads the masters'
    values into its params. Under a delayed update nothing is left out."""
    import torch.distributed.checkpoint as dcp

    step, params = _build(layers)
    params, state = step.init(params)
    params, state = _train(step, params, state, _batches(0, 1, 2, seed=1))
    entries = describe(state)
    masters = {p: entries[f"offload/master/{p}"].tensor.clone() for p in params}
    gathered = {p: t.clone() for p, t in fs.gather_params(params, state).items()}
    if left_out is not None:  # the invariant the master claims: its copies hold its bytes
        for p, master in masters.items():
            copies = [gathered[p]] + [
                e.tensor for k, e in entries.items() if k.endswith(f"master/{p}")
            ]
            for c in copies:
                if c.dtype == master.dtype:
                    assert torch.equal(c.reshape(master.shape), master), p
    ckpt = tmp_path / "ck"
    fs.save(ckpt, params, state)
    _close(state)
    keys = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert {f"offload/master/{p}" for p in params} <= keys
    if left_out is None:
        assert {f"params/{p}" for p in params} <= keys
    else:
        assert not [k for k in keys if k.startswith(left_out)]
    plain, fresh = _build(())
    loaded, plain_state = fs.load(ckpt, plain, fresh)
    for p, master in masters.items():
        want = gathered[p] if left_out is None else master.view(loaded[p].shape)
        assert torch.equal(loaded[p], want.float()), p
    # And back into the stack that saved it: the same masters, its params from them.
    step, fresh = _build(layers)
    back, state = fs.load(ckpt, step, fresh)
    entries = describe(state)
    for p, master in masters.items():
        assert torch.equal(entries[f"offload/master/{p}"].tensor, master), p
    _close(state)


def test_reshard_zero3_world_4_to_zero1_world_2_to_plain_world_1_and_hsdp_to_plain(tmp_path):
    tmp = str(tmp_path)
    w4 = run_world(_save_world_4, 4, tmp)[0]
    assert sorted(os.listdir(tmp_path / "zero3")) == ["latest", f"step-{N}"]
    w2 = run_world(_reshard_world_2, 2, tmp)
    saved, continued = w4["zero3"]
    for ranks in w2:
        for loaded, trained, count in ranks.values():
            _equal(loaded, saved)
            _close_to(trained, continued)
            assert count == N + M
    # World 1, plain: from the world-2 ZeRO-1 checkpoints, and from HSDP's.
    rest = _batches(0, 1, M, seed=2)
    for ckpt, (saved, continued) in (
        ("zero1", w4["zero3"]),
        ("zero1-offload", w4["zero3"]),
        ("hsdp", w4["hsdp"]),
    ):
        step, params = _build(())
        params, state = fs.load(tmp_path / ckpt, step, params)
        _equal(params, saved)
        params, state = _train(step, params, state, rest)
        _close_to(params, continued)
        assert state["count"] == N + M and state["optimizer"].count == N + M


def _equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k], w) if isinstance(w, torch.Tensor) else got[k] == w, k


def _close_to(got: dict, want: dict) -> None:
    # Another world size reduces grads in another order: equal to rounding.
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- async


ASYNC_STACKS = {
    **{k: STACKS[k] for k in ("zero3", "offload nvme", "offload cpu", "offload cpu delayed")},
    "zero3 offload params cpu": (("zero", 3), ("offload-params", "cpu")),
    # No clip: the sub-groups are updated while backward runs ([Note: streaming grads
    # in backward]), each update announcing its writes from inside backward.
    "offload cpu streamed": (("offload", "cpu"),),
}


@pytest.mark.parametrize(
    ("name", "where"),
    [(name, "auto") for name in ASYNC_STACKS]
    + [(name, "host") for name in ASYNC_STACKS if "cpu" in name],
)
def test_async_save_writes_the_state_of_its_call_while_training_goes_on(
    tmp_path, name, where, monkeypatch
):
    """Offloaded host state is copied lazily ([Note: lazy snapshot]), or kept whole
    while the next update writes elsewhere ("auto": [Note: keeping the owner's
    buffers]). Here with no copy threads and the writer held until a step has run:
    that step's updates must copy (``before_write``) what the save still needs."""
    from fscale import checkpoint
    from fscale._checkpoint import snapshot

    gate = threading.Event()
    write = checkpoint._write_closing

    def held(*args):
        assert gate.wait(60)
        return write(*args)

    monkeypatch.setattr(checkpoint, "_write_closing", held)
    monkeypatch.setattr(snapshot.LazySnapshot, "_copier", lambda self: None)
    layers = ASYNC_STACKS[name]
    swap = str(tmp_path) if name == "offload nvme" else None
    clip = None if name.endswith("streamed") else 1.0

    def build():
        return _build(layers, swap=swap, clip_norm=clip)

    step, params = build()
    params, state = step.init(params)
    if name.endswith("streamed"):
        assert state["offload"].stream is not None
    params, state = _train(step, params, state, _batches(0, 1, N, seed=1))
    want = _snapshot(params, state)
    io = fs.checkpoint.SaveIO(snapshot=where)
    first = fs.save(tmp_path / "run", params, state, at=N, async_save=True, io=io)
    params, state = _train(step, params, state, _batches(0, 1, 1, seed=2))
    gate.set()
    # At most one in flight: the next save waits for the first.
    second = fs.save(tmp_path / "run", params, state, at=N + 1, async_save=True, io=io)
    assert first.done()
    params, state = _train(step, params, state, _batches(0, 1, 1, seed=3))
    assert second.wait() == str(tmp_path / "run" / f"step-{N + 1}")
    _close(state)
    _loads_as(tmp_path / "run" / f"step-{N}", build, want)


def _loads_as(path, build, want: dict) -> None:
    """The checkpoint at ``path``, loaded into a fresh ``build()``, is ``want``: every
    tensor; plain metadata a first step records (shard_zero's unit order) may be absent
    from a step that has not run yet."""
    step, params = build()
    params, state = fs.load(path, step, params)
    got = _snapshot(params, state)
    _close(state)
    assert {k for k, v in want.items() if isinstance(v, torch.Tensor)} <= set(got)
    for k in set(want) & set(got):
        w, g = want[k], got[k]
        assert torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g, k


KEPT_STACKS = {
    **{k: ASYNC_STACKS[k] for k in ("offload cpu", "offload cpu delayed", "offload cpu streamed")},
    "zero2 offload cpu": STACKS["zero2 offload cpu"],
    # The masters are the params' host shards: announced, copied; the moments kept.
    "zero3 offload params cpu": ASYNC_STACKS["zero3 offload params cpu"],
    # Writes of its own (momentum): its buffers are not offered, the save copies them.
    "offload cpu sgd": (("offload", "cpu"),),
    # The step after the call is skipped (a non-finite loss): nothing is updated.
    "offload cpu nan": (("offload", "cpu"),),
}


def _poisoned(apply):
    """``lm_loss`` plus ``0 * batch["poison"]``: a NaN poison makes the loss NaN."""
    loss = lm_loss(apply)
    return lambda params, batch: loss(params, batch) + 0.0 * batch["poison"].sum()


@pytest.mark.parametrize("name", list(KEPT_STACKS))
def test_a_save_keeping_offloads_buffers_copies_nothing_and_changes_no_step(
    tmp_path, name, monkeypatch
):
    """[Note: keeping the owner's buffers]: with ``snapshot="second_buffer"`` the save
    copies no byte of offload's sub-group buffers; the first update of each group after
    the call writes its second buffer (the writer held until two steps have run), and
    the run equals one without the save bit for bit; the checkpoint holds the call's
    state."""
    from fscale import checkpoint
    from fscale._checkpoint import snapshot

    gate = threading.Event()
    write, copy_of = checkpoint._write_closing, snapshot._copy_of
    copied = []

    def held(*args):
        assert gate.wait(60)
        return write(*args)

    def counted(src, buf, **kw):
        copied.append(src.nbytes)
        return copy_of(src, buf, **kw)

    from fscale._checkpoint import writer

    host, cloned = writer._host, []

    def viewed(t):  # the writer must not copy the kept buffers either
        out = host(t)
        if out.data_ptr() != t.data_ptr():
            cloned.append(t.nbytes)
        return out

    monkeypatch.setattr(checkpoint, "_write_closing", held)
    monkeypatch.setattr(snapshot, "_copy_of", counted)
    monkeypatch.setattr(writer, "_host", viewed)
    layers = KEPT_STACKS[name]
    clip = None if name.endswith("streamed") else 1.0
    opt = fs.optim.sgd(fs.optim.linear_warmup(1e-2, 4), momentum=0.9) if "sgd" in name else None
    poison = [0.0] * (N + 3)
    if name.endswith("nan"):
        poison[N] = float("nan")
    batches = _batches(0, 1, N + 3, seed=1)
    batches = [{**b, "poison": torch.full((1,), x)} for b, x in zip(batches, poison, strict=True)]

    def build():
        step, params = _build(layers, clip_norm=clip, optimizer=opt)
        if name.endswith("nan"):
            _, apply = fs.functional(_model())
            step = fs.offload(
                fs.train_step(_poisoned(apply), fs.optim.adamw(1e-2), clip_norm=1.0),
                "cpu", subgroup_mb=2e-3,
            )  # fmt: skip
        return step, params

    step, params = build()
    params, state = step.init(params)
    params, state = _train(step, params, state, batches[:N])
    want = _snapshot(params, state)
    handle = state["offload"]
    live = list(handle.buffers)
    io = fs.checkpoint.SaveIO(snapshot="second_buffer")
    saved = fs.save(tmp_path / "run", params, state, at=N, async_save=True, io=io)
    params, state = _train(step, params, state, batches[N : N + 2])
    handle.wait()
    if "sgd" in name:
        assert handle.seconds is None and handle.buffers == live
    else:
        assert [b.data_ptr() for b in handle.seconds] == [b.data_ptr() for b in live]
        assert not {b.data_ptr() for b in handle.buffers} & {b.data_ptr() for b in live}
    gate.set()
    saved.wait()
    masters = sum(t.nbytes for t in handle.shared_masters or ()) if "params" in name else 0
    if "sgd" in name:  # every master and momentum, copied
        host = [t for k, t in want.items() if k.startswith(("offload/", "optimizer/"))]
        assert sum(copied) == sum(t.nbytes for t in host if isinstance(t, torch.Tensor))
    else:
        assert sum(copied) == masters
    assert sum(cloned) == 0, cloned
    params, state = _train(step, params, state, batches[N + 2 :])
    got_run = _snapshot(params, state)
    _close(state)

    step, params = build()
    params, state = step.init(params)
    params, state = _train(step, params, state, batches)
    _equal(got_run, _snapshot(params, state))
    _close(state)
    if name.endswith("nan"):
        assert state["guard"]["skipped_steps"] == 1
    _loads_as(tmp_path / "run" / f"step-{N}", build, want)


def test_auto_keeps_buffers_only_where_the_host_has_room_for_the_second_ones(monkeypatch):
    """``SaveIO(snapshot="auto")``: the owners' buffers are kept where the host's
    available memory holds the second buffers still to allocate; else copies."""
    from fscale import checkpoint
    from fscale._checkpoint import snapshot
    from fscale._checkpoint.snapshot import LazySnapshot

    monkeypatch.setattr(snapshot, "_POOL", {})  # no pooled copies of earlier tests
    step, params = _build(STACKS["offload cpu"])
    params, state = step.init(params)
    try:
        snap = LazySnapshot()
        checkpoint._stage(checkpoint._save_state_dict(params, state, None), "auto", snap)
        need = snap.second_bytes()
        assert need == sum(b.nbytes for b in state["offload"].buffers) > 0
        room = need + checkpoint.STAGING_MARGIN
        monkeypatch.setattr(checkpoint, "_host_available", lambda: room - 1)
        assert not checkpoint._keeps_buffers(snap, "auto")
        assert checkpoint._keeps_buffers(snap, "second_buffer")
        assert not checkpoint._keeps_buffers(snap, "host")
        monkeypatch.setattr(checkpoint, "_host_available", lambda: room)
        assert checkpoint._keeps_buffers(snap, "auto")
        state["offload"].second(0)  # allocated: nothing left to find room for
        assert snap.second_bytes() == 0
    finally:
        _close(state)


def test_a_save_keeping_buffers_frees_the_pooled_copies_first(tmp_path, monkeypatch):
    """After a save that copied (its copies pooled: [Note: kept copies]), "auto" counts
    the pool as room for the second buffers, and the save that keeps buffers frees the
    pooled copies it will not use before allocating them: the host never holds both."""
    from fscale import checkpoint
    from fscale._checkpoint import snapshot
    from fscale.transforms._offload.state import OffloadState

    monkeypatch.setattr(snapshot, "_POOL", {})  # no pooled copies of earlier tests
    pooled_at_allocation, second = [], OffloadState.second

    def seen(self, k, allocate=True):
        if allocate and self.seconds is None:
            pooled_at_allocation.append(snapshot.pooled_bytes())
        return second(self, k, allocate)

    monkeypatch.setattr(OffloadState, "second", seen)
    step, params = _build(STACKS["offload cpu"])
    params, state = step.init(params)
    try:
        params, state = _train(step, params, state, _batches(0, 1, 1, seed=1))
        io = fs.checkpoint.SaveIO(snapshot="host")
        fs.save(tmp_path / "copied", params, state, async_save=True, io=io).wait()
        need = sum(b.nbytes for b in state["offload"].buffers)
        pooled = snapshot.pooled_bytes()
        assert pooled > 0 and need > 0
        room = max(0, need + checkpoint.STAGING_MARGIN - pooled)
        monkeypatch.setattr(checkpoint, "_host_available", lambda: room)
        want = _snapshot(params, state)
        handle = fs.save(tmp_path / "kept", params, state, async_save=True)  # "auto"
        params, state = _train(step, params, state, _batches(0, 1, 1, seed=2))
        handle.wait()
        assert state["offload"].seconds is not None  # buffers kept: pool counted as room
        # offload(cpu)'s host state is all in its buffers: no pooled copy is left.
        assert pooled_at_allocation == [0]
    finally:
        _close(state)
    _loads_as(tmp_path / "kept", lambda: _build(STACKS["offload cpu"]), want)


def test_second_buffers_that_cannot_be_allocated_mean_copies_or_a_clear_error(
    tmp_path, monkeypatch
):
    """A refused allocation of the second buffers: "auto" warns and copies the state
    (the save is right, nothing stays held); "second_buffer" raises from the call."""
    from fscale import state as protocol
    from fscale.transforms._offload.state import OffloadState

    def refused(self, k, allocate=True):
        if allocate:
            raise RuntimeError("cudaHostRegister: out of memory")
        return None

    monkeypatch.setattr(OffloadState, "second", refused)
    step, params = _build(STACKS["offload cpu"])
    params, state = step.init(params)
    try:
        params, state = _train(step, params, state, _batches(0, 1, 1, seed=1))
        want = _snapshot(params, state)
        with pytest.warns(UserWarning, match="copies their state instead"):
            handle = fs.save(tmp_path / "auto", params, state, async_save=True)
        params, state = _train(step, params, state, _batches(0, 1, 1, seed=2))
        handle.wait()
        assert not protocol.held(state["offload"].buffers[0])
        io = fs.checkpoint.SaveIO(snapshot="second_buffer")
        with pytest.raises(RuntimeError, match="cudaHostRegister"):
            fs.save(tmp_path / "kept", params, state, async_save=True, io=io)
        assert not any(protocol.held(b) for b in state["offload"].buffers)
        params, state = _train(step, params, state, _batches(0, 1, 1, seed=3))
    finally:
        _close(state)
    _loads_as(tmp_path / "auto", lambda: _build(STACKS["offload cpu"]), want)


# ----------------------------------------------------------------------------- files


def _trained():
    step, params = _build(())
    params, state = step.init(params)
    return step, *_train(step, params, state, _batches(0, 1, 1, seed=1))


def test_run_directory_rotation_latest_and_a_killed_save(tmp_path):
    step, params, state = _trained()
    for at in range(1, 6):
        assert fs.save(tmp_path, params, state, at=at, keep=3) == str(tmp_path / f"step-{at}")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-3", "step-4", "step-5"]
    assert (tmp_path / "latest").read_text().strip() == "step-5"
    assert fs.latest(tmp_path) == str(tmp_path / "step-5")
    # A save killed mid-write leaves a temp directory (no .metadata): never read.
    partial = tmp_path / "step-6.tmp-dead"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    fresh, full = _build(())
    loaded, _ = fs.load(tmp_path, fresh, full)
    _equal(loaded, params)
    # Saving over an existing checkpoint replaces it whole.
    fs.save(tmp_path / "step-5", params, state)
    assert fs.latest(tmp_path / "step-5") == str(tmp_path / "step-5")


class _Killed(BaseException):
    """Raised at an injected crash point: like SIGKILL, no ``except Exception`` stops it."""


def inject_crashes(monkeypatch, targets) -> dict:
    """Every call of ``targets`` ((module, name) pairs) counts in ``calls["n"]``; the
    call numbered ``calls["at"]`` raises ``_Killed`` instead. Returns ``calls``."""
    calls = {"n": 0, "at": None}

    def crashing(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise _Killed(f"crash point {calls['n']}")
            return fn(*args, **kwargs)

        return wrapper

    for mod, name in targets:
        monkeypatch.setattr(mod, name, crashing(getattr(mod, name)))
    return calls


def crash_at_each_point(calls: dict, base, root, save):
    """For each crash point k counted in ``calls``: a copy of ``base`` at ``root/crash<k>``
    on which ``save(path)`` was killed at point k (it must raise); yields that path."""
    for k in range(1, calls["n"] + 1):
        path = root / f"crash{k}"
        shutil.copytree(base, path)
        calls.update(n=0, at=k)
        with pytest.raises((_Killed, CheckpointException)):  # DCP wraps what its steps raise
            save(path)
        calls.update(at=None)
        yield path


def test_a_crash_at_any_file_operation_of_a_save_leaves_a_loadable_checkpoint(
    tmp_path, monkeypatch
):
    # Every file operation of a save (each tensor written, each fsync, rename, replace,
    # rmtree) is a crash point; after a crash at any of them, loading the run gives the
    # old checkpoint or the new one, whole.
    step, params, state = _trained()
    old = {k: v.clone() for k, v in params.items()}
    base = tmp_path / "base"
    fs.save(base, params, state, at=1)
    params, state = _train(step, params, state, _batches(0, 1, 1, seed=5))
    new = {k: v.clone() for k, v in params.items()}
    targets = ((os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree"), (torch, "save"))
    calls = inject_crashes(monkeypatch, targets)
    fs.save(tmp_path / "count", params, state, at=2, keep=1)
    assert calls["n"] >= 20, calls["n"]
    seen = set()
    save = lambda run: fs.save(run, params, state, at=2, keep=1)  # noqa: E731
    for run in crash_at_each_point(calls, base, tmp_path, save):
        fresh, full = _build(())
        loaded, _ = fs.load(run, fresh, full)
        which = "new" if torch.equal(loaded["head.weight"], new["head.weight"]) else "old"
        _equal(loaded, new if which == "new" else old)
        seen.add(which)
    assert seen == {"old", "new"}


# ----------------------------------------------------------------------------- errors


def test_bad_checkpoints_raise_naming_the_fix(tmp_path):
    step, params, state = _trained()
    good = tmp_path / "good"
    fs.save(good, params, state)
    fresh = lambda: _build(())  # noqa: E731

    with pytest.raises(FileNotFoundError, match="no such directory"):
        fs.load(tmp_path / "nope", *fresh())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save did not finish"):
        fs.load(tmp_path / "empty", *fresh())
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="corrupt"):
        fs.load(bad, *fresh())
    # A data file gone or cut short: named.
    for name, damage in (("gone", "remove"), ("cut", "truncate")):
        broken = tmp_path / name
        shutil.copytree(good, broken)
        data = broken / "__0_0.distcp"
        if damage == "remove":
            data.unlink()
        else:
            with open(data, "r+b") as f:
                f.truncate(100)
    with pytest.raises(ValueError, match="data file '__0_0.distcp' is missing"):
        fs.load(tmp_path / "gone", *fresh())
    with pytest.raises(ValueError, match="'__0_0.distcp' has 100 bytes.*truncated"):
        fs.load(tmp_path / "cut", *fresh())
    # A block of a data file overwritten in the middle (same size): its checksum names it;
    # without the checksum records the checkpoint is refused.
    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    # Written by DCP's own loop (no piece per item): the file is verified whole first.
    whole = tmp_path / "whole"
    fs.save(whole, params, state, io=fs.checkpoint.SaveIO(pinned=0))
    fs.load(whole, *fresh())
    for damaged in (flipped, whole):
        data = damaged / "__0_0.distcp"
        with open(data, "r+b") as f:
            f.seek(data.stat().st_size // 2)
            f.write(b"\x00\xff" * 4)
        with pytest.raises(ValueError, match="'__0_0.distcp' does not match its checksum"):
            fs.load(damaged, *fresh())
    (flipped / "__checksums_0.json").unlink()
    with pytest.raises(ValueError, match="no checksum records"):
        fs.load(flipped, *fresh())
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("step-9\n")
    with pytest.raises(FileNotFoundError, match="points at .*step-9.*no .metadata"):
        fs.load(run, *fresh())

    # Another model: a param's shape differs (named, both shapes) ...
    wider = CFG.replace(d_model=12)
    with pytest.raises(
        ValueError, match=r"param '[\w.]+' has shape \(\d+, 10\) in the checkpoint but \(\d+, 12\)"
    ):
        fs.load(good, *_build((), cfg=wider))
    # ... or its params are others.
    deeper = CFG.replace(n_layer=3)
    with pytest.raises(ValueError, match=r"another model: params missing from it \['blocks.2"):
        fs.load(good, *_build((), cfg=deeper))
    # Another optimizer: its state is not in the checkpoint.
    with pytest.raises(ValueError, match="no entry 'optimizer/momentum_buffer/.*another optimizer"):
        fs.load(good, *_build((), optimizer=fs.optim.sgd(0.1, momentum=0.9)))

    with pytest.raises(ValueError, match="keep=2.*needs at="):
        fs.save(tmp_path / "x", params, state, keep=2)
    with pytest.raises(ValueError, match="not produced by step.init"):
        fs.save(tmp_path / "x", params, {"count": 0})
    with pytest.raises(KeyError, match=r"extra for ranks \[0\], not rank 3"):
        fs.load_extra(good, rank=3)
    assert fs.load_extra(good) is None


# ----------------------------------------------------------------------------- lazy entries


class _LazySlot:
    """A slot whose tensors appear after ``init`` (as qgZ's error buffers do): it
    describes what it has made and makes, on ``fs.load``'s request, what a checkpoint
    holds ([Note: what load fills], the last item)."""

    def __init__(self):
        self.made: dict[str, torch.Tensor] = {}
        self.asked: list[dict] = []

    def describe_state(self) -> dict:
        return dict(self.made)

    def make_entries(self, saved: dict) -> None:
        self.asked.append(dict(saved))
        for name, (shape, dtype) in saved.items():
            self.made[name] = torch.zeros(shape, dtype=dtype)


def _with_lazy_slot(step):
    """Keeps a running sum of the grads of the first leaf, made at the first call."""
    inner = step.stages

    def init(s, params):
        params, state = inner.init(s, params)
        state["lazy"] = _LazySlot()
        return params, state

    def loss_and_grad(ctx, params, batch):
        loss, grads = inner.loss_and_grad(ctx, params, batch)
        slot, first = ctx.state["lazy"], next(iter(grads.values()))
        slot.made["grad_sum"] = slot.made.get("grad_sum", torch.zeros_like(first)) + first
        return loss, grads

    return step.with_transform(fs.Transform("lazy"), init=init, loss_and_grad=loss_and_grad)


def test_load_asks_a_slot_to_make_the_entries_it_makes_lazily(tmp_path):
    step, params = _build([])
    step = _with_lazy_slot(step)
    params, state = step.init(params)
    params, state = _train(step, params, state, _batches(0, 1, 2, seed=3))
    saved = state["lazy"].made["grad_sum"].clone()
    assert saved.abs().sum() > 0
    fs.save(tmp_path / "ck", params, state)
    fresh_step, fresh = _build([])
    fresh_step = _with_lazy_slot(fresh_step)
    _, loaded = fs.load(tmp_path / "ck", fresh_step, fresh)
    slot = loaded["lazy"]
    assert slot.asked == [{"grad_sum": (tuple(saved.shape), saved.dtype)}]
    assert torch.equal(slot.made["grad_sum"], saved)
