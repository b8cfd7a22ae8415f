"""offload(cpu|nvme) equals the same stack without it; path errors; swap integrity; pipeline."""

from __future__ import annotations

import copy
import dataclasses
import errno
import importlib
import os
import pickle
import tempfile

import pytest
import torch

import fscale as fs
from fscale import tree
from fscale.hw import dispatch
from fscale.io import SwapCorruptError, SwapError, swap
from fscale.kernels import cpu_adam
from fscale.kernels.adamw import adamw_update_reference_
from fscale.kernels.cpu_adam import adamw_update_cpu_fused_, host_kernels
from fscale.placement import Placement
from fscale.policies import WANTS_FINAL_GRADS, OffloadPolicy, ZeroPolicy
from fscale.state import StoredTensor, TensorEntry, describe
from fscale.transforms.offload import OffloadState
from tests.dist import run_world
from tests.helpers import max_rel_error, mlp, regression_batches, regression_loss

STEPS = 4
GLOBAL_BATCH = 8
WIDTHS = [7, 9, 5, 3]  # 140 params; uneven over 2 ranks
SMALL = 1e-4  # subgroup_mb: ~26 fp32 params per sub-group, so every leaf is a group


def _optimizer(kind="adamw"):
    if kind == "sgd":
        return fs.optim.sgd(0.05, momentum=0.9)
    if kind == "lion":
        return fs.optim.lion(1e-3, weight_decay=0.1)
    return fs.optim.adamw(1e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default)


def _run(wrap, rank=0, world=1, *, optimizer="adamw", steps=STEPS):
    """``steps`` steps of the stack ``wrap`` builds, on this rank's part of each batch."""
    model = mlp(WIDTHS, seed=3)
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(regression_loss(apply), _optimizer(optimizer), clip_norm=0.5)
    step = wrap(step)
    params, state = step.init(params)
    per = GLOBAL_BATCH // world
    for batch in regression_batches(steps, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1]):
        local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        params, state, _ = step(params, state, local)
    return step, params, state


def _train(wrap, rank=0, world=1, *, optimizer="adamw", steps=STEPS, keep_state=False):
    _, params, state = _run(wrap, rank, world, optimizer=optimizer, steps=steps)
    full = {k: v.detach().clone() for k, v in fs.gather_params(params).items()}
    if keep_state:
        return full, state
    if isinstance(state.get("offload"), OffloadState):
        state["offload"].close()
    return full


def _stack(stage, precision=None):
    def wrap(step):
        if precision:
            step = fs.mixed_precision(step, precision)
        return fs.shard_zero(step, stage) if stage else step

    return wrap


def _offloaded(stage, tier, path, precision=None, **kw):
    def wrap(step):
        kw.setdefault("subgroup_mb", SMALL)
        if tier == "nvme":
            kw["path"] = path
        return fs.offload(_stack(stage, precision)(step), tier, **kw)

    return wrap


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("optimizer", ["adamw", "adamw reference", "sgd", "lion"])
def test_world_of_one_cpu_and_nvme_equal_no_offload(tmp_path, monkeypatch, optimizer):
    # The host AdamW is torch's fused CPU kernel (params within an ulp of the reference
    # per step); with the reference forced, offload changes nothing at all.
    tol = 1e-6 if optimizer == "adamw" else 0.0
    if optimizer == "adamw reference":
        monkeypatch.setenv("FSCALE_KERNELS", "reference")
        optimizer = "adamw"
    expected = _train(_stack(0), optimizer=optimizer)
    cases = {
        "cpu": _offloaded(0, "cpu", None),
        "cpu one group": _offloaded(0, "cpu", None, subgroup_mb=64),
        "nvme": _offloaded(0, "nvme", tmp_path),
        "nvme buffered, no overlap": _offloaded(0, "nvme", tmp_path, overlap=False, direct=False),
    }
    for name, wrap in cases.items():
        got = _train(wrap, optimizer=optimizer)
        assert max_rel_error(got, expected) <= tol, name
    assert os.listdir(tmp_path) == []  # every swap file removed at close


def _world_fn(rank, world, path):
    out = {}
    for stage in (1, 2, 3):
        base = _train(_stack(stage), rank, world)
        for tier in ("cpu", "nvme"):
            out[(stage, tier)] = (base, _train(_offloaded(stage, tier, path), rank, world))
    for stage, tier in ((2, "cpu"), (3, "nvme")):
        base = _train(_stack(stage, "bf16"), rank, world)
        got = _train(_offloaded(stage, tier, path, "bf16"), rank, world)
        out[(stage, f"{tier} bf16")] = (base, got)
    # This rank's files (the other rank may still be writing its own into the same dir).
    out["files left"] = [f for f in os.listdir(path) if f"-r{rank}-" in f]
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_offload_over_shard_zero_equals_shard_zero(world):
    plain = _train(_stack(0))
    with tempfile.TemporaryDirectory() as path:
        results = run_world(_world_fn, world, path) if world > 1 else [_world_fn(0, 1, path)]
        for rank, by_case in enumerate(results):
            assert by_case.pop("files left") == []
            for case, (base, got) in by_case.items():
                # The same stack without offload: exact. The plain step: shard_zero's tolerance.
                assert max_rel_error(got, base) <= 1e-6, (rank, case)
                if "bf16" not in case[1]:
                    assert max_rel_error(got, plain) <= 1e-5, (rank, case)


# ----------------------------------------------------------------------------- host kernel


def test_host_adamw_kernel_matches_reference_and_is_scoped():
    g = torch.Generator().manual_seed(0)
    shapes = [(33,), (7, 5), (1,)]

    def tensors():
        return [
            [torch.randn(s, generator=g) for s in shapes],
            [torch.randn(s, generator=g) for s in shapes],
            [torch.randn(s, generator=g) * 0.1 for s in shapes],
            [torch.rand(s, generator=g) * 0.01 for s in shapes],
        ]

    a = tensors()
    b = [[t.clone() for t in lst] for lst in a]
    b[1][1] = b[1][1].double()  # a dtype mix: falls back to the reference for that tensor
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3)
    adamw_update_reference_(*a, **kw)
    adamw_update_cpu_fused_(*b, **kw)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            torch.testing.assert_close(v.float(), u, rtol=1e-6, atol=1e-7)
    assert dispatch.resolve("adamw_update", torch.zeros(1)).name == "adamw_update_reference"
    with host_kernels():
        assert dispatch.resolve("adamw_update", torch.zeros(1)).name == cpu_adam.NAME
    assert dispatch.resolve("adamw_update", torch.zeros(1)).name == "adamw_update_reference"


# ----------------------------------------------------------------------------- DPU


def test_delayed_update_applies_each_update_one_step_late():
    """DPU: call t returns the params after updates 1..t-1, update k using the grads of call k,
    which were taken at the params after updates 1..k-2 (the ZeRO-Offload paper's schedule)."""
    model = mlp(WIDTHS, seed=3)
    batches = regression_batches(STEPS, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])
    params, apply = fs.functional(copy.deepcopy(model))
    loss_fn = regression_loss(apply)
    opt = _optimizer()
    # By hand: the grads of call t are taken at the params call t received.
    ref = {k: v.detach().clone() for k, v in params.items()}
    opt_state = opt.init(ref)
    pending = None
    for batch in batches:
        leaves = {k: v.detach().requires_grad_(True) for k, v in ref.items()}
        grads = torch.autograd.grad(loss_fn(leaves, batch), list(leaves.values()))
        if pending is not None:  # the update launched by the previous call lands now
            ref, opt_state = fs.optim.apply_gradients(opt, pending, opt_state, ref)
        pending = dict(zip(leaves, grads, strict=True))
    step = fs.offload(fs.train_step(loss_fn, opt), "cpu", delayed_update=True, subgroup_mb=SMALL)
    got, state = step.init(params)
    first = {k: v.clone() for k, v in got.items()}
    for batch in batches:
        got, state, _ = step(got, state, batch)
    state["offload"].close()
    assert max_rel_error(got, ref) == 0.0
    assert max_rel_error(first, {k: v.detach() for k, v in model.named_parameters()}) == 0.0


