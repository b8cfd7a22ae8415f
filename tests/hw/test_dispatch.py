"""The kernel table (``fscale.hw.dispatch``): register, resolve by device, capability,
dtype and priority, the forced reference, and the errors that list what is known.

Each test registers its own ops (``"t.*"``) on a copy of the table that is put back
afterwards, so the real lowerings are untouched."""

from __future__ import annotations

import pytest
import torch

from fscale.hw import dispatch

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def table(monkeypatch):
    """The real table's entries, in a copy this test may change; and no forced mode."""
    monkeypatch.setattr(dispatch, "_TABLE", {op: list(r) for op, r in dispatch._TABLE.items()})
    monkeypatch.setattr(dispatch, "_RESOLVED", dict(dispatch._RESOLVED))
    monkeypatch.delenv("FSCALE_KERNELS", raising=False)
    return dispatch._TABLE


@pytest.fixture
def gpu(monkeypatch):
    """Pretend CUDA devices have capability ``gpu(cap)`` (no GPU needed)."""

    def set_capability(cap):
        def capability(device):
            return cap if torch.device(device).type == "cuda" else None

        monkeypatch.setattr(dispatch, "capability", capability)

    return set_capability


def _impl(tag):
    def impl(*args):
        return tag

    impl.__qualname__ = f"impl_{tag}"
    return impl


def test_reference_runs_everywhere(gpu):
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    gpu((9, 0))
    for where in ("cpu", CUDA, torch.zeros(2)):
        rule = dispatch.resolve("t.op", where)
        assert rule.name == "t_ref" and rule.is_reference and rule.impl() == "ref"


