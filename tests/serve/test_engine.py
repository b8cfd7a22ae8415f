"""The engine's greedy output against HF ``generate`` and a full-recompute reference, on
tiny Llama / GPT-2 directories and fscale's GPT, across budgets, block sizes, arrivals,
prefix-cache hits, preemption, quantized and streamed weights; plus sampling, stopping,
streaming, abort and the errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fscale.models import GPT, GPTConfig
from fscale.serve import Engine, EngineFull, RequestOutput, SamplingParams
from fscale.serve.sequence import Sequence
from tests.helpers import CPU_AND_CUDA

GREEDY = dict(temperature=0.0)
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [100, 101, 102],
    [7],
    list(range(30, 75)),
]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _recompute(logits_fn, prompt, n, eos=None):
    """Plain greedy: run the model on the whole sequence each step, take the argmax."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        tok = int(logits_fn(torch.tensor([ids]))[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out


@torch.no_grad()
def _hf_generate(model, prompt, n):
    ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def llama_ref(tiny_llama_dir):
    model = _hf(tiny_llama_dir)
    return {i: _hf_generate(model, p, 12) for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def gpt2_ref(tiny_gpt2_dir):
    model = _hf(tiny_gpt2_dir)
    return {i: _hf_generate(model, p, 12) for i, p in enumerate(PROMPTS)}


def test_hf_generate_equals_full_recompute(tiny_llama_dir, llama_ref):
    model = _hf(tiny_llama_dir)
    for i, p in enumerate(PROMPTS[:2]):
        assert _recompute(lambda x: model(x).logits, p, 12, eos=1) == llama_ref[i]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("budget,block_size", [(8, 4), (16, 16), (64, 8)])
def test_llama_greedy_equals_hf(tiny_llama_dir, llama_ref, budget, block_size, overlap):
    engine = Engine(
        tiny_llama_dir,
        max_tokens_per_step=budget,
        block_size=block_size,
        num_blocks=64,
        overlap=overlap,
    )
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, **GREEDY))
    for i, out in enumerate(outs):
        assert out.token_ids == llama_ref[i], i
        assert out.finished and out.finish_reason in ("stop", "length")
    assert engine.blocks.num_used == 0


def test_warm_up_runs_every_token_bucket_and_changes_no_output(tiny_llama_dir, llama_ref):
    """[Note: warm-up at start]: one forward per power-of-two token count up to the
    budget (the engine does it on CUDA at start); what it writes into block 0 (which no
    sequence is given) changes no request's tokens."""
    engine = Engine(tiny_llama_dir, max_tokens_per_step=24, block_size=4, num_blocks=64)
    assert engine.runner.warm_up(24) == [1, 2, 4, 8, 16, 24]
    assert engine.runner.warm_up(16) == [1, 2, 4, 8, 16]
    engine.runner.max_model_len = 10  # counts above it run as several prompts
    assert engine.runner.warm_up(24) == [1, 2, 4, 8, 16, 24]
    engine.runner.max_model_len = engine.max_model_len
    assert engine.blocks.num_used == 0
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, **GREEDY))
    assert [o.token_ids for o in outs] == [llama_ref[i] for i in range(len(PROMPTS))]


def _tiny_family_dir(path, family: str):
    """A tiny HF Mistral (sliding window 24, shorter than its 256 positions) or Qwen2
    (q/k/v biases, drawn nonzero) directory."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=24))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms too: nonzero, exercised
            p.normal_(0.0, 0.1)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_greedy_equal_hf(tmp_path, family):
    """Both are Llama to the decoder: Qwen2's q/k/v biases come with the checkpoint, and
    Mistral's sliding window (24) becomes the served context, where it is exact."""
    path, model = _tiny_family_dir(tmp_path / family, family)
    engine = Engine(path, max_tokens_per_step=16, block_size=4, num_blocks=64)
    if family == "mistral":
        assert engine.max_model_len == 24
    prompts = [p[:10] for p in PROMPTS]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_generate(model, p, 8)[: len(out.token_ids)]
        assert len(out.token_ids) == 8 or out.finish_reason == "stop"
    if family == "qwen2":
        assert "qkv.bias" in engine.runner.decoder.layers[0]  # the biases are served
        with pytest.raises(ValueError, match="max_model_len"):  # past the window: refused
            Engine(_tiny_family_dir(tmp_path / "m", "mistral")[0], max_model_len=32)


