"""The 1-bit methods under offload: ``offload(compress_comm(step, method), tier)``.

Offloaded, each method is the same computation as on the device ([Note: 1-bit methods
under offload] in ``fscale/transforms/_compress/onebit_zero.py``): with the reference
AdamW kernel on the host (the fused one rounds the warm-up differently in the last
bit, which the compression phase then amplifies), the params are bitwise those of
the same stack without offload, on plain data parallel and ZeRO-1/2, several host
sub-groups, both tiers, in a world of one and on a gloo world of 2 (one world, cached,
runs every case); a checkpoint of the offloaded compressed state resumes exactly.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import types

import pytest
import torch

import fscale as fs
from fscale.models.gpt import gpt_loss
from fscale.transforms._compress import onebit_zero
from fscale.transforms._compress.onebit import NAME, TAG
from fscale.transforms.compress import compress_comm, onebit_adam
from tests.dist import run_world
from tests.transforms.test_onebit import _batches, _gpt
from tests.transforms.test_onebit_zero import _step as zero_step

METHODS = ("adam", "zero_one", "lamb")
FREEZE = 3
STEPS = 11
#: Host sub-groups of ~20 KB of masters: the tiny GPT's leaves fall into several.
SUBGROUP_MB = 0.02


@pytest.fixture(autouse=True)
def _reference_adam(monkeypatch):
    monkeypatch.setenv("FSCALE_KERNELS", "reference")  # reaches the ranks too


def _step(apply, method, zero, offload, *, mp=False, tier="cpu", path=None):
    step = zero_step(apply, zero, True, freeze=FREEZE, method=method, mp=mp)
    if offload:
        step = fs.offload(step, tier, path=path, subgroup_mb=SUBGROUP_MB)
    return step


def _train(method, zero, offload, *, rank=0, world=1, **kw):
    params, apply = fs.functional(_gpt())
    step = _step(apply, method, zero, offload, **kw)
    params, state = step.init(params)
    per = 4 // world
    out = {"phases": [], "bytes": [], "groups": 0}
    if offload:
        out["groups"] = len(state["offload"].groups)
    for b in _batches(STEPS, 4):
        local = {k: v[rank * per : (rank + 1) * per] for k, v in b.items()}
        params, state, metrics = step(params, state, local)
        out["phases"].append(metrics["compress_phase"])
        out["bytes"].append(dict(metrics["comm_bytes_by_tag"]))
    if offload:
        state["offload"].close()
    out["params"] = params
    return out


def _equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zero", [None, 1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_world_of_one_offloaded_equals_on_device_bitwise(method, zero):
    want = _train(method, zero, False)
    got = _train(method, zero, True)
    assert got["groups"] > 1
    assert got["phases"] == want["phases"] and got["phases"][-1] in ("onebit", "sync")
    if method == "zero_one":
        assert {"variance", "onebit", "local", "sync"} <= set(got["phases"])
    assert _equal(want["params"], got["params"])


@pytest.mark.parametrize(("method", "zero"), [("adam", None), ("zero_one", 2), ("lamb", None)])
def test_nvme_and_mixed_precision_offloaded_equal_on_device_bitwise(method, zero, tmp_path):
    want = _train(method, zero, False, mp=True)
    got = _train(method, zero, True, mp=True, tier="nvme", path=str(tmp_path))
    assert got["groups"] > 1
    assert _equal(want["params"], got["params"])


def test_offload_does_not_stream_grads_past_the_exchange():
    """In the compression phase the optimizer takes the synced momentum, not backward's
    grads: offload must not stream them into its update (world of one would)."""
    _, apply = fs.functional(_gpt())
    step = _step(apply, "adam", None, True)
    record = next(t for t in step.transforms if t.name == "offload")
    assert record.options["streams_grads"] is False


# ----------------------------------------------------------------------------- world 2

SAVE_AT = {"adam": 5, "lamb": 5, "zero_one": 6}  # compressing; 0/1 Adam on a sync


def _resume(rank, world, path, method, zero):
    """Save while compressing, load into a fresh offloaded state, continue."""
    model = _gpt()
    batches = _batches(10, batch=4)
    per = 4 // world

    def build():
        params, apply = fs.functional(copy.deepcopy(model))
        return _step(apply, method, zero, True), params

    def local(b):
        return {k: v[rank * per : (rank + 1) * per] for k, v in b.items()}

    step, params = build()
    params, state = step.init(params)
    where = f"{path}-{method}-{zero}"
    for i, b in enumerate(batches):
        params, state, _ = step(params, state, local(b))
        if i == SAVE_AT[method]:
            fs.save(where, params, state)
    step2, fresh = build()
    params2, state2 = fs.load(where, step2, fresh)
    errors = float(state2[NAME]["worker_error"].abs().sum())
    for b in batches[SAVE_AT[method] + 1 :]:
        params2, state2, _ = step2(params2, state2, local(b))
    state["offload"].close()
    state2["offload"].close()
    return {"equal": _equal(params, params2), "errors_used": errors}


CASES = [(m, z) for m in METHODS for z in (None, 2)]
RESUME = [("adam", 2), ("zero_one", None), ("lamb", None)]


def _world_fn(rank, world, path):
    out = {}
    for method, zero in CASES:
        out[(method, zero)] = (
            _train(method, zero, False, rank=rank, world=world),
            _train(method, zero, True, rank=rank, world=world),
        )
    for method, zero in RESUME:
        out[("resume", method)] = _resume(rank, world, path, method, zero)
    return out


@functools.cache
def _world():
    with tempfile.TemporaryDirectory() as d:
        return run_world(_world_fn, 2, f"{d}/ckpt", timeout=600)


@pytest.mark.parametrize(("method", "zero"), CASES)
def test_world_two_offloaded_equals_on_device_bitwise(method, zero):
    ranks = _world()
    for rank in ranks:
        want, got = rank[(method, zero)]
        assert got["groups"] > 1
        assert got["phases"] == want["phases"]
        # The same compressed exchange: the same bytes under the same tags.
        assert got["bytes"] == want["bytes"]
        assert any(TAG in b for b in got["bytes"])
        assert _equal(want["params"], got["params"])
    if method != "zero_one":  # 0/1 Adam's ranks differ between syncs by design
        assert _equal(ranks[0][(method, zero)][1]["params"], ranks[1][(method, zero)][1]["params"])


@pytest.mark.parametrize("method", METHODS)
def test_world_two_offloaded_resume_equals_uninterrupted(method):
    for rank in _world():
        got = rank[("resume", method)]
        assert got["errors_used"] > 0  # the error feedback came back from the checkpoint
        assert got["equal"]


# ----------------------------------------------------------------------------- errors


def test_delayed_update_is_refused_at_init():
    params, apply = fs.functional(_gpt())
    step = fs.train_step(gpt_loss(apply), fs.optim.adamw(1e-3))
    step = fs.offload(compress_comm(step, onebit_adam(freeze_step=2)), delayed_update=True)
    with pytest.raises(ValueError, match=r"delayed_update=True.*delayed_update=False"):
        step.init(params)


def test_offload_inside_compress_is_refused_naming_the_order():
    params, apply = fs.functional(_gpt())
    step = fs.offload(fs.train_step(gpt_loss(apply), fs.optim.adamw(1e-3)))
    with pytest.raises(ValueError, match=r"offload\(compress_comm\(step, method\)"):
        compress_comm(step, onebit_adam(freeze_step=2))


def test_a_group_without_cpu_transport_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    cfg = types.SimpleNamespace(group=None, method=onebit_adam(freeze_step=2))
    with pytest.raises(ValueError, match=r"cpu:gloo,cuda:nccl"):
        onebit_zero.host_group_or_raise(cfg)


# ----------------------------------------------------------------------------- CUDA


def _cuda_run(method, zero, offload, tmp_path=None):
    params, apply = fs.functional(_gpt().cuda())
    tier = "nvme" if tmp_path is not None else "cpu"
    step = _step(apply, method, zero, offload, mp=True, tier=tier, path=tmp_path)
    params, state = step.init(params)
    phases = []
    for b in _batches(STEPS, 4):
        params, state, metrics = step(params, state, {k: v.cuda() for k, v in b.items()})
        phases.append(metrics["compress_phase"])
    slot = state[NAME]
    where = {slot["worker_error"].device.type, slot["momentum"].device.type} if offload else set()
    if offload:
        state["offload"].close()
    with torch.no_grad():
        val = {k: v.cuda() for k, v in _batches(1, 64, seed=99)[0].items()}
        loss = float(gpt_loss(apply)(params, val))
    return loss, phases, where


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("method", "zero"), [("adam", None), ("zero_one", 2), ("lamb", 1)])
def test_cuda_params_with_host_state_train_as_on_the_device(method, zero, tmp_path, monkeypatch):
    """Params on the GPU, the method's state and exchange on the host: the local grads go
    out, the synced rows come back; the same training as on the device (host and device
    arithmetic round differently in the last bit, which sign compression amplifies)."""
    monkeypatch.delenv("FSCALE_KERNELS")  # the device run takes its GPU kernels
    want, phases, _ = _cuda_run(method, zero, False)
    for path in (None, str(tmp_path)):
        got, got_phases, where = _cuda_run(method, zero, True, path)
        assert got_phases == phases and phases[-1] in ("onebit", "sync")
        assert where == {"cpu"}
        assert got == pytest.approx(want, rel=0.02), path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exchange_with_reference_kernels_trains_as_with_triton(monkeypatch):
    """FSCALE_KERNELS=reference on a GPU: the server's mean takes the torch ops (its CPU
    loops are for host tensors)."""
    ref, phases, _ = _cuda_run("adam", None, False)  # the autouse fixture: reference
    monkeypatch.delenv("FSCALE_KERNELS")
    got, _, _ = _cuda_run("adam", None, False)
    assert phases[-1] == "onebit" and got == pytest.approx(ref, rel=0.02)


def test_offload_offers_its_buffers_to_a_save_only_where_adamw_writes_them():
    """compress_comm's 1-bit rows step writes the moments itself, not through the AdamW
    kernel's lowerings, so offload does not offer its buffers to a save, which then
    copies them ([Note: buffers a snapshot keeps]); plain AdamW does."""
    from fscale import state as protocol

    params, apply = fs.functional(_gpt())
    for step, keepable in (
        (_step(apply, "adam", None, True), False),
        (fs.offload(fs.train_step(gpt_loss(apply), fs.optim.adamw(1e-3)), "cpu"), True),
        (fs.offload(fs.train_step(gpt_loss(apply), fs.optim.sgd(0.1, momentum=0.9)), "cpu"), False),
    ):
        _, state = step.init(params)
        handle = state["offload"]
        try:
            assert handle.writes_through_kernel() == keepable
            assert all((protocol.keepable(b) is b) == keepable for b in handle.buffers)
        finally:
            handle.close()