def test_platform_rule_beats_the_reference_whatever_the_priorities(gpu):
    gpu((8, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref", priority=100)
    dispatch.register("t.op", _impl("gpu"), device="cuda", name="t_gpu", priority=-5)
    assert dispatch.resolve("t.op", CUDA).impl() == "gpu"
    assert dispatch.resolve("t.op", "cpu").impl() == "ref"


def test_highest_priority_fitting_rule_wins(gpu):
    gpu((9, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("low"), device="cuda", priority=1, name="t_low")
    dispatch.register(
        "t.op", _impl("high"), device="cuda", priority=9, min_capability=(9, 0), name="t_high"
    )
    dispatch.register("t.op", _impl("mid"), device="cuda", priority=5, name="t_mid")
    assert dispatch.resolve("t.op", CUDA).name == "t_high"
    gpu((8, 6))  # t_high does not fit: the next priority does
    assert dispatch.resolve("t.op", CUDA).name == "t_mid"


@pytest.mark.parametrize(
    "cap,fits",
    [((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True), ((7, 5), False)],
)
def test_min_capability_compares_as_tuples(gpu, cap, fits):
    """sm_89 has what (8, 9) asks, sm_86 not; sm_100 too, though "10.0" < "8.9" as text."""
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("fp8"), device="cuda", min_capability=(8, 9), name="t_fp8")
    gpu(cap)
    assert dispatch.resolve("t.op", CUDA).name == ("t_fp8" if fits else "t_ref")


def test_a_capability_rule_never_fits_a_cpu(gpu):
    gpu((9, 0))  # a CPU has no capability
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("cpu"), device="cpu", min_capability=(1, 0), name="t_cpu")
    assert dispatch.resolve("t.op", "cpu").name == "t_ref"


def test_device_rules_fit_only_their_device(gpu):
    gpu((9, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("cpu"), device="cpu", name="t_cpu")
    assert dispatch.resolve("t.op", "cpu").name == "t_cpu"
    assert dispatch.resolve("t.op", CUDA).name == "t_ref"


def test_dtypes_restrict_a_rule_and_a_tensor_gives_its_dtype(gpu):
    gpu((9, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register(
        "t.op", _impl("half"), device="cpu", dtypes=(torch.float16, torch.bfloat16), name="t_half"
    )
    assert dispatch.resolve("t.op", torch.zeros(1, dtype=torch.bfloat16)).name == "t_half"
    assert dispatch.resolve("t.op", torch.zeros(1, dtype=torch.float32)).name == "t_ref"
    assert dispatch.resolve("t.op", "cpu", torch.float64).name == "t_ref"
    # No dtype given (a device alone): a dtype-restricted rule is not ruled out.
    assert dispatch.resolve("t.op", "cpu").name == "t_half"
    # An explicit dtype wins over the tensor's.
    assert dispatch.resolve("t.op", torch.zeros(1), torch.float16).name == "t_half"


@pytest.mark.parametrize("mode", ["reference", "REFERENCE", " reference "])
def test_forced_reference_wins_over_every_platform_rule(gpu, monkeypatch, mode):
    gpu((9, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("gpu"), device="cuda", priority=10, name="t_gpu")
    assert dispatch.resolve("t.op", CUDA).name == "t_gpu"
    monkeypatch.setenv("FSCALE_KERNELS", mode)
    assert dispatch.resolve("t.op", CUDA).name == "t_ref"


@pytest.mark.parametrize("mode", ["", "auto"])
def test_auto_mode_is_the_default(gpu, monkeypatch, mode):
    gpu((9, 0))
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    dispatch.register("t.op", _impl("gpu"), device="cuda", name="t_gpu")
    monkeypatch.setenv("FSCALE_KERNELS", mode)
    assert dispatch.resolve("t.op", CUDA).name == "t_gpu"


def test_bad_kernel_mode(monkeypatch):
    dispatch.register("t.op", _impl("ref"), name="t_ref")
    monkeypatch.setenv("FSCALE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="FSCALE_KERNELS='fastest' is not understood"):
        dispatch.resolve("t.op", torch.zeros(2))


def test_unknown_op_lists_the_known_ones():
    dispatch.register("t.known", _impl("ref"), name="t_ref")
    with pytest.raises(KeyError, match=r"'t\.nope'.*known ops: \[.*'t\.known'"):
        dispatch.resolve("t.nope", torch.zeros(2))


def test_no_fitting_rule_lists_the_registered_ones(gpu):
    gpu((8, 0))
    dispatch.register("t.gpu_only", _impl("gpu"), device="cuda", min_capability=(9, 0))
    with pytest.raises(LookupError, match=r"device=cuda.*impl_gpu.*\(9, 0\).*device='any'"):
        dispatch.resolve("t.gpu_only", CUDA, torch.float16)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*'cuda', 'cpu' or 'any'"):
        dispatch.register("t.op", _impl("x"), device="tpu")
    assert "t.op" not in dispatch.known_ops()


def test_registering_a_name_again_replaces_it(gpu):
    gpu((9, 0))
    dispatch.register("t.op", _impl("old"), device="cuda", name="t_gpu")
    dispatch.register("t.op", _impl("new"), device="cuda", name="t_gpu", priority=3)
    (rule,) = dispatch.lowerings("t.op")
    assert rule.impl() == "new" and rule.priority == 3


def test_register_returns_the_rule_with_normalized_fields():
    rule = dispatch.register(
        "t.op", _impl("a"), device="cuda", min_capability=[8, 0], dtypes=[torch.float16]
    )
    assert rule.name == "impl_a"  # the impl's qualname when no name is given
    assert rule.min_capability == (8, 0) and rule.dtypes == frozenset({torch.float16})
    assert not rule.is_reference
    assert dispatch.lowerings("t.op") == [rule]


def test_lowerings_known_ops_and_resolved_report_the_table():
    dispatch.register("t.b", _impl("b"), name="t_b")
    dispatch.register("t.a", _impl("a"), name="t_a")
    ops = dispatch.known_ops()
    assert ops == sorted(ops) and {"t.a", "t.b"} <= set(ops)
    listed = dispatch.lowerings("t.a")
    listed.clear()  # a copy: the table keeps its rule
    assert [r.name for r in dispatch.lowerings("t.a")] == ["t_a"]
    assert dispatch.lowerings("t.none") == []
    assert "t.a" not in dispatch.resolved()
    dispatch.resolve("t.a", "cpu")
    assert dispatch.resolved()["t.a"] == "t_a"