@pytest.mark.parametrize("scheduler", ["splitfuse", "prefill_first"])
def test_gpt2_greedy_equals_hf(tiny_gpt2_dir, gpt2_ref, scheduler):
    engine = Engine(
        tiny_gpt2_dir, max_tokens_per_step=16, block_size=4, num_blocks=64, scheduler=scheduler
    )
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, **GREEDY))
    assert [o.token_ids for o in outs] == [gpt2_ref[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_arriving_mid_generation(tiny_llama_dir, llama_ref, overlap):
    engine = Engine(
        tiny_llama_dir, max_tokens_per_step=8, block_size=4, num_blocks=64, overlap=overlap
    )
    params = SamplingParams(max_tokens=12, **GREEDY)
    arrivals = {0: [0], 2: [1, 3], 5: [2]}
    done, step = {}, 0
    while len(done) < len(PROMPTS):
        for i in arrivals.get(step, []):
            engine.add_request(f"r{i}", PROMPTS[i], params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        step += 1
    assert done == {f"r{i}": llama_ref[i] for i in range(len(PROMPTS))}


@pytest.mark.parametrize("overlap", [False, True])
def test_prefix_cache_hit_same_output(tiny_llama_dir, overlap):
    model = _hf(tiny_llama_dir)
    shared = list(range(40, 80))
    a, b = shared + [3, 4], shared + [9, 9, 9]
    engine = Engine(
        tiny_llama_dir, max_tokens_per_step=32, block_size=8, num_blocks=64, overlap=overlap
    )
    params = SamplingParams(max_tokens=8, **GREEDY)
    first = engine.generate(a, params)[0]
    second = engine.generate(b, params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # five full blocks of the shared prefix
    assert first.token_ids == _hf_generate(model, a, 8)
    assert second.token_ids == _hf_generate(model, b, 8)
    # The same prompt again: every full block but the one holding its last token.
    again = engine.generate(a, params)[0]
    assert again.num_cached_tokens == 40 and again.token_ids == first.token_ids


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_keeps_outputs(tiny_llama_dir, llama_ref, overlap):
    # 12 blocks of 4 tokens cannot hold three growing sequences (8 + 4 + 4): preemption.
    engine = Engine(
        tiny_llama_dir, max_tokens_per_step=64, block_size=4, num_blocks=13, overlap=overlap
    )
    prompts = PROMPTS[:3]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    assert engine.stats()["num_preempted_total"] > 0
    assert [o.token_ids for o in outs] == [llama_ref[i] for i in range(3)]
    assert engine.blocks.num_used == 0


def test_overlapped_steps_lag_one_step_and_never_run_past_a_limit(tiny_llama_dir):
    """[Note: overlapped steps]: step() returns the previous forward's tokens; a request
    ending by length is never fed past its last token (nor past max_model_len); one
    ending by a stop token runs one dropped token; outputs equal the engine without
    overlap and every block comes back."""
    kw = dict(max_tokens_per_step=16, block_size=4, num_blocks=64, max_model_len=24)
    sync, engine = Engine(tiny_llama_dir, **kw), Engine(tiny_llama_dir, overlap=True, **kw)
    assert Engine(tiny_llama_dir, **kw).overlap is False  # CPU default: synchronous
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, **GREEDY))
    assert engine.step() == []  # the prefill is queued; its token comes next step
    first = engine.step()
    assert [len(o.token_ids) for o in first] == [1]
    while engine.has_unfinished():
        engine.step()

    fed: dict[str, int] = {}
    run = engine.runner.run

    def counting(batch, last_tokens=None):
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            assert seq.num_computed + n <= engine.max_model_len
            fed[seq.request_id] = fed.get(seq.request_id, 0) + n
        return run(batch, last_tokens)

    engine.runner.run = counting
    base = dict(ignore_eos=True, **GREEDY)
    full = sync.generate(PROMPTS[0], SamplingParams(max_tokens=5, **base))[0].token_ids
    params = [
        SamplingParams(max_tokens=5, **base),  # ends by length
        SamplingParams(max_tokens=24 - len(PROMPTS[1]), **base),  # to max_model_len
        SamplingParams(max_tokens=5, stop_token_ids=[full[1]], **base),  # ends on a stop token
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    rids = [f"x{i}" for i in range(3)]
    for rid, p, sp in zip(rids, prompts, params, strict=True):
        engine.add_request(rid, p, sp)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    want = [sync.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [done[r].token_ids for r in rids] == [w.token_ids for w in want]
    assert [done[r].finish_reason for r in rids] == ["length", "length", "stop"]
    assert len(done["x1"].token_ids) + len(PROMPTS[1]) == 24
    # Fed: prompt + outputs but the last, except the stop: one more, dropped.
    assert fed["x0"] == len(PROMPTS[0]) + 5 - 1 and fed["x1"] == 24 - 1
    assert fed["x2"] == len(PROMPTS[0]) + len(done["x2"].token_ids)
    assert engine.blocks.num_used == 0 and engine._inflight is None


@pytest.mark.parametrize("overlap", [False, True])
def test_a_step_whose_forward_raises_loses_nothing(tiny_llama_dir, llama_ref, overlap):
    """A forward that raises (here: injected, every third call) leaves the engine as it
    was: the step's sequences run again next step, tokens already sampled on the device
    are still read, and the outputs equal an undisturbed run."""
    engine = Engine(
        tiny_llama_dir, max_tokens_per_step=8, block_size=4, num_blocks=64, overlap=overlap
    )
    run, calls = engine.runner.run, [0]

    def flaky(batch, last_tokens=None):
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise RuntimeError("injected")
        return run(batch, last_tokens)

    engine.runner.run = flaky
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, **GREEDY))
    done, failures = {}, 0
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except RuntimeError:
            failures += 1
            continue
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    assert failures > 3
    assert done == {str(i): llama_ref[i] for i in range(len(PROMPTS))}
    assert engine.blocks.num_used == 0


def test_fscale_gpt_module_equals_recompute():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(seq_len=96)).eval()
    engine = Engine(model, max_tokens_per_step=16, block_size=4, num_blocks=64)
    assert engine.model_name == "GPT" and engine.max_model_len == 96
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=10, **GREEDY))
    for p, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == _recompute(model, p, 10)