def _masters(handle) -> dict:
    """The host fp32 masters by leaf index."""
    out = {}
    for g, buf in zip(handle.groups, handle.buffers, strict=True):
        master, _ = handle.views(g, buf)
        out.update({i: m.clone() for i, m in zip(g.leaves, master, strict=True)})
    return out


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("stage", [0, 3])
def test_delayed_update_under_bf16_stages_masters_in_the_compute_dtype(monkeypatch, stage, device):
    """[Note: DPU staging]: the same training bit for bit as copying the fp32 masters in;
    the params the step returns are the masters rounded to bf16."""
    init_module = importlib.import_module("fscale.transforms._offload.init")

    def run(staged: bool):
        if not staged:
            monkeypatch.setattr(init_module, "device_staging", lambda leaves, dtype: [])
        model = mlp(WIDTHS, seed=3).to(device)
        params, apply = fs.functional(model)
        step = fs.train_step(regression_loss(apply), _optimizer(), clip_norm=0.5)
        step = _offloaded(stage, "cpu", None, "bf16", delayed_update=True)(step)
        params, state = step.init(params)
        assert bool(state["offload"].device_staging) == staged
        losses = []
        for batch in regression_batches(STEPS, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1]):
            batch = {k: v.to(device) for k, v in batch.items()}
            params, state, metrics = step(params, state, batch)
            losses.append(metrics["loss"].item())
        handle = state["offload"]
        handle.close()  # waits for the last update (never applied to the params)
        monkeypatch.undo()
        return losses, tree.leaves(params), _masters(handle)

    losses, params, masters = run(True)
    ref_losses, ref_params, ref_masters = run(False)
    assert losses == ref_losses and len(set(losses)) == STEPS  # trained, identically
    assert all(torch.equal(masters[i], ref_masters[i]) for i in masters)
    for got, ref in zip(params, ref_params, strict=True):
        assert got.dtype == torch.float32 and not torch.equal(got, ref)
        assert torch.equal(got, ref.to(torch.bfloat16).float())  # the rounded masters
        assert got.device.type == device


# ----------------------------------------------------------------------------- pipeline


def _events(state):
    return [(kind, key) for _, _, kind, key in state["offload"].events]


def test_nvme_reads_next_group_before_current_update_ends(tmp_path):
    _, state = _train(_offloaded(0, "nvme", tmp_path), keep_state=True)
    events = _events(state)
    keys = [g.key for g in state["offload"].groups]
    assert len(keys) >= 3
    at = {e: i for i, e in enumerate(events)}
    for cur, nxt in zip(keys, keys[1:], strict=False):
        # Issued before the update of the current group even starts, and so before it ends.
        assert at[("read_submit", nxt)] < at[("update_start", cur)] < at[("update_end", cur)]
        # ... and the current group's write is issued before the next one's update.
        assert at[("write_submit", cur)] < at[("update_start", nxt)]
    state["offload"].close()
    # Without overlap the same engine runs strictly in turn.
    _, state = _train(_offloaded(0, "nvme", tmp_path, overlap=False), keep_state=True)
    at = {e: i for i, e in enumerate(_events(state))}
    for cur, nxt in zip(keys, keys[1:], strict=False):
        assert at[("write_end", cur)] < at[("read_submit", nxt)]
    state["offload"].close()
    assert os.listdir(tmp_path) == []


def test_cpu_copies_next_group_grads_before_current_update():
    _, state = _train(_offloaded(0, "cpu", None), keep_state=True)
    at = {e: i for i, e in enumerate(_events(state))}
    keys = [g.key for g in state["offload"].groups]
    for cur, nxt in zip(keys, keys[1:], strict=False):
        assert at[("d2h_submit", nxt)] < at[("update_start", cur)]


# ----------------------------------------------------------------------------- streaming


def _streamed(stage, precision, accumulate, stream=True):
    """offload(cpu) over a stack without clipping (streaming needs one), streaming on or off."""

    def wrap(step):
        step = dataclasses.replace(step, clip_norm=None, accumulate=accumulate)
        # overlap=False: the same stack, grads copied after backward, group after group.
        step = _offloaded(stage, "cpu", None, precision, overlap=stream)(step)
        assert step.has(WANTS_FINAL_GRADS) == stream
        return step

    return wrap


def _no_clip(wrap, accumulate):
    return lambda s: wrap(dataclasses.replace(s, clip_norm=None, accumulate=accumulate))


def _stream_world_fn(rank, world):
    out = {}
    for stage, precision, accumulate in ((3, None, 1), (3, "bf16", 2), (0, "bf16", 1)):
        if stage == 0 and world > 1:
            continue
        case = (stage, precision, accumulate)
        base = _train(_no_clip(_stack(stage, precision), accumulate), rank, world, steps=3)
        got = {}
        for stream in (True, False):
            params, state = _train(
                _streamed(stage, precision, accumulate, stream), rank, world, steps=3,
                keep_state=True,
            )  # fmt: skip
            handle = state["offload"]
            kinds = [kind for _, _, kind, _ in handle.events]
            got[stream] = params, kinds, handle.stream is not None
            handle.close()
        out[case] = base, got
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_grads_streamed_in_backward_give_the_same_update(world):
    """[Note: streaming grads in backward]: bit for bit the update made after backward,
    within an ulp per step of no offload; and the copies really start in backward."""
    results = run_world(_stream_world_fn, world) if world > 1 else [_stream_world_fn(0, 1)]
    for rank, cases in enumerate(results):
        assert len(cases) == (3 if world == 1 else 2)
        for case, (base, got) in cases.items():
            (streamed, kinds, on), (after, after_kinds, off) = got[True], got[False]
            assert on and not off
            assert max_rel_error(streamed, after) == 0.0, (rank, case)
            # The accumulate > 1 cases scale in the sink: compare with no offload too.
            assert max_rel_error(streamed, base) <= 1e-6, (rank, case)
            # Copies and updates of the last step began before its last backward ended.
            end = len(kinds) - 1 - kinds[::-1].index("loss_and_grad_end")
            assert "d2h_submit" in kinds[:end] and kinds.count("d2h_submit") > 1
            assert "loss_and_grad_end" not in after_kinds


