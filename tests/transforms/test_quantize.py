"""The ``quantize`` transform: the unchanged ``apply`` runs the quantized kernels.

Models: the tiny GPT of ``fscale.models`` and a Hugging Face GPT-2 built from a
config (its ``Conv1D`` layers store weights ``[in, out]`` and call ``addmm``).
Tolerances are on the relative max error of the logits against the float model,
per format (random-init models, whose logits are small and so a hard case).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from fscale.hw import dispatch
from fscale.kernels import intq
from fscale.models import GPT, GPTConfig
from fscale.transforms.quantize import (
    FORMATS,
    QuantizedWeight,
    codec,
    dequantize,
    quantize,
    quantize_report,
)

try:
    from fscale.kernels import fpx  # noqa: F401

    HAS_FPX = True
except ImportError:  # written beside this transform; the int paths do not need it
    HAS_FPX = False

# Relative max logit error vs the float model (tiny GPT, random init).
TOL = {
    "e3m2": 0.05,
    "e2m3": 0.05,
    "e2m2": 0.06,
    "e3m1": 0.08,
    "e2m1": 0.10,
    "e3m2-a8": 0.07,
    "e2m2-a8": 0.08,
    "e3m1-a8": 0.10,
    "int8": 0.01,
    "int4": 0.10,
    "w8a8": 0.02,
    "fp8": 0.05,
}
INT_FORMATS = ("int8", "int4", "w8a8", "fp8")
_NO_FPX = pytest.mark.skip(reason="fscale.kernels.fpx not available")
ALL = [f if f in INT_FORMATS or HAS_FPX else pytest.param(f, marks=_NO_FPX) for f in FORMATS]
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny())
    params, apply = fs.functional(model)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = apply(params, x)
    return params, apply, x, ref


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def spy():
    """Register a CPU lowering that records its calls and runs the reference."""
    saved = {}
    calls: dict[str, int] = {}

    def install(op):
        saved[op] = list(dispatch._TABLE[op])
        ref = next(r for r in saved[op] if r.is_reference)

        def impl(*args, **kwargs):
            calls[op] = calls.get(op, 0) + 1
            return ref.impl(*args, **kwargs)

        dispatch.register(op, impl, device="cpu", priority=1000, name=f"spy_{op}")
        return calls

    yield install
    dispatch._TABLE.update(saved)


@pytest.mark.parametrize("fmt", ALL)
def test_tiny_gpt_through_unchanged_apply(tiny, spy, fmt, monkeypatch):
    params, apply, x, ref = tiny
    c = codec(fmt)
    if fmt.endswith("-a8"):  # 48 tokens: FP8 activations from 1 row on, not 256
        from fscale.kernels import fpx_a8

        monkeypatch.setattr(fpx_a8, "MIN_TOKENS", 1)
    calls = spy(c.op)
    q = quantize(params, fmt, group_size=32, pad=True)
    assert set(q) == set(params)
    quantized = sorted(k for k, v in q.items() if isinstance(v, QuantizedWeight))
    assert quantized == sorted(f"blocks.{i}.{n}.weight" for i in range(2) for n in LINEARS)
    assert q["tok_emb.weight"] is params["tok_emb.weight"]  # embedding (and tied head) kept
    with torch.no_grad():
        y = apply(q, x)
    assert calls[c.op] == len(quantized)  # every linear went through the kernel table
    assert _rel(y, ref) < TOL[fmt], fmt
    # the dequantize fallback computes the same function
    with torch.no_grad():
        y_deq = apply(dequantize(q), x)
    acts = fmt in ("w8a8", "fp8") or fmt.endswith("-a8")  # those quantize activations too
    tol = TOL[fmt] if acts else 1e-5
    assert _rel(y_deq, y) < tol


def test_int_kernel_resolved_per_call(tiny, spy):
    params, apply, x, _ = tiny
    calls = spy(intq.INT_OP)
    q = quantize(params, "int4", group_size=32, symmetric=False)
    apply(q, x)
    apply(q, x)
    assert calls[intq.INT_OP] == 16
    assert "spy_int_linear" in quantize_report(q)


def test_hf_gpt2(spy):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    params, apply = fs.functional(model)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = apply(params, x).logits
    calls = spy(intq.INT_OP)
    # module=: Conv1D [in, out] weights are packed along in_features and hit the kernel
    q = quantize(params, "int8", group_size=64, module=apply)
    names = [k for k, v in q.items() if isinstance(v, QuantizedWeight)]
    assert len(names) == 8 and all(".h." in n for n in names)
    assert q["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # logical shape kept
    with torch.no_grad():
        y = apply(q, x).logits
    assert calls[intq.INT_OP] == 8
    assert _rel(y, ref) < 0.01
    # Without module= the name heuristic still selects them; addmm then runs on the
    # dequantized weight (correct, not fused).
    q2 = quantize(params, "int4", group_size=64)
    assert sorted(k for k, v in q2.items() if isinstance(v, QuantizedWeight)) == sorted(names)
    with torch.no_grad():
        y2 = apply(q2, x).logits
    assert _rel(y2, ref) < 0.1


def test_matmul_forms_and_fallback():
    w = torch.randn(48, 64)
    x = torch.randn(5, 64)
    qw = quantize({"lin.weight": w}, "int8", group_size=64)["lin.weight"]
    ref = F.linear(x, qw.dequantize())
    torch.testing.assert_close(x @ qw.t(), ref)
    torch.testing.assert_close(torch.matmul(x, qw.T), ref)
    torch.testing.assert_close(torch.addmm(torch.zeros(48), x, qw.t()), ref)
    assert isinstance(qw.t(), QuantizedWeight) and qw.t().shape == (64, 48)
    torch.testing.assert_close(qw + 1, qw.dequantize() + 1)  # any other op: dequantized
    moved = qw.to("cpu")  # a move keeps the packing; a dtype change dequantizes
    assert isinstance(moved, QuantizedWeight) and isinstance(qw.cpu(), QuantizedWeight)
    torch.testing.assert_close(moved.dequantize(), qw.dequantize())
    half = qw.to(torch.float16)
    assert not isinstance(half, QuantizedWeight) and half.dtype == torch.float16
    torch.testing.assert_close(qw.sum(), qw.dequantize().sum())
    assert qw.shape == (48, 64) and qw.dtype == torch.float32 and qw.dim() == 2
    # activations stay differentiable (the weight is a constant)
    xg = x.clone().requires_grad_()
    F.linear(xg, qw).sum().backward()
    torch.testing.assert_close(xg.grad, qw.dequantize().sum(0).expand(5, 64))


LORC_FORMATS = [f for f in ALL if getattr(f, "values", (f,))[0] in ("int4", "e2m1")]


@pytest.mark.parametrize("fmt", LORC_FORMATS)
def test_lorc_reduces_output_error(tiny, fmt):
    params, apply, x, ref = tiny
    errs = []
    for rank in (0, 4, 16):
        q = quantize(params, fmt, group_size=32, lorc_rank=rank, pad=True)
        with torch.no_grad():
            errs.append(_rel(apply(q, x), ref))
    assert errs[0] > errs[1] > errs[2]
    assert f"{fmt}+lorc16" in quantize_report(q)


@pytest.mark.parametrize("fmt", ["int4", "w8a8", "fp8"])
def test_bf16_model(fmt):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()).to(torch.bfloat16)
    params, apply = fs.functional(model)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    q = quantize(params, fmt, group_size=32)
    assert q["blocks.0.mlp.fc.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        y, ref = apply(q, x), apply(params, x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), ref.float()) < TOL[fmt] + 0.02  # + bf16's own rounding


@pytest.mark.parametrize("fmt", ["int4", "e3m2" if HAS_FPX else "fp8"])
def test_save_load_and_deepcopy(tiny, tmp_path, fmt):
    import copy

    params, apply, x, _ = tiny
    q = quantize(params, fmt, group_size=32, symmetric=False, lorc_rank=2, pad=True)
    torch.save(q, tmp_path / "q.pt")
    loaded = torch.load(tmp_path / "q.pt", weights_only=False)
    for other in (loaded, copy.deepcopy(q)):
        w = other["blocks.0.mlp.fc.weight"]
        assert (
            isinstance(w, QuantizedWeight)
            and w.packed_nbytes == q["blocks.0.mlp.fc.weight"].packed_nbytes
        )
        with torch.no_grad():
            torch.testing.assert_close(apply(other, x), apply(q, x))


def test_select_and_tied_head():
    params = {
        "emb.weight": torch.randn(10, 8),
        "out.weight": None,  # non-tensors pass through
        "blocks.0.fc.weight": torch.randn(16, 32),
        "blocks.0.fc.bias": torch.randn(16),
        "lm_head.weight": torch.randn(10, 32),
        "decoder.weight": torch.randn(10, 32),
    }
    params["proj.weight"] = params["emb.weight"][:, :8]  # shares the embedding's storage
    q = quantize(params, "int8", group_size=32)
    chosen = sorted(k for k, v in q.items() if isinstance(v, QuantizedWeight))
    assert chosen == ["blocks.0.fc.weight", "decoder.weight"]
    q = quantize(params, "int8", group_size=32, select=lambda n, t: n == "lm_head.weight")
    assert [k for k, v in q.items() if isinstance(v, QuantizedWeight)] == ["lm_head.weight"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quantize(params, "int8", select=lambda n, t: False)
    assert "no param was selected" in str(w[0].message)


def test_report(tiny):
    params, *_ = tiny
    q = quantize(params, "w8a8")
    text = quantize_report(q)
    assert "blocks.0.mlp.fc.weight" in text and "w8a8_linear_reference" in text
    # 4 matrices per block: int8 codes + an fp32 scale per row
    n = sum(v.numel() for v in q.values() if isinstance(v, QuantizedWeight))
    rows = sum(v.shape[0] for v in q.values() if isinstance(v, QuantizedWeight))
    assert (
        sum(v.packed_nbytes for v in q.values() if isinstance(v, QuantizedWeight)) == n + 4 * rows
    )
    assert "all params:" in text


def test_report_names_the_launches_tuned_for_each_layer(tiny, monkeypatch):
    """On a GPU the first call per M bucket picks a launch (Gluon, Triton or dequantize +
    cuBLAS); the report shows those chosen so far for each layer's packed shape."""
    from fscale.kernels import fpx_triton

    params, *_ = tiny
    q = quantize(params, "e3m2", pad=True)
    name, w = next((n, v) for n, v in q.items() if isinstance(v, QuantizedWeight))
    key = (w.packed.fmt, *w.packed.shape)
    monkeypatch.setattr(
        fpx_triton, "_TUNED",
        {(*key, 1, "cuda:0"): {"gluon": True, "split": 4, "warps": 4},
         (*key, 512, "cuda:0"): {"dequant": True, "pieces": 2},
         ("e2m1", *w.packed.shape, 1, "cuda:0"): {"bm": 16, "bn": 64, "num_warps": 2}},
    )  # fmt: skip
    line = next(row for row in quantize_report(q).splitlines() if row.startswith(name))
    assert line.endswith("[M<=1: gluon split4 w4; M<=512: dequantize+cuBLAS/2]")