def test_offload_weights_equal(tiny_llama_dir, llama_ref):
    engine = Engine(tiny_llama_dir, offload_weights=True, max_tokens_per_step=16, num_blocks=64)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, **GREEDY))
    assert [o.token_ids for o in outs] == [llama_ref[i] for i in range(len(PROMPTS))]


def test_offloaded_layers_load_to_the_host_and_the_rest_to_the_device(tiny_llama_dir):
    """``layers_device``: layer params where they are streamed from, embedding, norm and
    head on the engine's device ("meta" stands in for a GPU here)."""
    from fscale.serve.models.loader import load_model

    lm = load_model(str(tiny_llama_dir), device="meta", layers_device="cpu")
    for k, v in lm.params.items():
        assert v.device.type == ("cpu" if k.startswith("layers.") else "meta"), k


def test_offloaded_layers_are_held_once(tiny_llama_dir, llama_ref, monkeypatch):
    """The layer stream's host copies (pinned on CUDA: a copy, as the clone here) are the
    only host copies the decoder keeps: its params and layers refer to them."""
    from fscale.serve.models.offload import LayerStream

    monkeypatch.setattr(LayerStream, "_to_host", lambda self, t: t.clone())
    engine = Engine(tiny_llama_dir, offload_weights=True, max_tokens_per_step=16, num_blocks=64)
    dec = engine.decoder
    assert dec.layers is dec.stream.host
    for i, layer in enumerate(dec.stream.host):
        for k, v in layer.items():
            assert dec.params[f"layers.{i}.{k}"] is v, (i, k)
    outs = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6, **GREEDY))
    assert [o.token_ids for o in outs] == [llama_ref[i][:6] for i in range(2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_weights_on_cuda_equal_resident_weights(tiny_llama_dir):
    kw = dict(device="cuda", max_tokens_per_step=16, num_blocks=64)
    outs = [
        Engine(tiny_llama_dir, offload_weights=off, **kw).generate(
            PROMPTS, SamplingParams(max_tokens=12, **GREEDY)
        )
        for off in (False, True)
    ]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def _dequantized_hf(path, engine):
    """HF Llama whose layer linears are the engine's dequantized weights."""
    from fscale.transforms.quantize import QuantizedWeight

    model = _hf(path)
    cfg = engine.model_config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    P = engine.decoder.params

    def w(name):
        t = P[name]
        assert isinstance(t, QuantizedWeight), name
        return t.dequantize()

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            wq, wk, wv = w(f"layers.{i}.qkv.weight").split([q, kv, kv])
            layer.self_attn.q_proj.weight.copy_(wq)
            layer.self_attn.k_proj.weight.copy_(wk)
            layer.self_attn.v_proj.weight.copy_(wv)
            layer.self_attn.o_proj.weight.copy_(w(f"layers.{i}.o.weight"))
            gate, up = w(f"layers.{i}.gate_up.weight").chunk(2)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(w(f"layers.{i}.down.weight"))
    return model


def _weight_formats() -> list[str]:
    """Every weight-only ``fs.quantize`` format (those that quantize activations too
    have tests of their own)."""
    from fscale.transforms.quantize import FORMATS

    return [f for f in FORMATS if not f.endswith("-a8") and f not in _ACTIVATION_FORMATS]


_ACTIVATION_FORMATS = ("w8a8", "fp8")  # activations quantized per token too


@pytest.mark.parametrize("fmt", ["e3m2", "int8"])
def test_quantized_head_equals_dequantized_reference(tiny_llama_dir, fmt):
    """``quantize_head=True`` packs the head with the layers; the embedding stays plain,
    and the tokens equal HF Llama with every linear and the head dequantized."""
    from fscale.transforms.quantize import QuantizedWeight

    engine = Engine(
        tiny_llama_dir, quantize=fmt, quantize_head=True, max_tokens_per_step=16, num_blocks=64
    )
    P = engine.decoder.params
    assert isinstance(P["head.weight"], QuantizedWeight) and engine.decoder.head is P["head.weight"]
    assert type(P["embed.weight"]) is torch.Tensor
    ref = _dequantized_hf(tiny_llama_dir, engine)
    with torch.no_grad():
        ref.lm_head.weight.copy_(P["head.weight"].dequantize())
    outs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=10, **GREEDY))
    for p, out in zip(PROMPTS[:3], outs, strict=True):
        assert out.token_ids == _recompute(lambda x: ref(x).logits, p, 10, eos=1)
    with pytest.raises(ValueError, match="quantize_head=True needs a quantize= format"):
        Engine(tiny_llama_dir, quantize_head=True)