def _nan_step_world_fn(rank, world):
    """Per case: the streamed stack over batches 0, NaN (rank 1's part only, or every
    part in a world of one; the first micro-batch of two), 2, against the same stack
    that never saw the NaN batch; and what the NaN step changed."""
    out = {}
    for stage, precision, accumulate in ((3, None, 1), (3, "bf16", 2)):
        model = mlp(WIDTHS, seed=3)
        batches = regression_batches(3, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])
        per = GLOBAL_BATCH // world
        runs = {}
        for name, order in (("nan", (0, 1, 2)), ("clean", (0, 2))):
            params, apply = fs.functional(copy.deepcopy(model))
            step = fs.train_step(regression_loss(apply), _optimizer("adamw"))
            step = _streamed(stage, precision, accumulate)(step)
            params, state = step.init(params)
            changed = None
            for i in order:
                local = {k: v[rank * per : (rank + 1) * per].clone() for k, v in batches[i].items()}
                if i == 1 and (rank == 1 or world == 1):
                    local["x"][: max(1, per // accumulate)] = float("nan")
                if i == 1:
                    before = {k: v.detach().clone() for k, v in fs.gather_params(params).items()}
                    masters = state["offload"].buffers[0].clone()
                params, state, metrics = step(params, state, local)
                if i == 1:
                    after = fs.gather_params(params)
                    changed = {
                        "params": max(
                            (after[k].detach() != before[k]).sum().item() for k in before
                        ),
                        "masters": (state["offload"].buffers[0] != masters).sum().item(),
                        "nonfinite": bool(metrics["nonfinite"]),
                        "skipped": state["guard"]["skipped_steps"],
                        "streamed": state["offload"].stream is not None,
                    }
            runs[name] = ({k: v.detach().clone() for k, v in fs.gather_params(params).items()},
                          changed)  # fmt: skip
            state["offload"].close()
        out[(stage, precision, accumulate)] = runs
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_a_nan_batch_skips_the_streamed_step_on_every_rank(world):
    """[Note: a loss vote before streamed updates] (fscale/step.py): with grads streamed
    into the host update during backward, a NaN batch on one rank (in the first of two
    micro-batches too) changes no param and no host master on any rank, and the run
    goes on as if it never came."""
    results = run_world(_nan_step_world_fn, world) if world > 1 else [_nan_step_world_fn(0, 1)]
    for rank, cases in enumerate(results):
        for case, runs in cases.items():
            (nan, changed), (clean, _) = runs["nan"], runs["clean"]
            assert changed["streamed"] and changed["nonfinite"], (rank, case)
            assert changed["skipped"] == 1 and changed["params"] == 0, (rank, case)
            assert changed["masters"] == 0, (rank, case)
            assert max_rel_error(nan, clean) == 0.0, (rank, case)


class _WithUnused(torch.nn.Module):
    """An MLP plus a layer the forward never calls: its grads are zeros, announced in
    the sink's finish instead of by a backward hook."""

    def __init__(self):
        super().__init__()
        self.mlp = mlp(WIDTHS, seed=3)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_streaming_with_an_unused_param_equals_copying_after(accumulate):
    got = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        params, apply = fs.functional(_WithUnused())
        before = params["unused.weight"].detach().clone()
        step = fs.train_step(regression_loss(apply), _optimizer(), accumulate=accumulate)
        step = fs.offload(step, "cpu", subgroup_mb=SMALL, overlap=overlap)
        params, state = step.init(params)
        for batch in regression_batches(STEPS, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1]):
            params, state, _ = step(params, state, batch)
        assert (state["offload"].stream is not None) == overlap
        state["offload"].close()
        got[overlap] = {k: v.detach().clone() for k, v in params.items()}
    assert max_rel_error(got[True], got[False]) == 0.0
    # AdamW's weight decay still moved the unused weight (zero grads, as without offload).
    assert not torch.equal(got[True]["unused.weight"], before)


def test_streaming_only_where_nothing_changes_grads_after_backward(tmp_path):
    step, _ = _step()
    flag = lambda s: s.has(WANTS_FINAL_GRADS)  # noqa: E731
    plain = dataclasses.replace(step, clip_norm=None)
    assert flag(fs.offload(plain, "cpu"))
    assert flag(fs.offload(fs.shard_zero(fs.mixed_precision(plain, "bf16"), 3), "cpu"))
    clipped = dataclasses.replace(step, clip_norm=0.5)
    assert not flag(fs.offload(clipped, "cpu"))  # the clip coefficient needs every grad
    assert not flag(fs.offload(plain, "cpu", delayed_update=True))
    assert not flag(fs.offload(plain, "cpu", overlap=False))
    assert not flag(fs.offload(plain, "nvme", path=tmp_path))
    assert not flag(fs.offload(fs.mixed_precision(plain, "fp16"), "cpu"))  # unscale
    assert not flag(fs.offload(fs.mixed_precision(plain, "bf16", reduce_dtype="bf16"), "cpu"))
    assert not flag(fs.offload(fs.shard_zero(plain, 2), "cpu"))  # reduced after backward
    assert not flag(fs.offload(fs.shard_zero(plain, 3), "cpu", what=("optimizer", "params")))
    # fs.explain says which, and why not.
    params = _step()[1]
    assert "stream to the host during backward" in fs.explain(fs.offload(plain, "cpu"), params)
    assert "after backward" in fs.explain(fs.offload(clipped, "cpu"), params)


# ----------------------------------------------------------------------------- errors


def _step():
    params, apply = fs.functional(mlp(WIDTHS, seed=3))
    return fs.train_step(regression_loss(apply), _optimizer()), params


def test_stack_order_and_argument_errors(tmp_path):
    step, _ = _step()
    with pytest.raises(ValueError, match="shard_zero cannot be applied over offload.*last"):
        fs.shard_zero(fs.offload(step, "cpu"), 2)
    with pytest.raises(ValueError, match="mixed_precision cannot be applied over offload"):
        fs.mixed_precision(fs.offload(step, "cpu"), "bf16")
    with pytest.raises(ValueError, match="unknown tier 'gpu'"):
        fs.offload(step, "gpu")
    with pytest.raises(ValueError, match="path is for tier='nvme'"):
        fs.offload(step, "cpu", path=tmp_path)
    with pytest.raises(ValueError, match="needs path"):
        fs.offload(step, "nvme")
    with pytest.raises(ValueError, match="delayed_update"):
        fs.offload(step, "nvme", path=tmp_path, delayed_update=True)
    with pytest.raises(ValueError, match="over shard_zero\\(step, 3\\)"):
        fs.offload(step, "cpu", what=("optimizer", "params"))
    with pytest.raises(ValueError, match="over shard_zero\\(step, 3\\)"):
        fs.offload(fs.shard_zero(step, 2), "cpu", what=("optimizer", "params"))
    with pytest.raises(ValueError, match="use \\('optimizer',\\) or"):
        fs.offload(fs.shard_zero(step, 3), "cpu", what=("params",))
    with pytest.raises(ValueError, match="buffer_mb"):
        fs.offload(step, "cpu", buffer_mb=0)


def test_nvme_path_errors_before_any_file_is_written(tmp_path, monkeypatch):
    step, params = _step()
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        fs.offload(step, "nvme", path=tmp_path / "missing")
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(FileNotFoundError):  # unwritable for root too: under a regular file
        fs.offload(step, "nvme", path=regular / "swap")
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(swap_dir) else real_access(p, m)
    )
    with pytest.raises(PermissionError, match="swap.*not writable"):
        fs.offload(step, "nvme", path=swap_dir)
    monkeypatch.setattr(os, "access", real_access)
    # Free space is checked at init, when the bytes are known, before writing.
    built = fs.offload(step, "nvme", path=swap_dir, subgroup_mb=SMALL)
    monkeypatch.setattr(os, "statvfs", lambda p: _Tiny())
    with pytest.raises(OSError, match=r"4,096 bytes\) free but the swap files need"):
        built.init(params)
    assert os.listdir(swap_dir) == []


class _Tiny:
    f_bavail, f_frsize = 1, 4096