def test_explain_reports_quantized_layers(tiny):
    params, apply, x, _ = tiny
    q = quantize(params, "int8", group_size=32)
    alone = fs.explain(q)  # params only: the per-layer report
    assert "blocks.0.mlp.fc.weight" in alone and "int_linear" in alone
    step = fs.train_step(lambda p, b: apply(p, b).float().mean(), fs.optim.sgd(0.1))
    text = fs.explain(step, q)  # with a step: the plan, then the same report
    assert text.startswith("fscale step") and alone in text
    assert "quantized" not in fs.explain(step, params).split("memory per rank")[1]


def test_errors(tiny):
    params, *_ = tiny
    with pytest.raises(ValueError, match=r"unknown format 'int3'.*'e3m2'.*'int4'.*'fp8'"):
        quantize(params, "int3")
    bad = dict(params)
    bad["blocks.1.mlp.fc.weight"] = params["blocks.1.mlp.fc.weight"].clone()
    bad["blocks.1.mlp.fc.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="'blocks.1.mlp.fc.weight'.*NaN"):
        quantize(bad, "int8", group_size=32)
    # int4 g128 on K=32: the kernel's own message, naming the param
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight'.*K=32.*group_size=128"):
        quantize(params, "int4", group_size=128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(params, "int4", group_size=100)
    with pytest.raises(ValueError, match="lorc_rank"):
        quantize(params, "int8", lorc_rank=-1)
    with pytest.raises(ValueError, match="only 2-D"):
        quantize(params, "int8", select=lambda n, t: n.endswith("bias"))
    with pytest.raises(TypeError, match="params dict"):
        quantize([1], "int8")


@pytest.mark.skipif(not HAS_FPX, reason="fscale.kernels.fpx not available")
def test_fpx_shape_error_names_param(tiny):
    params, *_ = tiny
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight'.*K=32.*pad=True"):
        quantize(params, "fp6")


def test_quantize_gpt_example_smoke(tmp_path):
    pytest.importorskip("tqdm")  # train_gpt's progress bar
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quantize_gpt.py"
    spec = importlib.util.spec_from_file_location("quantize_gpt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    fmts = "int4 g128,w8a8" + (",fp6 e3m2" if HAS_FPX else "")
    out = tmp_path / "q.json"
    argv = ["--preset", "tiny", "--steps", "2", "--seq-len", "32", "--eval-batches", "1"]
    argv += ["--formats", fmts, "--save", str(tmp_path / "p.pt"), "--out", str(out)]
    rows = example.main(argv)
    assert [r["label"] for r in rows[:2]] == ["fp32", "fp16"]
    assert len(rows) == 2 + len(fmts.split(","))
    assert all(r["ppl"] > 1 and abs(r["ppl_rel_fp16"]) < 0.05 for r in rows)
    assert out.is_file()
    # and from the checkpoint it wrote
    again = example.main([*argv[:-2], "--out", str(out), "--checkpoint", str(tmp_path / "p.pt")])
    assert again[2]["ppl"] == pytest.approx(rows[2]["ppl"])


@pytest.mark.skipif(not HAS_FPX, reason="fscale.kernels.fpx not available")
def test_a8_formats_pad_output_channels_to_the_fp8_gemms_multiple():
    """``pad=True`` pads N to 16 for the W6A8 formats (the FP8 GEMM's multiple), so no
    layer falls back to fpx_a8's fp32 reference; the padded rows are sliced off."""
    w = torch.randn(100, 300)
    q = quantize({"lin.weight": w}, "fp6-a8", pad=True)["lin.weight"]
    assert q.fmt == "e3m2-a8" and q.packed.shape == (112, 384)
    x = torch.randn(3, 300)
    ref = x @ quantize({"lin.weight": w}, "e3m2", pad=True)["lin.weight"].dequantize().t()
    assert torch.allclose(F.linear(x, q), ref, atol=1e-5)  # 3 rows: weight-only


@pytest.mark.skipif(not HAS_FPX, reason="fscale.kernels.fpx not available")
def test_report_names_both_ops_of_an_a8_format():
    q = quantize({"lin.weight": torch.randn(64, 128)}, "e3m2-a8")
    assert "fpx_a8_linear_reference from 256 rows, fpx_linear_reference below" in quantize_report(q)


def test_row_absmax_scales_fpx_rows_and_is_refused_elsewhere():
    """``row_absmax`` replaces each row's absmax (FPx formats only; see
    fscale/serve/engine.py, [Note: quantized shards])."""
    torch.manual_seed(0)
    params = {"lin.weight": torch.randn(16, 256)}
    seen = []

    def doubled(name, absmax):
        seen.append((name, absmax.shape))
        return absmax * 2

    q = quantize(params, "e3m2", row_absmax=doubled)["lin.weight"]
    assert seen == [("lin.weight", torch.Size([16]))]
    plain = quantize(params, "e3m2")["lin.weight"]
    assert torch.allclose(q.packed.scales, 2 * plain.packed.scales)
    with pytest.raises(ValueError, match="row_absmax applies to formats with one scale"):
        quantize(params, "int4", row_absmax=doubled)