@pytest.mark.parametrize("fmt", _ACTIVATION_FORMATS)
def test_activation_quantized_engine_equals_recompute(tiny_llama_dir, fmt):
    """``w8a8`` and ``fp8`` quantize each token's activations on their own: the paged
    engine (chunked prefill, batched decode) equals a full recompute on its weights."""
    engine = Engine(tiny_llama_dir, quantize=fmt, max_tokens_per_step=16, num_blocks=64)
    outs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=10, **GREEDY))
    dec = engine.decoder
    for p, out in zip(PROMPTS[:3], outs, strict=True):
        assert out.token_ids == _recompute(lambda x: dec.forward_dense(x[0])[None], p, 10, 1)


@pytest.mark.parametrize("fmt", _weight_formats())
def test_quantized_engine_equals_dequantized_reference(tiny_llama_dir, fmt):
    engine = Engine(tiny_llama_dir, quantize=fmt, max_tokens_per_step=16, num_blocks=64)
    assert "head.weight" not in {
        k for k, v in engine.decoder.params.items() if type(v) is not torch.Tensor
    }
    ref = _dequantized_hf(tiny_llama_dir, engine)
    outs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=10, **GREEDY))
    for p, out in zip(PROMPTS[:3], outs, strict=True):
        assert out.token_ids == _recompute(lambda x: ref(x).logits, p, 10, eos=1)


@pytest.mark.parametrize("fmt", ["e3m2-a8", "e2m2-a8", "e3m1-a8"])
def test_w6a8_engine_equals_recompute(tiny_llama_dir, monkeypatch, fmt):
    """``e3m2-a8`` and the fp5 ``-a8`` formats: with FP8 activations in every product
    (MIN_TOKENS = 1) each token's rows are quantized on their own, so chunked prefill,
    batched decode and a plain full recompute on the same weights agree token for token."""
    from fscale.hw import dispatch
    from fscale.kernels import fpx_a8

    calls = []
    monkeypatch.setattr(fpx_a8, "MIN_TOKENS", 1)
    saved = list(dispatch._TABLE[fpx_a8.OP])

    def spy(*args):
        calls.append(args[0].shape[0])
        return fpx_a8.fpx_a8_linear_reference(*args)

    dispatch.register(fpx_a8.OP, spy, device="cpu", priority=1000, name="spy")
    try:
        engine = Engine(tiny_llama_dir, quantize=fmt, max_tokens_per_step=16, num_blocks=64)
        outs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=10, **GREEDY))
        assert min(calls) <= 3 and max(calls) >= 10  # decodes and prefill chunks went W6A8
        dec = engine.decoder
        for p, out in zip(PROMPTS[:3], outs, strict=True):
            assert out.token_ids == _recompute(lambda x: dec.forward_dense(x[0])[None], p, 10, 1)
    finally:
        dispatch._TABLE[fpx_a8.OP] = saved