def _one_rank_lacks_space(rank, world, path):
    step, params = _step()
    step = fs.offload(fs.shard_zero(step, 2), "nvme", path=path)
    if rank == 1:
        os.statvfs = lambda p: _Tiny()  # this rank's process only
    try:
        step.init(params)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def test_a_failed_space_check_on_one_rank_stops_every_rank(tmp_path):
    """Raising on rank 1 alone would leave rank 0 blocked in its next collective."""
    first, second = run_world(_one_rank_lacks_space, 2, str(tmp_path))
    assert first[0] == "RuntimeError" and "another rank's swap path check failed" in first[1]
    assert second[0] == "OSError" and "free but the swap files need" in second[1]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_swap_file_stops_the_step(tmp_path, damage):
    step, params = _step()
    step = fs.offload(step, "nvme", path=tmp_path, subgroup_mb=SMALL)
    params, state = step.init(params)
    batch = regression_batches(1, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])[0]
    params, state, _ = step(params, state, batch)
    victim = state["offload"].files()[1]
    if damage == "truncate":
        os.truncate(victim, 0)
    else:
        with open(victim, "r+b") as f:
            f.write(b"\x7f")
    match = "truncated" if damage == "truncate" else "corrupt"
    with pytest.raises(SwapCorruptError, match=match):
        step(params, state, batch)
    state["offload"].close()
    assert os.listdir(tmp_path) == []


def _fail_writes_of(monkeypatch, group_key):
    """os.pwritev raises ENOSPC for group ``group_key``'s swap file; returns the real one."""
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        if f"-{group_key}.swp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    return real


@pytest.mark.parametrize("failure", ["enospc", "corrupt"])
def test_a_step_failing_midway_leaves_the_state_unusable_not_half_applied(
    tmp_path, monkeypatch, failure
):
    """[Note: a failed NVMe step]: group 2's write fails for a full disk (found at the
    step's end, all 5 groups updated in memory), or group 3's file is corrupt (groups
    0..2 updated): that step raises its error, and every later step -- after the
    space is freed too -- says to load the last checkpoint, never the stale error."""
    step, params = _step()
    step = fs.offload(step, "nvme", path=tmp_path, subgroup_mb=SMALL)
    params, state = step.init(params)
    handle = state["offload"]
    assert [g.key for g in handle.groups] == [f"g{k:05d}" for k in range(5)]
    batch = regression_batches(1, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])[0]
    params, state, _ = step(params, state, batch)
    if failure == "enospc":
        real = _fail_writes_of(monkeypatch, "g00002")
        first, cause, done = SwapError, "No space left", 5
    else:
        with open(handle.engine.file_path("g00003"), "r+b") as f:
            f.seek(100)
            f.write(b"\x7f")
        first, cause, done = SwapCorruptError, "corrupt", 3
    with pytest.raises(first, match=cause) as info:
        step(params, state, batch)
    assert any("state is now unusable" in n for n in info.value.__notes__)
    if failure == "enospc":
        monkeypatch.setattr(os, "pwritev", real)  # space freed
    for _ in range(2):
        with pytest.raises(RuntimeError, match=rf"unusable.*{cause}.*after {done} of 5.*last ch"):
            step(params, state, batch)
    with pytest.raises(RuntimeError, match="unusable"):  # no checkpoint of the mixed state
        describe(state)
    handle.close()
    assert os.listdir(tmp_path) == []


def test_swap_files_filled_in_place_on_purpose_are_accepted_after_rechecksum(tmp_path):
    """What fs.load does to a fresh state's files: written in place, then rechecksum()."""
    step, params = _step()
    step = fs.offload(step, "nvme", path=tmp_path, subgroup_mb=SMALL)
    params, state = step.init(params)
    handle = state["offload"]
    g = handle.groups[1]
    master = describe(state)[f"offload/master/{handle.param_paths[g.leaves[0]]}"]
    value = master.read() + 1
    with open(master.path, "r+b") as f:
        f.seek(master.offset)
        f.write(value.numpy().tobytes())
    handle.rechecksum()
    batch = regression_batches(1, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])[0]
    step(params, state, batch)  # read back without a SwapCorruptError
    handle.close()


def test_a_failed_init_leaves_no_swap_file_or_lock(tmp_path, monkeypatch):
    step, params = _step()
    step = fs.offload(step, "nvme", path=tmp_path, subgroup_mb=SMALL)
    _fail_writes_of(monkeypatch, "g00002")
    with pytest.raises(SwapError, match="No space left"):
        step.init(params)
    assert os.listdir(tmp_path) == []  # at once, not when the state is collected


def test_host_memory_and_disk_bytes_are_bounded(tmp_path):
    """nvme: three group buffers in host memory, whatever the model; cpu: 12 bytes/param
    (Adam) plus two groups' grads."""
    n_params = sum(w * v + v for w, v in zip(WIDTHS, WIDTHS[1:], strict=False))
    slack = 2 * 4096 + 5 * 64  # per group: two 4096 paddings, 64-byte aligned tensors
    _, state = _train(_offloaded(0, "nvme", tmp_path), keep_state=True, steps=1)
    h = state["offload"]
    largest = max(g.total for g in h.groups)
    assert len(h.groups) > 3 and h.host_bytes == 3 * largest
    assert sum(os.path.getsize(f) for f in h.files()) == sum(g.persisted for g in h.groups)
    # master + two moments on disk, nothing else beyond alignment
    on_disk = sum(g.persisted for g in h.groups)
    assert 12 * n_params <= on_disk <= 12 * n_params + slack * len(h.groups)
    h.close()
    _, state = _train(_offloaded(0, "cpu", None), keep_state=True, steps=1)
    h = state["offload"]
    # cpu: master + two moments per group, grads only in two rotating staging buffers.
    persisted = sum(g.persisted for g in h.groups)
    assert 12 * n_params <= persisted <= 12 * n_params + slack * len(h.groups)
    largest_grads = max(g.grad_bytes for g in h.groups)
    assert largest_grads == swap.align_up(max(sum(s.nbytes for s in g.grads) for g in h.groups))
    assert h.host_bytes == persisted + 2 * largest_grads
    h.close()


def test_closed_state_is_refused_and_dropped_state_removes_its_files(tmp_path):
    import gc

    step, params = _step()
    step = fs.offload(step, "nvme", path=tmp_path, subgroup_mb=SMALL)
    batch = regression_batches(1, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1])[0]
    p, state = step.init(params)
    state["offload"].close()
    with pytest.raises(RuntimeError, match="state was closed"):
        step(p, state, batch)
    p, state = step.init(params)
    p, state, _ = step(p, state, batch)
    assert os.listdir(tmp_path)
    del state
    gc.collect()
    assert os.listdir(tmp_path) == []  # weakref.finalize; the same runs at interpreter exit


# ----------------------------------------------------------------------------- params


def _per_layer(name):
    return name.split(".")[0]  # one unit per Linear: three units, so prefetch has work


def _zero3(precision=None, tier=None, path=None, what=("optimizer", "params"), **zero_kw):
    def wrap(step):
        if precision:
            step = fs.mixed_precision(step, precision)
        step = fs.shard_zero(step, 3, unit=_per_layer, **zero_kw)
        if tier is None:
            return step
        kw = {"path": path} if tier == "nvme" else {}
        return fs.offload(step, tier, what=what, subgroup_mb=SMALL, **kw)

    return wrap


