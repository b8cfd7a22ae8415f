"""The Triton AdamW kernel against its torch reference, and the reference against torch.

On CPU the kernel runs under Triton's interpreter: the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` for the test; ``fscale.kernels.adamw`` wraps the kernel
with ``triton.jit`` at its first launch in each mode, so the variable need not be
set before anything imports the module.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.kernels import adamw

HAS_TRITON = adamw.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _state(sizes, *, p_dtype=torch.float32, m_dtype=torch.float32, device="cpu", seed=0):
    """Fresh random params, grads and moments (never zeros: they hide unwritten outputs)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n, scale=1.0, positive=False):
        x = torch.randn(n, generator=gen) * scale
        return x.abs() if positive else x

    ps = [draw(n).to(device, p_dtype) for n in sizes]
    gs = [draw(n).to(device, p_dtype) for n in sizes]
    ms = [draw(n, 0.1).to(device, m_dtype) for n in sizes]
    vs = [draw(n, 0.01, positive=True).to(device, m_dtype) for n in sizes]
    return [ps, gs, ms, vs]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 (per tensor; robust to b's zeros)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _max_rel_err(got, want) -> float:
    pairs = zip(got, want, strict=True)
    return max(_rel_err(a, b) for ts_a, ts_b in pairs for a, b in zip(ts_a, ts_b, strict=True))


# Sizes around BLOCK (1024) and the 16-element alignment unit, so that full
# blocks, partial blocks and sub-16 tails all occur.
SIZES = [1, 15, 16, 17, 1000, 1024, 1025, 4097, 9000]


@needs_triton
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_triton_matches_reference_grouped(interpret, weight_decay):
    """The default launch (all tensors through the chunk table), over several steps."""
    got = _state(SIZES)
    want = _clone(got)
    for step in range(1, 4):
        # Fresh gradients every step, the same for both.
        grads = _state(SIZES, seed=100 + step)[1]
        got[1], want[1] = grads, [g.clone() for g in grads]
        adamw.adamw_update_triton_(*got, **HYPER, weight_decay=weight_decay, step=step)
        adamw.adamw_update_reference_(*want, **HYPER, weight_decay=weight_decay, step=step)
        assert _max_rel_err(got, want) <= 1e-6


@needs_triton
@pytest.mark.parametrize("block", [None, 512])
def test_a_set_skip_flag_changes_nothing(interpret, block):
    """skip=1 returns before touching memory (grouped and direct launches); skip=0 is
    the plain update ([Note: skipping on the device])."""
    kw = dict(**HYPER, weight_decay=0.1, step=3)
    got = _state(SIZES)
    before = _clone(got)

    def equal(xs, ys) -> bool:
        pairs = zip(xs, ys, strict=True)
        return all(torch.equal(a, b) for x, y in pairs for a, b in zip(x, y, strict=True))

    adamw._update(*got, **kw, skip=torch.tensor(True), direct_min_numel=block)
    assert equal(got, before)
    want = _clone(got)
    adamw._update(*got, **kw, skip=torch.tensor(0), direct_min_numel=block)
    adamw.adamw_update_triton_(*want, **kw)
    assert equal(got, want)
    assert not equal(got[:1], before[:1])
    ref = _clone(before)
    adamw.adamw_update_reference_(*ref, **kw, skip=torch.tensor(1.0))
    assert equal(ref, before)
    with pytest.raises(ValueError, match="skip must be a one-element tensor"):
        adamw.adamw_update_triton_(*got, **kw, skip=torch.zeros(2))


@needs_triton
@pytest.mark.parametrize("block", [512, 1024])
def test_triton_matches_reference_direct_launches(interpret, block):
    """Per-tensor launches (``direct_min_numel``, here 2000 elements) for the large
    tensors; their tails past the last multiple of 16 go through the table launch."""
    sizes = [2000, 2048, 2053, 5000, 7, 300]
    got = _state(sizes, seed=1)
    want = _clone(got)
    for step in (1, 2, 50):
        adamw._update(
            *got, **HYPER, weight_decay=0.05, step=step, block=block, direct_min_numel=2000
        )
        adamw.adamw_update_reference_(*want, **HYPER, weight_decay=0.05, step=step)
    assert _max_rel_err(got, want) <= 1e-6


@needs_triton
def test_triton_misaligned_views(interpret):
    """Contiguous views that start 4 bytes into their storage cannot take the 16-byte
    vector path; they go to the unhinted launch and must still be right."""
    sizes = [40, 2049]
    got = [[t_[1:] for t_ in ts] for ts in _state([n + 1 for n in sizes], seed=8)]
    assert all(t.is_contiguous() and t.data_ptr() % 16 for ts in got for t in ts)
    want = _clone(got)
    for step in (1, 2):
        adamw._update(*got, **HYPER, weight_decay=0.1, step=step, block=512)
        adamw.adamw_update_reference_(*want, **HYPER, weight_decay=0.1, step=step)
    assert _max_rel_err(got, want) <= 1e-6


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    beta1=st.sampled_from([0.9, 0.3]),  # 0.3: torch's lerp takes its other branch
    weight_decay=st.sampled_from([0.0, 0.1]),
    step=st.integers(1, 1000),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_drawn(sizes, beta1, weight_decay, step, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        got = _state(sizes, seed=seed)
        want = _clone(got)
        hyper = dict(HYPER, beta1=beta1, weight_decay=weight_decay, step=step)
        adamw._update(*got, **hyper, block=1024, direct_min_numel=2048)
        adamw.adamw_update_reference_(*want, **hyper)
        # One fused expression against the reference's op-by-op rounding: a drawn case
        # (sizes [2, 17, 321, 1703], seed 20064, step 1) differed by 1.01e-6, 8.5 ulps.
        assert _max_rel_err(got, want) <= 2e-6


@needs_triton
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_params(interpret, p_dtype):
    """bf16/fp16 params and grads with fp32 moments: the kernel rounds p once, from
    fp32 maths, so compare with the reference run in fp32 and rounded at the end.

    The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even), so p
    may be one ulp off here: 2**-7 relative for bf16, 2**-10 for fp16.
    """
    sizes = [33, 5000]
    got = _state(sizes, p_dtype=p_dtype, seed=3)
    want = [[t.float() for t in got[0]], [t.float() for t in got[1]], *_clone(got[2:])]
    kw = dict(HYPER, weight_decay=0.1, step=2)
    adamw.adamw_update_triton_(*got, **kw)
    adamw.adamw_update_reference_(*want, **kw)
    ulp = 2.0**-7 if p_dtype == torch.bfloat16 else 2.0**-10
    for p, p32 in zip(got[0], want[0], strict=True):
        assert p.dtype == p_dtype
        assert ((p.float() - p32).abs() <= ulp * p32.abs() + 1e-6).all()
    # The moments stay fp32 and see the same (exactly representable) grads.
    assert _max_rel_err(got[2:], want[2:]) <= 1e-6


def test_reference_matches_torch_adamw():
    sizes = [7, 300, 64 * 33]
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    ps, _, _, _ = _state(sizes, seed=4)
    torch_params = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = torch.optim.AdamW(torch_params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 11):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        for tp, g in zip(torch_params, grads, strict=True):
            tp.grad = g.clone()
        opt.step()
        adamw.adamw_update_reference_(
            ps, grads, ms, vs, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
            weight_decay=wd, step=step,
        )  # fmt: skip
    for p, tp in zip(ps, torch_params, strict=True):
        assert _rel_err(p, tp.detach()) <= 1e-6
    for m, v, tp in zip(ms, vs, torch_params, strict=True):
        assert _rel_err(m, opt.state[tp]["exp_avg"]) <= 1e-6
        assert _rel_err(v, opt.state[tp]["exp_avg_sq"]) <= 1e-6


@needs_triton
def test_triton_errors(interpret, monkeypatch):
    ps, gs, ms, vs = _state([64, 64])
    kw = dict(HYPER, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="1 grads for 2 params"):
        adamw.adamw_update_triton_(ps, gs[:1], ms, vs, **kw)
    bad = torch.randn(16, 8).t()
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        adamw.adamw_update_triton_([bad], [bad.clone()], [bad.clone()], [bad.clone()], **kw)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        adamw.adamw_update_triton_([ps[0].double()], gs[:1], ms[:1], vs[:1], **kw)
    with pytest.raises(ValueError, match="has 32 elements"):
        adamw.adamw_update_triton_(ps[:1], [gs[0][:32]], ms[:1], vs[:1], **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        adamw.adamw_update_triton_(ps, gs, ms, vs, **kw)
    adamw.adamw_update_triton_([], [], [], [], **kw)  # nothing to do


# --- dispatch ------------------------------------------------------------------------------


def test_dispatch_cpu_resolves_to_reference():
    assert dispatch.resolve("adamw_update", torch.zeros(3)).name == "adamw_update_reference"


@needs_triton
def test_dispatch_cuda_resolution(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(dispatch, "capability", lambda device: (9, 0))
    assert dispatch.resolve("adamw_update", cuda, torch.float32).name == "adamw_update_triton"
    assert dispatch.resolve("adamw_update", cuda, torch.bfloat16).name == "adamw_update_triton"
    # A dtype the kernel does not take, or too old a GPU: the reference.
    assert dispatch.resolve("adamw_update", cuda, torch.float64).name == "adamw_update_reference"
    monkeypatch.setattr(dispatch, "capability", lambda device: (7, 5))
    assert dispatch.resolve("adamw_update", cuda, torch.float32).name == "adamw_update_reference"
    # Forced references win over a fitting platform rule.
    monkeypatch.setattr(dispatch, "capability", lambda device: (9, 0))
    monkeypatch.setenv("FSCALE_KERNELS", "reference")
    assert dispatch.resolve("adamw_update", cuda, torch.float32).name == "adamw_update_reference"


# --- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_triton_matches_reference_cuda():
    # A GPT-like mix: large matrices (one launch each, one with a tail), small vectors.
    sizes = [50304 * 768, 768 * 2304, 768 * 3072 + 5, 768, 2304, 3, 4096 * 3 + 1]
    got = _state(sizes, device="cuda", seed=6)
    want = _clone(got)
    for step in (1, 2, 3):
        adamw.adamw_update_triton_(*got, **HYPER, weight_decay=0.1, step=step)
        adamw.adamw_update_reference_(*want, **HYPER, weight_decay=0.1, step=step)
    torch.cuda.synchronize()
    assert _max_rel_err(got, want) <= 1e-6