# -- sampling -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def gpt_engine(request):
    torch.manual_seed(0)
    return Engine(
        GPT(GPTConfig.tiny(seq_len=128)).eval(),
        max_tokens_per_step=32,
        block_size=4,
        num_blocks=128,
        overlap=request.param,
    )


def test_seeded_sampling_reproducible_and_batch_independent(gpt_engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = gpt_engine.generate([1, 2, 3], p)[0].token_ids
    others = SamplingParams(max_tokens=8, temperature=0.7)
    batch = gpt_engine.generate([[9, 9], [1, 2, 3], list(range(40))], [others, p, others])
    assert batch[1].token_ids == alone
    assert gpt_engine.generate([1, 2, 3], p)[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, seed=8)
    assert gpt_engine.generate([1, 2, 3], other_seed)[0].token_ids != alone


def test_top_k_one_is_greedy(gpt_engine):
    greedy = gpt_engine.generate([4, 5, 6], SamplingParams(max_tokens=10, temperature=0))[0]
    topk = gpt_engine.generate([4, 5, 6], SamplingParams(max_tokens=10, temperature=1.5, top_k=1))[
        0
    ]
    assert topk.token_ids == greedy.token_ids


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("V", [128256, 50257, 4096, 100])
def test_row_argmax_is_torch_argmax(V, device):
    """The two-pass argmax gives torch's index: the first of equal maxima (ties within
    a chunk, across chunks, at chunk edges), a NaN where the row has one, -inf rows;
    for vocabularies with and without a divisor to split by, batches of 1 to 9."""
    from fscale.serve.sampling import row_argmax

    g = torch.Generator().manual_seed(V)
    for B in (1, 3, 9):
        x = torch.randn(B, V, generator=g)
        x[0, [V // 3, V // 2, V - 1]] = 50.0  # ties across chunks: the first wins
        if B > 1:
            x[1] = float("-inf")
            x[1, [7, 8]] = 1.0  # a tie inside one chunk
            x[2, V // 4] = float("nan")
            x[2, V - 2] = float("nan")
        x = x.to(device)
        want = x.argmax(dim=-1)
        assert want[0] == V // 3
        assert torch.equal(row_argmax(x), want), (B, V)


def test_sampling_follows_the_distribution():
    from fscale.serve.sampling import sample

    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, [SamplingParams(temperature=1.0)], [None], g)[0] for _ in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.04, rtol=0)
    top_p = [sample(logits, [SamplingParams(top_p=0.6)], [None], g)[0] for _ in range(200)]
    assert set(top_p) == {0}
    top_k = [sample(logits, [SamplingParams(top_k=2)], [None], g)[0] for _ in range(300)]
    assert set(top_k) == {0, 1}


def test_unseeded_rows_draw_together_and_follow_the_distribution(monkeypatch):
    """Rows without a seed take their exponentials from the shared generator in one
    call; each row still follows its distribution, and a seeded row among them draws
    what it draws alone."""
    from fscale.serve.sampling import sample

    calls = []
    real = torch.Tensor.exponential_
    monkeypatch.setattr(
        torch.Tensor, "exponential_", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k)
    )
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.7]])
    logits = torch.log(p).repeat(4, 1)  # 8 rows, two distributions alternating
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0)] * 8
    draws = torch.tensor([sample(logits, params, [None] * 8, g) for _ in range(1000)])
    assert calls == [(8, 4)] * 1000
    for row in range(8):
        freq = torch.bincount(draws[:, row], minlength=4).float() / 1000
        torch.testing.assert_close(freq, p[row % 2], atol=0.05, rtol=0)
    seeded = SamplingParams(temperature=1.0, seed=5)
    alone = sample(logits[3:4], [seeded], [torch.Generator().manual_seed(5)], g)
    mixed = sample(logits, params[:3] + [seeded] + params[4:],
                   [None] * 3 + [torch.Generator().manual_seed(5)] + [None] * 4, g)  # fmt: skip
    assert mixed[3] == alone[0]


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_token_ids_and_strings(tiny_llama_dir, overlap):
    engine = Engine(tiny_llama_dir, num_blocks=64, overlap=overlap)
    base = dict(max_tokens=16, ignore_eos=True, **GREEDY)
    full = engine.generate("The quick brown fox", SamplingParams(**base))[0]
    assert len(full.token_ids) == 16 and full.finish_reason == "length"
    tok = full.token_ids[5]
    cut = engine.generate("The quick brown fox", SamplingParams(**base, stop_token_ids=[tok]))[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]
    assert cut.finish_reason == "stop"
    assert cut.text == engine.tokenizer.decode(cut.token_ids[:-1])
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    out = engine.generate("The quick brown fox", SamplingParams(**base, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert stop not in out.text


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_deltas_add_up(tiny_llama_dir, overlap):
    engine = Engine(tiny_llama_dir, num_blocks=64, overlap=overlap)
    params = SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)
    final = engine.generate("Hello world", params)[0]
    chunks = list(engine.stream("Hello world", params))
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert "".join(c.delta_text for c in chunks) == final.text == chunks[-1].text
    assert sum((c.new_token_ids for c in chunks), []) == final.token_ids
    # Stop strings are held back while they might still match, never sent then cut.
    stop = final.text[4:7]
    sp = SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop], **GREEDY)
    streamed = "".join(c.delta_text for c in engine.stream("Hello world", sp))
    assert streamed == final.text[: final.text.index(stop)]