def _param_offload_world_fn(rank, world, path):
    out = {}
    for precision in (None, "bf16"):
        base = _train(_zero3(precision), rank, world)
        only_optimizer = _train(_zero3(precision, "cpu", what=("optimizer",)), rank, world)
        for tier in ("cpu", "nvme"):
            got = _train(_zero3(precision, tier, path), rank, world)
            out[(precision, tier)] = (base, only_optimizer, got)
    got = _train(_zero3(None, "cpu", prefetch=2, check_order=True), rank, world)
    out[(None, "cpu prefetch=2 check_order")] = (out[(None, "cpu")][0], None, got)
    out["files left"] = [f for f in os.listdir(path) if f"-r{rank}-" in f]
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_param_offload_equals_shard_zero_3(world):
    """offload(shard_zero(step, 3), tier, what=("optimizer", "params")) changes no param."""
    with tempfile.TemporaryDirectory() as path:
        fn = _param_offload_world_fn
        results = run_world(fn, world, path) if world > 1 else [fn(0, 1, path)]
    for rank, by_case in enumerate(results):
        assert by_case.pop("files left") == []
        for case, (base, only_optimizer, got) in by_case.items():
            # As the existing offload parity: the host AdamW is within an ulp per step.
            assert max_rel_error(got, base) <= 1e-6, (rank, case)
            if only_optimizer is not None:
                # Same host optimizer on the same masters: where the shards live changes nothing.
                assert max_rel_error(got, only_optimizer) == 0.0, (rank, case)


def _walk_tensors(obj, seen=None):
    """Every tensor reachable from params/state (dicts, sequences, the offload state)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_tensors(v, seen)
    elif isinstance(obj, OffloadState):
        yield from _walk_tensors([obj.buffers, obj.groups], seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("fscale"):
        yield from _walk_tensors(vars(obj), seen)


def _run_zero3(wrap, steps=3):
    """Train ``steps`` steps in a world of one; spies on every gather's host->device copy."""
    from fscale.transforms._offload.param_source import HostParamSource
    from fscale.transforms._zero.stage3 import UnitGatherer

    log = []
    stage, full_buffer = HostParamSource.fetch, UnitGatherer._full_buffer

    def spy_stage(self, key, flat):
        log.append(("stage", key, self.gather_copies.get(key, flat)))
        return stage(self, key, flat)

    def spy_use(self, key):
        log.append(("use", key, None))
        return full_buffer(self, key)

    model = mlp(WIDTHS, seed=3)
    params, apply = fs.functional(copy.deepcopy(model))
    step = wrap(fs.train_step(regression_loss(apply), _optimizer(), clip_norm=0.5))
    params, state = step.init(params)
    HostParamSource.fetch, UnitGatherer._full_buffer = spy_stage, spy_use
    try:
        for batch in regression_batches(steps, GLOBAL_BATCH, WIDTHS[0], WIDTHS[-1]):
            log.clear()  # keep the last step's
            params, state, metrics = step(params, state, batch)
    finally:
        HostParamSource.fetch, UnitGatherer._full_buffer = stage, full_buffer
    return params, state, metrics, log


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_param_shards_live_only_in_host_memory(precision):
    """The gatherer reads the param source's host buffer, and no other shard copy exists."""
    base_params, base_state, base, _ = _run_zero3(_zero3(precision))
    params, state, metrics, log = _run_zero3(_zero3(precision, "cpu"))
    slot, handle = state["shard_zero"], state["offload"]
    host = slot["source"].buffer
    host_resident = lambda t, slot: slot["source"].resident(t)  # noqa: E731
    units = [u.key for u in slot["units"]]
    assert len(units) == 3
    # The step's params and the flats every gather reads are views of that buffer...
    shard_bytes = 0
    for key, flat in slot["flats"].items():
        assert host_resident(flat, slot), key
        assert flat.dtype == torch.float32  # the fp32 shards: gather_params reads them
        shard_bytes += flat.numel() * flat.element_size()
    assert all(host_resident(t, slot) for t in params.values())
    # ... and every host->device copy came from it: under bf16 from its compute copy.
    staged = [src for kind, _, src in log if kind == "stage"]
    assert {k for kind, k, _ in log if kind == "stage"} == set(units)
    for src in staged:
        assert host_resident(src, slot)
        assert src.dtype == (torch.bfloat16 if precision else torch.float32)
    # No other shard-sized tensor anywhere in params or state: only the host buffer and
    # the optimizer's host buffers (a kept device copy of the flats would show here).
    allowed = {t.untyped_storage().data_ptr() for t in [host, *handle.buffers]}
    for t in _walk_tensors([params, state]):
        if t.numel() > 1:
            assert t.untyped_storage().data_ptr() in allowed, tuple(t.shape)
    # [Note: shared masters]: the optimizer updates those shards in place; its own
    # buffers hold only AdamW's two moments (8 bytes per param, not 12).
    n_params = shard_bytes // 4
    for g, buf in zip(handle.groups, handle.buffers, strict=True):
        assert g.shared_master
        master, _ = handle.views(g, buf)
        assert all(host_resident(m, slot) and m.dtype == torch.float32 for m in master)
    slack = 4096 + 3 * 64
    assert 8 * n_params <= handle.host_bytes - sum(b.numel() for b in handle.staging)
    assert sum(g.persisted for g in handle.groups) <= 8 * n_params + slack * len(handle.groups)
    # The same accounting without offload sees the device shards: the check can fail.
    assert metrics["zero3_device_shard_bytes"] == 0
    assert base["zero3_device_shard_bytes"] == shard_bytes
    copy_bytes = shard_bytes // 2 if precision else 0
    assert metrics["zero3_host_shard_bytes"] == shard_bytes + copy_bytes
    # H2D: the bytes of every copy this step (forward and backward's re-gathers).
    assert metrics["zero3_h2d_bytes"] == sum(s.numel() * s.element_size() for s in staged)
    largest = max(s.numel() * s.element_size() for s in staged)
    assert 0 < metrics["zero3_peak_h2d_staging_bytes"] <= 2 * largest  # prefetch=1
    # Device param memory: the gathered units in flight plus their staging copies.
    peak = metrics["zero3_peak_gathered_total_bytes"]
    assert peak <= base["zero3_peak_gathered_total_bytes"] + metrics["zero3_peak_h2d_staging_bytes"]
    # Prefetch covers the copy: after the first unit, each unit's copy is issued before
    # its use (an on-demand copy would follow the "use" entry).
    forward = []
    for kind, key, _ in log:
        if kind == "use" and key not in forward:
            forward.append(key)
    at = {(kind, key): i for i, (kind, key, _) in reversed(list(enumerate(log)))}
    for key in forward[1:]:
        assert at[("stage", key)] < at[("use", key)], (key, [x[:2] for x in log])
    handle.close()


# ----------------------------------------------------------------------------- state protocol

_BOTH = ("optimizer", "params")
# name: (zero stage, precision, tier, offload options). [Note: describing offloaded state]
_DESCRIBED = {
    "cpu": (0, None, "cpu", {}),
    "nvme": (0, None, "nvme", {}),
    "cpu bf16": (0, "bf16", "cpu", {}),
    "nvme bf16 one group": (0, "bf16", "nvme", {"subgroup_mb": 64}),
    "cpu delayed": (0, None, "cpu", {"delayed_update": True}),
    "cpu bf16 delayed": (0, "bf16", "cpu", {"delayed_update": True}),
    "zero1 cpu": (1, None, "cpu", {}),
    "zero1 nvme": (1, None, "nvme", {}),
    "zero2 cpu": (2, None, "cpu", {}),
    "zero2 nvme": (2, None, "nvme", {}),
    "zero3 cpu": (3, None, "cpu", {}),
    "zero3 nvme": (3, None, "nvme", {}),
    "zero2 cpu bf16": (2, "bf16", "cpu", {}),
    "zero3 nvme bf16": (3, "bf16", "nvme", {}),
    "zero3 cpu bf16 delayed": (3, "bf16", "cpu", {"delayed_update": True}),
    "zero3 cpu params": (3, None, "cpu", {"what": _BOTH}),
    "zero3 nvme bf16 params": (3, "bf16", "nvme", {"what": _BOTH}),
}


