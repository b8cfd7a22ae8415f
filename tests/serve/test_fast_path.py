"""The decode fast path on CPU: fused decoder kernels (references, and the Triton
kernels under TRITON_INTERPRET=1) and the CUDA-graph input path (static buffers,
pinned staging, persistent block tables, in-graph argmax) replayed through emulated
graphs, against the plain eager engine."""

from __future__ import annotations

import warnings

import pytest
import torch

from fscale.kernels import fused_decoder as fd
from fscale.kernels import gemv
from fscale.serve import Engine, SamplingParams
from fscale.serve.sampling import sample

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [100, 101, 102],
    [7],
    list(range(30, 75)),
    [200, 201, 202, 203, 204, 205],
]
TRITON = {
    fd.ADD_RMS_NORM: fd.add_rms_norm_triton,
    fd.ROPE_KV_WRITE: fd.rope_kv_write_triton,
    fd.SILU_MUL: fd.silu_mul_triton,
    gemv.OP: gemv.gemv_triton,
}


def _emulated(engine: Engine, max_num_seqs: int) -> list[int]:
    """Give ``engine`` emulated decode graphs; returns a list counting their replays."""
    runner = engine.runner
    runner._capture(max_num_seqs, emulate=True)
    calls = []
    replay = runner._replay

    def counted(batch):
        calls.append(len(batch.seqs))
        return replay(batch)

    runner._replay = counted
    return calls


def _run_staggered(engine: Engine) -> list[list[int]]:
    """Requests arriving mid-generation (rows of the graphs change owners)."""
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), p, GREEDY)
    done, step = {}, 0
    while engine.has_unfinished():
        if step == 3:
            engine.add_request("3", PROMPTS[3], GREEDY)
        if step == 6:
            engine.add_request("4", PROMPTS[4], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        step += 1
    return [done[str(i)] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def eager_tokens(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, max_tokens_per_step=64, block_size=4)
    return _run_staggered(engine)


@pytest.mark.parametrize("fused,overlap", [(False, False), (True, False), (True, True)])
def test_graph_inputs_path_equals_eager(tiny_llama_dir, eager_tokens, fused, overlap):
    engine = Engine(
        tiny_llama_dir,
        max_tokens_per_step=64,
        block_size=4,
        fused_kernels=fused,
        overlap=overlap,
    )
    assert (engine.decoder.fused is not None) == fused
    calls = _emulated(engine, 4)
    assert _run_staggered(engine) == eager_tokens
    assert max(calls) <= 4 and set(calls) >= {3, 4}  # batches above 4 run eagerly
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_inputs_path_with_preemption(tiny_llama_dir, overlap):
    kw = dict(max_tokens_per_step=64, block_size=4, num_blocks=13)
    ref = Engine(tiny_llama_dir, **kw).generate(PROMPTS[:3], GREEDY)
    engine = Engine(tiny_llama_dir, fused_kernels=True, overlap=overlap, **kw)
    calls = _emulated(engine, 4)
    outs = engine.generate(PROMPTS[:3], GREEDY)
    assert engine.stats()["num_preempted_total"] > 0 and calls
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_inputs_path_seeded_sampling(tiny_llama_dir, overlap):
    params = [SamplingParams(max_tokens=10, temperature=0.9, seed=s) for s in (1, 2, 3)]
    ref = Engine(tiny_llama_dir, block_size=4).generate(PROMPTS[:3], params)
    engine = Engine(tiny_llama_dir, block_size=4, fused_kernels=True, overlap=overlap)
    calls = _emulated(engine, 4)
    outs = engine.generate(PROMPTS[:3], params)
    assert calls and [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_fused_triton_decoder_equals_eager(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = Engine(tiny_llama_dir, block_size=16)
    dec = engine.decoder
    ids = torch.tensor(PROMPTS[3])
    eager = dec.forward_dense(ids)
    assert dec.enable_fused(TRITON)
    torch.testing.assert_close(dec.forward_dense(ids), eager, atol=1e-4, rtol=1e-4)
    # The whole engine on the Triton kernels (and the Triton paged attention isn't used on
    # CPU: the reference runs): same greedy tokens as the eager engine. One request
    # decodes one row at a time: every linear of those steps is the Triton GEMV.
    rows = []
    dec.linear = lambda x, w, b=None: rows.append(x.shape[0]) or gemv.gemv_triton(x, w, b)
    ref = Engine(tiny_llama_dir, block_size=16)
    short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for prompts, params in ((PROMPTS[:2], GREEDY), (PROMPTS[1], short)):
        want = [o.token_ids for o in ref.generate(prompts, params)]
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
    # The lone request's 4 decode steps: qkv, o, gate_up, down of 2 layers + head.
    assert rows.count(1) >= 4 * 9


def test_fused_off_for_gpt2_with_warning(tiny_gpt2_dir):
    with pytest.warns(UserWarning, match="RMSNorm/RoPE/SwiGLU"):
        engine = Engine(tiny_gpt2_dir, fused_kernels=True)
    assert engine.decoder.fused is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(tiny_gpt2_dir)  # default: no warning


def test_failing_self_check_falls_back(tiny_llama_dir):
    def broken(gate_up):
        raise RuntimeError("no kernel")

    engine = Engine(tiny_llama_dir)
    with pytest.warns(UserWarning, match="eager path"):
        refs = fd.resolve_all("cpu", torch.float32)
        assert not engine.decoder.enable_fused({**refs, fd.SILU_MUL: broken})
    assert engine.decoder.fused is None


def test_sample_uses_given_greedy():
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.1]])
    greedy = torch.tensor([2, 2])  # deliberately not the argmax: shows it is used
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [None, None], greedy=greedy) == [
        2,
        2,
    ]