def test_incremental_detokenization_never_splits_characters(gpt_engine):
    text = "aé東😀b"
    seq = Sequence("x", [1], SamplingParams(max_tokens=100), arrival=0)
    deltas = []
    for byte in text.encode():
        seq.token_ids.append(byte)
        gpt_engine._check_finished(seq)
        deltas.append(gpt_engine._output(seq, [byte]).delta_text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert deltas.count("") == len(text.encode()) - len(text)


def test_abort_frees_blocks(gpt_engine):
    params = SamplingParams(max_tokens=50, **GREEDY)
    gpt_engine.add_request("a", list(range(20)), params)
    gpt_engine.add_request("b", list(range(10)), params)
    for _ in range(3):
        gpt_engine.step()
    used = gpt_engine.blocks.num_used
    gpt_engine.abort("a")
    gpt_engine.abort("nope")  # unknown ids are ignored
    assert gpt_engine.blocks.num_used < used
    outs = gpt_engine.step()
    a = [o for o in outs if o.request_id == "a"]
    assert len(a) == 1 and a[0].finished and a[0].finish_reason == "abort"
    gpt_engine.abort("b")
    gpt_engine.step()
    assert not gpt_engine.has_unfinished()
    assert gpt_engine.blocks.num_used == 0
    # A stream closed early aborts its request.
    it = gpt_engine.stream([1, 2], params)
    next(it)
    it.close()
    gpt_engine.step()
    assert not gpt_engine.has_unfinished() and gpt_engine.blocks.num_used == 0


def test_stats(gpt_engine):
    gpt_engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=3))
    s = gpt_engine.stats()
    for key in (
        "num_waiting",
        "num_running",
        "num_preempted_total",
        "kv_blocks_used",
        "kv_blocks_total",
        "kv_usage",
        "prompt_tokens_total",
        "generation_tokens_total",
        "steps_total",
    ):
        assert key in s
    assert s["generation_tokens_total"] >= 3 and 0 <= s["kv_usage"] <= 1


# -- tokenizer and errors -------------------------------------------------------------------


def test_tokenizer_and_chat_template(tiny_llama_dir, tiny_gpt2_dir):
    engine = Engine(tiny_llama_dir, num_blocks=64)
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids and all(isinstance(i, int) for i in ids)
    assert engine.tokenizer.decode(engine.tokenizer.encode("Hello world")) == "Hello world"
    assert engine.tokenizer.eos_token_id == 1 and engine.model_name == tiny_llama_dir.name
    gpt2 = Engine(tiny_gpt2_dir, num_blocks=64)
    with pytest.raises(ValueError, match="chat template"):
        gpt2.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed="x"), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_add_request_errors(gpt_engine):
    p = SamplingParams(max_tokens=8)
    with pytest.raises(ValueError, match="max_model_len=128"):
        gpt_engine.add_request("long", list(range(125)), p)
    with pytest.raises(ValueError, match="empty"):
        gpt_engine.add_request("empty", "", p)
    with pytest.raises(ValueError, match="out of range"):
        gpt_engine.add_request("bad", [1, 256], p)
    gpt_engine.add_request("dup", [1], p)
    with pytest.raises(ValueError, match="already in use"):
        gpt_engine.add_request("dup", [1], p)
    gpt_engine.abort("dup")
    gpt_engine.step()