def _ours(state) -> dict:
    """describe() of the slots offload fills: the optimizer's and its own."""
    return describe({k: state[k] for k in ("optimizer", "offload")})


def _value(entry) -> torch.Tensor:
    assert isinstance(entry, (TensorEntry, StoredTensor)), type(entry)
    return entry.read() if isinstance(entry, StoredTensor) else entry.tensor


def _expected_placement(step, shape) -> Placement:
    """A param's placement from first principles: shards over ZeRO's shard dim, else
    whole and replicated over the step's mesh."""
    zero = step.policy(ZeroPolicy)
    if zero is None:
        return Placement(shape, (), step.mesh.dims)
    return Placement(shape, (zero.shard_dim,), zero.replicate_dims)


def _describe_world_fn(rank, world, path, names):
    shapes = {k: tuple(v.shape) for k, v in fs.functional(mlp(WIDTHS, seed=3))[0].items()}
    checked = {}
    for name in names:
        stage, precision, tier, kw = _DESCRIBED[name]
        # DPU: after one call both schedules have made the same single update.
        steps = 1 if kw.get("delayed_update") else 3
        _, base_params, base_state = _run(_stack(stage, precision), rank, world, steps=steps)
        wrap = _offloaded(stage, tier, path, precision, **kw)
        step, params, state = _run(wrap, rank, world, steps=steps)
        handle = state["offload"]
        entries = _ours(state)
        # The optimizer slot: the paths, values and counts of the same stack without offload.
        base = describe({"optimizer": base_state["optimizer"]})
        got = {k: v for k, v in entries.items() if k.startswith("optimizer/")}
        assert sorted(got) == sorted(base), (name, sorted(set(got) ^ set(base)))
        for key, want in base.items():
            if isinstance(want, TensorEntry):
                assert torch.equal(_value(got[key]), want.tensor), (name, key)
                param = key.rsplit("/", 1)[1]
                assert got[key].placement == _expected_placement(step, shapes[param]), key
            else:
                assert got[key] == want, (name, key)
        # The masters: the fp32 params (stage 1/2: shard_zero's fp32 master shards).
        masters = base_state["shard_zero"]["master"] if stage in (1, 2) else base_params
        for param, shape in shapes.items():
            entry = entries[f"offload/master/{param}"]
            value = _value(entry)
            assert value.dtype == torch.float32 and torch.equal(value, masters[param]), param
            assert entry.placement == _expected_placement(step, shape), (name, param)
            if stage and world > 1:  # a row block of the leaf, padded
                assert value.shape[0] == -(-shape[0] // world) < shape[0]
        # Metadata: the tier and every group's params and updates.
        assert entries["offload/tier"] == tier
        keys = [g.key for g in handle.groups]
        assert [entries[f"offload/groups/{key}/updates"] for key in keys] == [steps] * len(keys)
        listed = [k for k in entries if k.startswith("offload/groups/") and "/params/" in k]
        assert len(listed) == len(shapes) and all(entries[k] in shapes for k in listed)
        tensors = [v for v in entries.values() if isinstance(v, (TensorEntry, StoredTensor))]
        checked[name] = sorted({type(v).__name__ for v in tensors})
        handle.close()
    return checked


@pytest.mark.parametrize("world", [1, 2])
def test_describe_gives_the_masters_and_moments_the_optimizer_holds(world, monkeypatch):
    """describe() of offload's slots, on every tier and stack: the same paths and, with the
    reference AdamW on both sides, the same values as the optimizer state of the stack
    without offload; each tensor with its param's placement (sharded: over ZeRO's dim)."""
    monkeypatch.setenv("FSCALE_KERNELS", "reference")  # reaches the ranks too
    names = list(_DESCRIBED) if world == 1 else [n for n in _DESCRIBED if n.startswith("zero")]
    with tempfile.TemporaryDirectory() as path:
        fn = _describe_world_fn
        results = run_world(fn, world, path, names) if world > 1 else [fn(0, 1, path, names)]
        assert os.listdir(path) == []
    for checked in results:
        assert list(checked) == names
        for name, types in checked.items():
            tier = _DESCRIBED[name][2]
            assert types == (["StoredTensor"] if tier == "nvme" else ["TensorEntry"]), name


def test_describe_reads_nvme_state_exactly_where_the_swap_files_hold_it(tmp_path):
    """A StoredTensor is bytes at an offset of a swap file (raw, no header): read() gives
    exactly what the engine reads back, CRC-verified, into the optimizer's buffer."""
    step, _, state = _run(_offloaded(0, "nvme", tmp_path), steps=3)
    handle = state["offload"]
    entries = _ours(state)
    stored = {k: v for k, v in entries.items() if isinstance(v, StoredTensor)}
    assert len(stored) == 3 * len(tree.leaves(fs.functional(mlp(WIDTHS))[0]))  # masters, moments
    at = {(v.path, v.offset): v for v in stored.values()}
    assert {path for path, _ in at} == set(handle.files())
    buf = swap.alloc(max(g.total for g in handle.groups))
    checked = 0
    for g in handle.groups:
        handle.engine.read(g.key, buf).result()  # what the next update reads, CRC-checked
        master, opt_state = handle.views(g, buf)
        held = [*master, *(t for t in tree.leaves(opt_state) if isinstance(t, torch.Tensor))]
        for t in held:
            entry = at[handle.engine.file_path(g.key), t.data_ptr() - buf.data_ptr()]
            assert torch.equal(entry.read(), t) and entry.dtype == t.dtype
            checked += 1
        for i, t in zip(g.leaves, master, strict=True):
            assert torch.equal(entries[f"offload/master/{handle.param_paths[i]}"].read(), t)
    assert checked == len(stored)
    handle.close()
    with pytest.raises(RuntimeError, match="closed"):
        _ours(state)


def test_describe_holds_no_threads_and_cpu_entries_view_the_host_buffers(tmp_path):
    """The pools, engine and streams of the state stay out of the description (it pickles),
    and a tier="cpu" entry is a view of the optimizer's own host buffer, not a copy."""
    for kw in (
        {"tier": "cpu"},  # streams grads in backward: a worker thread
        {"tier": "cpu", "delayed_update": True},  # the DPU thread
        {"tier": "nvme", "path": tmp_path, "what": _BOTH},  # the swap engine's threads
    ):

        def wrap(s, kw=kw):
            s = fs.shard_zero(dataclasses.replace(s, clip_norm=None), 3)
            return fs.offload(s, subgroup_mb=SMALL, **kw)

        _, _, state = _run(wrap, steps=2)
        handle = state["offload"]
        assert handle.stream is not None or handle._bg is not None or handle.engine is not None
        entries = _ours(state)
        pickle.loads(pickle.dumps(entries))  # plain data: no closure, lock or thread
        if handle.cfg.tier == "cpu":
            pool = {b.untyped_storage().data_ptr() for b in handle.buffers}
            for key, v in entries.items():
                if isinstance(v, TensorEntry):
                    assert v.tensor.untyped_storage().data_ptr() in pool, key
        handle.close()
    assert os.listdir(tmp_path) == []


def test_describe_of_the_whole_state(tmp_path):
    """fscale.state.describe(state) walks every slot of offloaded stacks (no TypeError), and
    offload's entries are its two slots' only: no thread, engine or stream is walked."""
    stacks = {
        "cpu bf16": _offloaded(0, "cpu", None, "bf16"),
        "nvme": _offloaded(0, "nvme", tmp_path),
        "cpu fp16 delayed": _offloaded(0, "cpu", None, "fp16", delayed_update=True),
        "zero1 cpu": _offloaded(1, "cpu", None),
        "zero2 nvme bf16": _offloaded(2, "nvme", tmp_path, "bf16"),
        "zero3 cpu": _offloaded(3, "cpu", None),
        "zero3 cpu params": _offloaded(3, "cpu", None, what=_BOTH),
        "zero3 nvme bf16 params": _offloaded(3, "nvme", tmp_path, "bf16", what=_BOTH),
    }
    for name, wrap in stacks.items():
        step, _, state = _run(wrap, steps=2)
        entries = describe(state)
        assert entries["count"] == 2, name
        ours = _ours(state)
        assert set(ours) <= set(entries), name
        for key, v in ours.items():  # the same entries: tensors by identity of their bytes
            w = entries[key]
            if isinstance(v, TensorEntry):
                assert w.tensor.data_ptr() == v.tensor.data_ptr() and w.placement == v.placement
            else:
                assert w == v, (name, key)
        assert not any(k.startswith("offload/") and k not in ours for k in entries), name
        assert entries["offload/tier"] == step.policy(OffloadPolicy).tier
        zero = step.policy(ZeroPolicy)
        for key, v in ours.items():
            if isinstance(v, (TensorEntry, StoredTensor)):
                assert v.placement.shard == ((zero.shard_dim,) if zero else ()), (name, key)
        state["offload"].close()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- explain


def test_explain_shows_bytes_per_tier(tmp_path):
    step, params = _step()
    plain = fs.plan(fs.shard_zero(step, 3), params)
    plan = fs.plan(fs.offload(fs.shard_zero(step, 3), "nvme", path=tmp_path), params)
    assert "optimizer" not in plan.memory
    assert plan.memory["optimizer (nvme)"] == plain.memory["optimizer"]
    assert plan.memory["master (nvme)"] == plan.param_count * 4 // plan.world
    assert any("GB/s" in n and "disk" in n for n in plan.notes)
    cpu = fs.plan(fs.offload(step, "cpu"), params)
    assert cpu.memory["optimizer (cpu)"] == 2 * cpu.param_bytes  # Adam's two fp32 moments
    assert "optimizer (cpu)" in fs.explain(fs.offload(step, "cpu"), params)
    kept = cpu.memory["optimizer (cpu)"] + cpu.memory["master (cpu)"]
    assert any(f"second set once, {kept:,} bytes" in n for n in cpu.notes), cpu.notes
    # Grads: two rotating staging buffers of the largest sub-group (here one leaf), or
    # the whole model's grads if that is less.
    small = fs.plan(fs.offload(step, "cpu", subgroup_mb=SMALL), params)
    largest = max(t.numel() * 4 for t in params.values())
    assert int(SMALL * 2**20) < largest and 2 * largest < small.param_bytes
    assert small.memory["grads staging (cpu)"] == 2 * largest
    assert cpu.memory["grads staging (cpu)"] == cpu.param_bytes
    # DPU under bf16: the masters' bf16 staging on the device ([Note: DPU staging]).
    dpu = fs.plan(fs.offload(fs.mixed_precision(step, "bf16"), "cpu", delayed_update=True), params)
    assert dpu.memory["DPU staging (device)"] == 2 * dpu.param_count
    assert "DPU staging (device)" not in cpu.memory


def _mapped_files(t: torch.Tensor) -> list[str]:
    """The files mapped at ``t``'s address (from /proc/self/maps)."""
    ptr = t.data_ptr()
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= ptr < hi and len(fields) == 6:
                out.append(fields[5].strip())
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_nvme_param_shards_are_a_mapped_file_under_path(tmp_path, monkeypatch):
    """[Note: memory-mapped param shards]: the shards every gather reads are a shared
    mapping of an unlinked file under ``path``; a drive without room fails at init."""
    params, state, _, log = _run_zero3(_zero3("bf16", "nvme", tmp_path))
    handle = state["offload"]
    mapped = _mapped_files(state["shard_zero"]["source"].buffer)
    assert len(mapped) == 1 and mapped[0].startswith(str(tmp_path)), mapped
    assert mapped[0].endswith("(deleted)")  # unlinked at once: nothing left behind
    assert all(_mapped_files(src) == mapped for kind, _, src in log if kind == "stage")
    assert all(_mapped_files(t) == mapped for t in params.values())
    on_disk = set(os.listdir(tmp_path)) - {swap.lock_name(0)}  # [Note: swap lock]
    assert on_disk == {os.path.basename(f) for f in handle.files()}  # optimizer files only
    handle.close()
    assert os.listdir(tmp_path) == []
    # The cpu tier's shards are anonymous host memory, mapped from no file.
    _, state, _, _ = _run_zero3(_zero3("bf16", "cpu"))
    buffer = state["shard_zero"]["source"].buffer
    assert not any(str(tmp_path) in f for f in _mapped_files(buffer))
    state["offload"].close()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"could not reserve .* for param shards") as info:
        _run_zero3(_zero3("bf16", "nvme", tmp_path))
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []  # the optimizer's files of the failed init went too