def _emulated_mixed(engine: Engine, budget: int) -> list[int]:
    """Give ``engine`` emulated piecewise graphs for mixed steps; returns the token counts
    of the steps they ran."""
    from fscale.serve.runner import mixed_buckets

    runner = engine.runner
    runner._capture_mixed(mixed_buckets(budget, step=32), emulate=True)
    calls = []
    replay = runner._replay_mixed

    def counted(batch):
        calls.append(batch.total_tokens)
        return replay(batch)

    runner._replay_mixed = counted
    return calls


@pytest.mark.parametrize("decode_graphs,overlap", [(False, False), (True, False), (True, True)])
def test_piecewise_mixed_step_graphs_equal_eager(
    tiny_llama_dir, eager_tokens, decode_graphs, overlap
):
    """[Note: piecewise graphs of mixed steps]: prefill and mixed steps padded to their
    token bucket, run piece by piece through the static buffers with attention between,
    give the eager engine's tokens (arrivals mid-run; with and without decode graphs)."""
    from fscale.serve.runner import mixed_buckets

    assert mixed_buckets(64, step=32) == [16, 32, 64]
    assert mixed_buckets(512) == [16, 32, 64, 128, 256, 384, 512]
    assert mixed_buckets(300) == [16, 32, 64, 128, 256, 300]
    engine = Engine(
        tiny_llama_dir, max_tokens_per_step=64, block_size=4, fused_kernels=True, overlap=overlap
    )
    decode = _emulated(engine, 4) if decode_graphs else None
    calls = _emulated_mixed(engine, 64)
    assert _run_staggered(engine) == eager_tokens
    assert calls and max(calls) > 16 and min(calls) < 16  # several buckets, padded
    if decode_graphs:
        assert decode  # pure decode steps still took the decode graphs
    assert engine.blocks.num_used == 0


def test_prefill_graphs_need_the_fused_path(tiny_llama_dir):
    """Off the fused path the option changes nothing but says so (CUDA only)."""
    engine = Engine(tiny_llama_dir, max_tokens_per_step=64, prefill_graphs=True)
    assert engine.runner.mixed_sizes == []  # CPU: no graphs at all


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [None, "e3m2-a8"])
def test_prefill_graphs_on_cuda_equal_eager_steps(tiny_llama_dir, quantize, monkeypatch):
    """The real capture: an engine whose prefill and mixed steps replay piecewise CUDA
    graphs gives the tokens of the same engine running them eagerly (bf16; and W6A8
    with FP8 activations in every product, so both take one path per row)."""
    if quantize:
        from fscale.kernels import fpx_a8

        if not fpx_a8.available(torch.device("cuda")):
            pytest.skip("needs FP8 tensor cores")
        monkeypatch.setattr(fpx_a8, "MIN_TOKENS", 1)
    kw = dict(max_tokens_per_step=64, block_size=16, dtype=torch.float32, quantize=quantize)
    eager = Engine(tiny_llama_dir, **kw)
    assert eager.decoder.fused is not None
    ref = _run_staggered(eager)
    engine = Engine(tiny_llama_dir, prefill_graphs=True, **kw)
    assert engine.runner.mixed_sizes == [16, 32, 64]
    calls = []
    replay = engine.runner._replay_mixed
    engine.runner._replay_mixed = lambda batch: calls.append(batch.total_tokens) or replay(batch)
    assert _run_staggered(engine) == ref
    assert calls and engine.blocks.num_used == 0


ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_HOPPER, reason="needs Hopper")],
        ),
    ],
)
def test_fp6_decode_ends_gate_up_in_silu_times_up(tmp_path, monkeypatch, device):
    """[Note: the SwiGLU epilogue] in the engine: FP6 weights of whole tiles (I = 128),
    decode steps (graphs included on the GPU) take the fused SiLU * up (the Triton
    kernel under the interpreter on CPU, the Gluon one on Hopper), and the greedy
    tokens equal the same engine's with the hook turned off: all of them on CPU (fp32);
    in fp16 on the GPU the epilogue rounds silu(g) * u once where the hook-off path
    rounds g and u first, so a near-tie may go the other way and every later token
    with it (after 10 tokens on an H200): there each token the epilogue chose is the
    hook-off engine's greedy token from the same prefix."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fscale.serve.models.decoder import Decoder

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0.0, 0.1)  # well-separated greedy argmaxes
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[5, 9, 33, 7], [100, 3, 250, 17, 18, 19], [42] * 10]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(quantize="e3m2", max_tokens_per_step=64, block_size=16, device=device)
    kw["fused_kernels"] = True  # the fused layer (the default on CUDA) calls the hook
    fused = []
    real = Decoder._fpx_swiglu

    def spy(h, w, b):
        out = real(h, w, b)
        fused.append(out is not None)
        return out

    monkeypatch.setenv("FSCALE_FPX_SWIGLU", "1")  # opt-in until validated (decoder.py)
    monkeypatch.setattr(Decoder, "_fpx_swiglu", staticmethod(spy))
    with_epilogue = [o.token_ids for o in Engine(tmp_path, **kw).generate(prompts, params)]
    assert any(fused)
    monkeypatch.setattr(Decoder, "_fpx_swiglu", staticmethod(lambda h, w, b: None))
    plain = Engine(tmp_path, **kw)
    if device == "cpu":
        assert with_epilogue == [o.token_ids for o in plain.generate(prompts, params)]
        return
    prefixes = [
        p + out[:k] for p, out in zip(prompts, with_epilogue, strict=True) for k in range(len(out))
    ]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    chosen = [t for out in with_epilogue for t in out]
    assert [o.token_ids[0] for o in plain.generate(prefixes, one)] == chosen