def test_engine_full():
    torch.manual_seed(0)
    engine = Engine(GPT(GPTConfig.tiny()).eval(), max_waiting=2, num_blocks=32)
    engine.add_request("a", [1], SamplingParams())
    engine.add_request("b", [1], SamplingParams())
    with pytest.raises(EngineFull):
        engine.add_request("c", [1], SamplingParams())
    assert issubclass(EngineFull, RuntimeError)
    assert isinstance(engine.step()[0], RequestOutput)


def test_construction_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="config.json"):
        Engine(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match="safetensors"):
        Engine(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        Engine(tmp_path)
    with pytest.raises(ValueError, match="e3m2"):
        Engine(tiny_llama_dir, quantize="fp7")
    with pytest.raises(ValueError, match="scheduler"):
        Engine(tiny_llama_dir, scheduler="fifo")
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(tiny_llama_dir, max_model_len=10_000)


# -- prompts, stopping and text (audit fixes) -------------------------------------------------


def test_text_prompts_get_the_tokenizers_bos_like_hf(bos_llama_dir):
    from transformers import AutoTokenizer

    engine = Engine(bos_llama_dir, num_blocks=64)
    hf_tok = AutoTokenizer.from_pretrained(bos_llama_dir)
    text = "The quick brown fox"
    ids = hf_tok(text).input_ids
    assert ids[0] == 0 and ids[1] != 0  # the post-processor's <s>
    params = SamplingParams(max_tokens=8, **GREEDY)
    out = engine.generate(text, params)[0]
    assert out.prompt_token_ids == ids
    # HF generate(**tokenizer(text)) sees the same prompt, so gives the same tokens.
    assert out.token_ids == _hf_generate(_hf(bos_llama_dir), ids, 8)
    assert next(iter(engine.stream(text, params))).prompt_token_ids == ids
    # The chat template writes <s> itself: it must not be added a second time.
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat[0] == 0 and chat[1] != 0


def test_text_prompt_outside_the_models_vocabulary_is_refused_at_admission():
    torch.manual_seed(0)
    # Byte tokenizer (ids up to 255) in front of a model that embeds only 200 ids.
    engine = Engine(GPT(GPTConfig.tiny(vocab_size=200)).eval(), num_blocks=32)
    with pytest.raises(ValueError, match=r"out of range \[0, 200\)"):
        engine.add_request("bad", "\U0001f600", SamplingParams(max_tokens=2))  # 0xF0 = 240
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("ids", [1, 2, 230], SamplingParams(max_tokens=2))
    out = engine.generate("cafe", SamplingParams(max_tokens=2))[0]
    assert out.finished and len(out.token_ids) == 2


def test_bad_text_prompt_fails_alone_in_the_async_engine():
    import asyncio

    from fscale.serve.async_engine import AsyncEngine

    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=200, seq_len=256)).eval()
    engine = Engine(model, num_blocks=64, max_tokens_per_step=16)
    good_params = SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY)
    expected = engine.generate("Hello", good_params)[0].token_ids

    async def go():
        aeng = AsyncEngine(engine)
        aeng.start(asyncio.get_running_loop())
        try:
            good, bad = await asyncio.gather(
                aeng.add("good", "Hello", good_params),
                aeng.add("bad", "\U0001f600", SamplingParams(max_tokens=4)),
                return_exceptions=True,
            )
            outs = [out async for out in good]
            return bad, outs[-1]
        finally:
            aeng.stop()

    bad, final = asyncio.run(go())
    assert isinstance(bad, ValueError) and "out of range" in str(bad)
    assert final.finished and final.token_ids == expected


def _first_positions(tokens: list[int], n: int, avoid: int) -> list[int]:
    """``n`` positions of ``tokens`` whose token appears there first, all before ``avoid``."""
    end = tokens.index(avoid) if avoid in tokens else len(tokens)
    firsts = [i for i in range(1, end) if tokens[i] not in tokens[:i]]
    assert len(firsts) >= 2 * n, tokens
    return firsts[1 : 2 * n : 2]  # spaced out, so each stop is seen after the last one