def test_explain_shows_param_shards_on_the_host_and_h2d_traffic(tmp_path):
    step, params = _step()
    both = ("optimizer", "params")
    for precision, size in ((None, 4), ("bf16", 2)):
        inner = fs.shard_zero(fs.mixed_precision(step, precision) if precision else step, 3)
        plain = fs.plan(inner, params)
        for tier, kw in (("cpu", {}), ("nvme", {"path": tmp_path})):
            plan = fs.plan(fs.offload(inner, tier, what=both, **kw), params)
            assert "params" not in plan.memory  # nothing of the params stays on the device
            assert plan.memory[f"params ({tier})"] == plain.memory["params"]
            # cpu: the masters are those shards ([Note: shared masters]); nvme: swapped.
            masters = plan.memory[f"master ({tier})"]
            assert masters == (0 if tier == "cpu" else plan.param_count * 4 // plan.world)
            copy = plan.memory.get(f"params compute copy ({tier})")
            assert copy == (plan.param_count * 2 // plan.world if precision else None)
            h2d = 2 * plan.param_count * size // plan.world  # forward + backward gathers
            assert any(f"{h2d:,} bytes H2D per step" in n for n in plan.notes), plan.notes
    text = fs.explain(fs.offload(fs.shard_zero(step, 3), "cpu", what=both), params)
    assert "params (cpu)" in text and "H2D" in text


# ----------------------------------------------------------------------------- CUDA


def _cuda_train(wrap, optimizer="adamw", device="cuda"):
    model = mlp([64, 256, 256, 10], seed=3).to(device)
    params, apply = fs.functional(model)
    step = wrap(fs.train_step(regression_loss(apply), _optimizer(optimizer), clip_norm=0.5))
    params, state = step.init(params)
    for batch in regression_batches(STEPS, GLOBAL_BATCH, 64, 10):
        params, state, _ = step(params, state, {k: v.to(device) for k, v in batch.items()})
    handle = state.get("offload")
    pinned = handle is not None and all(b.is_pinned() for b in handle.buffers)
    if handle is not None:
        handle.close()
    return {k: v.detach().cpu() for k, v in params.items()}, pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_params_with_host_and_nvme_state_equal_no_offload(tmp_path):
    for optimizer, tol in (("adamw", 1e-5), ("sgd", 0.0)):  # device Triton vs host fused AdamW
        expected, _ = _cuda_train(lambda s: s, optimizer)
        for name, wrap in {
            "cpu": lambda s: fs.offload(s, "cpu", subgroup_mb=0.05),
            "nvme": lambda s: fs.offload(s, "nvme", path=tmp_path, subgroup_mb=0.05),
            "nvme serial": lambda s: fs.offload(s, "nvme", path=tmp_path, overlap=False),
        }.items():
            got, pinned = _cuda_train(wrap, optimizer)
            assert pinned, name
            assert max_rel_error(got, expected) <= tol, (optimizer, name)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_delayed_update_equals_the_same_schedule_on_the_host():
    """DPU on CUDA (grads copied out and updated by the background thread, masters copied
    in without a host wait) follows the schedule the CPU test checks by hand."""
    for accumulate in (1, 4):
        wrap = lambda s, a=accumulate: fs.offload(
            dataclasses.replace(s, accumulate=a), "cpu", subgroup_mb=0.05, delayed_update=True
        )
        expected, _ = _cuda_train(wrap, "sgd", device="cpu")
        got, pinned = _cuda_train(wrap, "sgd")
        assert pinned
        assert max_rel_error(got, expected) <= 1e-5, accumulate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grads_streamed_in_backward_equal_grads_copied_after():
    """[Note: streaming grads in backward] on CUDA: events order the copies after the
    grads' kernels and the param writes after them; same bits as copying after backward."""
    for precision, accumulate in ((None, 1), ("bf16", 2)):

        def wrap(s, overlap, precision=precision, accumulate=accumulate):
            s = dataclasses.replace(s, clip_norm=None, accumulate=accumulate)
            s = fs.shard_zero(fs.mixed_precision(s, precision) if precision else s, 3)
            return fs.offload(s, "cpu", subgroup_mb=0.05, overlap=overlap)

        streamed, _ = _cuda_train(lambda s: wrap(s, True))
        after, _ = _cuda_train(lambda s: wrap(s, False))
        assert max_rel_error(streamed, after) == 0.0, (precision, accumulate)


def _cuda_zero3(wrap):
    """A world-of-one stage-3 run on CUDA: full params, device bytes step.init kept, metrics."""
    model = mlp([64, 256, 256, 10], seed=3).cuda()
    params, apply = fs.functional(model)
    step = wrap(fs.train_step(regression_loss(apply), _optimizer(), clip_norm=0.5))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    params, state = step.init(params)
    kept = torch.cuda.memory_allocated() - before
    for batch in regression_batches(STEPS, GLOBAL_BATCH, 64, 10):
        params, state, metrics = step(params, state, {k: v.cuda() for k, v in batch.items()})
    full = {k: v.detach().cpu() for k, v in fs.gather_params(params).items()}
    handle = state.get("offload")
    if handle is not None:
        handle.close()
    return full, kept, metrics, state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_cuda_param_offload_keeps_no_shard_on_the_device(precision):
    expected, _, _, _ = _cuda_zero3(_zero3(precision))
    _, kept_optimizer_only, _, _ = _cuda_zero3(_zero3(precision, "cpu", what=("optimizer",)))
    got, kept, metrics, state = _cuda_zero3(_zero3(precision, "cpu"))
    assert max_rel_error(got, expected) <= 1e-5  # device Triton AdamW vs host fused AdamW
    shard_bytes = sum(f.numel() * f.element_size() for f in state["shard_zero"]["flats"].values())
    # Without param offload init keeps the fp32 shards on the device; with it, only
    # scalars (the loss scale, the stand-ins' zeros are per call).
    assert kept_optimizer_only >= shard_bytes
    assert kept < 4096, kept
    host = state["shard_zero"]["source"].buffer  # the param source offload published
    assert host.device.type == "cpu" and host.is_pinned()
    assert metrics["zero3_device_shard_bytes"] == 0
    assert 0 < metrics["zero3_peak_h2d_staging_bytes"]


# ----------------------------------------------------------------------------- second buffers


class _Holder:
    """Stands for a snapshot keeping buffers ([Note: buffers a snapshot keeps])."""


@pytest.mark.parametrize(("optimizer", "skip"), [("adamw", False), ("adamw", True), ("sgd", False)])
def test_a_held_group_is_updated_into_its_second_buffer(optimizer, skip):
    """While a buffer is held, ``update_group`` leaves it as it was and writes what an
    in-place update gives into the group's second buffer, which it then uses: through
    the AdamW kernels' redirect, or a copy updated in place (SGD's own writes). A
    skipped update (the kernel writes nothing) carries every slot over."""
    from fscale import state as protocol
    from fscale.optim.base import skipping

    _, _, state = _run(lambda s: fs.offload(s, "cpu", subgroup_mb=SMALL), optimizer=optimizer)
    handle = state["offload"]
    try:
        assert handle.seconds is None  # allocated only once a save keeps a buffer
        k = len(handle.groups) // 2
        g = handle.groups[k]
        buf = handle.buffers[k]
        held = buf.clone()
        counts, updates = list(g.state_leaves), g.updates
        with skipping(torch.tensor(skip)):  # the in-place reference on a copy of the state
            twin = buf.clone()
            handle.update_group(k, twin)
        g.state_leaves[:], g.updates = counts, updates  # the step again, for real
        holder = _Holder()
        protocol.hold(buf, holder)
        assert protocol.held(buf) and protocol.held(buf[:8]) and not protocol.held(twin)
        with skipping(torch.tensor(skip)):
            handle.update_group(k, buf)
        protocol.release(holder)
        assert torch.equal(buf, held)  # the save's bytes
        assert handle.seconds[k] is buf and handle.buffers[k] is not buf
        slots = [*g.master, *(s for s in g.state_leaves if hasattr(s, "view"))]
        for s in slots:  # (not the padding between slots)
            assert torch.equal(s.view(handle.buffers[k]), s.view(twin))
        assert all(torch.equal(s.view(twin), s.view(held)) for s in slots) == skip
    finally:
        handle.close()


def test_before_write_waits_for_a_held_buffer_until_released():
    import threading

    from fscale import state as protocol

    buf = torch.zeros(64, dtype=torch.uint8)
    seconds = []

    def second(allocate):
        if allocate and not seconds:
            seconds.append(torch.zeros_like(buf))
        return seconds[0] if seconds else None

    protocol.announce_writes(buf, second=second)
    assert protocol.keepable(buf[8:16]) is buf
    assert protocol.second_buffer(buf, allocate=False) is None
    assert protocol.second_buffer(buf) is protocol.second_buffer(buf) is seconds[0]
    holder = _Holder()
    protocol.hold(buf, holder)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (protocol.before_write(buf[4:8]), done.set()))
    writer.start()
    assert not done.wait(0.3)  # a load into live state waits for the save
    protocol.release(holder)
    assert done.wait(10)
    writer.join()
    plain = torch.zeros(8)
    protocol.announce_writes(plain)
    assert protocol.keepable(plain) is None
    with pytest.raises(ValueError, match="second="):
        protocol.second_buffer(plain)