def test_generation_stops_at_every_eos_of_config_and_generation_config(
    tiny_llama_dir, llama_dir_with
):
    prompt = PROMPTS[0]
    free = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    full = Engine(tiny_llama_dir, num_blocks=64).generate(prompt, free)[0].token_ids
    a, b, c = (full[i] for i in _first_positions(full, 3, avoid=1))
    path = llama_dir_with(config={"eos_token_id": [a, b]}, generation_config={"eos_token_id": c})
    engine = Engine(path, num_blocks=64)
    stopped = SamplingParams(max_tokens=24, **GREEDY)
    for eos in (a, b, c):
        # Continue the greedy text up to just before this eos: it must stop right there.
        start = full.index(eos) - 1
        out = engine.generate(prompt + full[:start], stopped)[0]
        assert out.token_ids == full[start : full.index(eos) + 1], eos
        assert out.finish_reason == "stop"
    assert engine.eos_token_ids == {a, b, c, 1}  # 1: the tokenizer's </s>
    # A list in generation_config.json counts too, and ignore_eos still ignores them all.
    path = llama_dir_with(config={"eos_token_id": a}, generation_config={"eos_token_id": [b, c]})
    engine = Engine(path, num_blocks=64)
    assert engine.eos_token_ids == {a, b, c, 1}
    assert engine.generate(prompt, free)[0].token_ids == full


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_max_model_len_is_lowered_to_what_the_kv_cache_holds(tiny_llama_dir):
    records = _Records()
    logger = logging.getLogger("fscale.serve.engine")
    logger.addHandler(records)
    try:
        engine = Engine(tiny_llama_dir, num_blocks=9, block_size=16)  # 8 x 16 = 128 tokens
    finally:
        logger.removeHandler(records)
    assert engine.max_model_len == 128  # the model's context is 256
    assert any("max_model_len=128" in m for m in records.messages), records.messages
    # A request may now use the whole context: it fits in the cache.
    out = engine.generate([5, 6, 7], SamplingParams(max_tokens=125, ignore_eos=True))[0]
    assert len(out.token_ids) == 125
    assert Engine(tiny_llama_dir, num_blocks=9, max_model_len=128).max_model_len == 128
    with pytest.raises(ValueError, match="larger kv_cache_gib .* smaller max_model_len"):
        Engine(tiny_llama_dir, num_blocks=9, block_size=16, max_model_len=200)


def test_first_token_keeps_its_leading_space_with_a_metaspace_tokenizer(metaspace_llama_dir):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(metaspace_llama_dir)
    engine = Engine(metaspace_llama_dir, num_blocks=64)
    prompt = "w1 w2 w3 w4 w5 w6 w7"
    params = SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY)
    out = engine.generate(prompt, params)[0]
    ids = list(out.prompt_token_ids)
    want = hf_tok.decode(ids + out.token_ids, skip_special_tokens=True)
    before = hf_tok.decode(ids, skip_special_tokens=True)
    assert want.startswith(before)
    assert out.text == want[len(before) :]
    assert out.text.startswith(" w")  # every word token starts with a space
    chunks = list(engine.stream(prompt, params))
    assert chunks[0].delta_text.startswith(" w")
    assert "".join(c.delta_text for c in chunks) == out.text
    # Stop strings still cut the text where they start.
    stop = out.text.split(" ")[3]
    cut = engine.generate(prompt, SamplingParams(max_tokens=10, stop=[stop], **GREEDY))[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.index(stop)]


@pytest.mark.parametrize("tied", ["all", "first"])
def test_an_exported_fscale_gpt_directory_serves_like_the_module(tmp_path, tied):
    """``fs.export(dir, params, model=gpt)`` writes the GPTConfig as config.json
    (model_type fscale_gpt): ``Engine(dir)`` then holds the module's weights exactly and
    generates its tokens; a MoE GPT's directory is refused like the module."""
    import fscale as fs
    from fscale.models import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig.tiny(seq_len=64)).eval()
    params, _ = fs.functional(gpt)
    fs.export(tmp_path / "gpt", params, model=gpt, tied=tied)
    from_dir, from_module = Engine(tmp_path / "gpt"), Engine(gpt)
    assert from_dir.model_name == "gpt"
    assert from_dir.decoder.params.keys() == from_module.decoder.params.keys()
    for k, v in from_module.decoder.params.items():
        assert torch.equal(from_dir.decoder.params[k], v), k
    sp = SamplingParams(max_tokens=8, temperature=0.8, seed=1)
    prompts = [[5, 6, 7, 8], list(range(40, 60))]
    assert [o.token_ids for o in from_dir.generate(prompts, sp)] == [
        o.token_ids for o in from_module.generate(prompts, sp)
    ]

    moe = GPT(GPTConfig.moe_tiny())
    fs.export(tmp_path / "moe", fs.functional(moe)[0], model=moe)
    with pytest.raises(ValueError, match="mixture of experts"):
        Engine(tmp_path / "moe")
