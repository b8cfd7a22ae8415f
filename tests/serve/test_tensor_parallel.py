"""Tensor-parallel serving on a gloo world of 2 CPU ranks: each rank's greedy tokens equal
the single-rank engine's (tiny Llama with 4 heads / 2 KV heads, tiny GPT-2, fscale's
GPT, host-streamed weights), across prompt-splitting budgets, arrivals mid-generation,
an abort, prefix-cache hits, the fused (reference) kernels and the emulated CUDA-graph
path; sampled tokens agree across ranks; each rank's KV cache holds half the KV heads;
quantized shards equal a recompute on their weights; 4 ranks over 2 KV heads replicate
them; bad sizes raise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fscale.serve import Engine, SamplingParams
from tests.dist import run_world

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [100, 101, 102],
    [7],
    list(range(30, 75)),
]
SHARED = list(range(120, 160))  # 40 tokens: full blocks a second prompt finds cached
CASES = {  # name: (model fixture, engine kwargs, emulated graph buckets or 0)
    "llama-splits": ("llama", dict(max_tokens_per_step=8, block_size=4, num_blocks=96), 0),
    "llama-fused-graphs": (
        "llama",
        dict(max_tokens_per_step=64, block_size=8, num_blocks=64, fused_kernels=True),
        4,
    ),
    "gpt2": ("gpt2", dict(max_tokens_per_step=16, block_size=8, num_blocks=64), 0),
    # fscale's own GPT (an nn.Module, not a directory), built alike on every rank.
    "fscale-gpt": ("fscale-gpt", dict(max_tokens_per_step=16, block_size=8, num_blocks=64), 0),
    # ZeRO-Inference under tensor parallelism: each rank streams its shard of the layers.
    "llama-offload": (
        "llama",
        dict(max_tokens_per_step=16, block_size=8, num_blocks=64, offload_weights=True),
        0,
    ),
}


def _drive(engine: Engine) -> dict:
    """A fixed script on the request-taking rank: a batch, two arrivals mid-generation,
    an abort, sampled requests, then two prompts sharing a 40-token prefix in turn."""
    done = {}

    def collect(outs):
        for o in outs:
            if o.finished:
                done[o.request_id] = (o.token_ids, o.finish_reason, o.num_cached_tokens)

    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, GREEDY)
    engine.add_request("seeded", PROMPTS[1], SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    engine.add_request("unseeded", PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.9))
    step = 0
    while engine.has_unfinished():
        if step == 2:
            engine.add_request("late", PROMPTS[0][:7], GREEDY)
        if step == 3:
            engine.add_request("gone", PROMPTS[3], GREEDY)
        if step == 6:
            engine.abort("gone")
        collect(engine.step())
        step += 1
    for j, tail in enumerate([[1, 2, 3], [4, 5]]):
        engine.add_request(f"p{j}", SHARED + tail, GREEDY)
        while engine.has_unfinished():
            collect(engine.step())
    return done


def _engine(path, kwargs, graphs, **extra) -> Engine:
    if path == "fscale-gpt":
        from fscale.models import GPT, GPTConfig

        torch.manual_seed(0)
        path = GPT(GPTConfig.tiny(n_head=2, seq_len=64)).eval()
    engine = Engine(path, device="cpu", **kwargs, **extra)
    if graphs:
        engine.runner._capture(graphs, emulate=True)
    return engine


def _rank(rank, world, cases):
    results = {}
    for name, (path, kwargs, graphs) in cases.items():
        engine = _engine(path, kwargs, graphs, tensor_parallel="world" if rank else 2)
        kv = tuple(engine.runner.kv[0][0].shape)
        if engine.is_leader:
            done = _drive(engine)
            engine.shutdown()
        else:
            with pytest.raises(RuntimeError, match="rank 1 of a tensor-parallel group"):
                engine.add_request("x", [1, 2], GREEDY)
            done = {}

            def collect(o, done=done):
                if o.finished:
                    done[o.request_id] = (o.token_ids, o.finish_reason, o.num_cached_tokens)

            engine.follow(collect)
        results[name] = (done, kv, engine.blocks.num_used)
    return results


@pytest.fixture(scope="module")
def paths(tiny_llama_dir, tiny_gpt2_dir):
    return {"llama": str(tiny_llama_dir), "gpt2": str(tiny_gpt2_dir), "fscale-gpt": "fscale-gpt"}


@pytest.fixture(scope="module")
def world_results(paths):
    cases = {n: (paths[m], kw, g) for n, (m, kw, g) in CASES.items()}
    return run_world(_rank, 2, cases, timeout=90)


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_equals_single_rank_engine(paths, world_results, name):
    model, kwargs, graphs = CASES[name]
    ref = _drive(_engine(paths[model], kwargs, graphs))
    (r0, _, used0), (r1, _, used1) = world_results[0][name], world_results[1][name]
    assert set(r0) == set(r1) == set(ref)
    assert r0 == r1  # every rank: the same tokens, sampled ones included
    greedy = [k for k in ref if k not in ("seeded", "unseeded")]
    assert {k: r0[k] for k in greedy} == {k: ref[k] for k in greedy}
    assert ref["gone"][1] == "abort" and len(ref["gone"][0]) < GREEDY.max_tokens
    assert ref["p1"][2] > 0  # the shared prefix was a cache hit, on every rank alike
    assert used0 == used1 == 0


REPLICATED = dict(max_tokens_per_step=16, block_size=8, num_blocks=64)


def _rank_replicated(rank, world, path):
    """Tiny Llama (4 heads, 2 KV heads) over 4 ranks: one head and one KV head each."""
    engine = _engine(path, REPLICATED, 0, tensor_parallel="world" if rank else 4)
    done = {}
    if engine.is_leader:
        done = _drive(engine)
        engine.shutdown()
    else:
        engine.follow()
    k_cache = engine.runner.kv[0][0]  # layer 0's keys, as the run left them
    return done, tuple(k_cache.shape), k_cache.clone(), engine.blocks.num_used


def test_replicated_kv_heads_over_four_ranks(tiny_llama_dir):
    """[Note: replicated KV heads]: 4 ranks, 2 KV heads: greedy tokens equal the
    single-rank engine's; ranks 0, 1 cache KV head 0 and ranks 2, 3 head 1, bit for bit."""
    path = str(tiny_llama_dir)
    results = run_world(_rank_replicated, 4, path, timeout=120)
    ref = _drive(_engine(path, REPLICATED, 0))
    done = results[0][0]
    greedy = [k for k in ref if k not in ("seeded", "unseeded")]
    assert {k: done[k] for k in greedy} == {k: ref[k] for k in greedy}
    assert set(done) == set(ref) and done["p1"][2] > 0  # a prefix-cache hit too
    assert [r[1] for r in results] == [(64, 8, 1, 16)] * 4
    k = [r[2] for r in results]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3])
    assert k[0].abs().sum() > 0 and not torch.equal(k[0], k[2])
    assert all(r[3] == 0 for r in results)


def test_replicated_shards_hold_their_groups_kv_rows(tiny_llama_dir):
    from fscale.serve.models.loader import load_model
    from fscale.serve.parallel import TensorParallel, shard_model

    lm = load_model(str(tiny_llama_dir))
    D = lm.config.head_dim
    q, k, v = lm.params["layers.0.qkv.weight"].split([4 * D, 2 * D, 2 * D])
    for r in range(4):
        qr, kr, vr = shard_model(lm, TensorParallel(4, r)).params["layers.0.qkv.weight"].split(D)
        g = r // 2  # KV head of query head r (2 query heads per KV head)
        assert torch.equal(qr, q[r * D : (r + 1) * D])
        assert torch.equal(kr, k[g * D : (g + 1) * D]) and torch.equal(vr, v[g * D : (g + 1) * D])


QUANTIZED = ("e3m2", "w8a8", "int4")  # per-channel scales (2) and a group-wise format
HEAD_TOO = "e3m2"  # quantized with quantize_head=True: each rank packs its vocabulary rows


def _rank_quantized(rank, world, path):
    """Per format: the leader's greedy tokens and every rank's dequantized layer shards."""
    from fscale.transforms.quantize import QuantizedWeight

    out = {}
    for fmt in QUANTIZED:
        kw = dict(REPLICATED, quantize=fmt, quantize_head=fmt == HEAD_TOO)
        engine = _engine(path, kw, 0, tensor_parallel="world" if rank else 2)
        tokens = None
        if engine.is_leader:
            outs = engine.generate(PROMPTS[:3], GREEDY)
            tokens = [o.token_ids for o in outs]
            engine.shutdown()
        else:
            engine.follow()
        shards = {
            k: v.dequantize()
            for k, v in engine.decoder.params.items()
            if isinstance(v, QuantizedWeight)
        }
        out[fmt] = (tokens, shards)
    return out


def test_quantized_shards_equal_a_recompute_on_their_weights(tiny_llama_dir):
    """``quantize=`` under tensor parallelism quantizes each rank's shard: the group's
    greedy tokens equal a plain recompute of HF Llama whose linears are the ranks'
    dequantized shards put back together. For FPx and w8a8 ([Note: quantized shards])
    those are bit for bit what one rank quantizes, and FPx tokens equal one rank's;
    with ``quantize_head`` (FPx) the head's vocabulary shards too."""
    from transformers import AutoModelForCausalLM

    path = str(tiny_llama_dir)
    results = run_world(_rank_quantized, 2, path, timeout=120)
    for fmt in QUANTIZED:
        tokens, a = results[0][fmt]
        _, b = results[1][fmt]
        assert set(a) == set(b) and any(k.endswith("o.weight") for k in a), fmt
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        D = model.config.hidden_size // model.config.num_attention_heads
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                qa, ka, va = a[f"layers.{i}.qkv.weight"].split([2 * D, D, D])
                qb, kb, vb = b[f"layers.{i}.qkv.weight"].split([2 * D, D, D])
                attn, mlp = layer.self_attn, layer.mlp
                attn.q_proj.weight.copy_(torch.cat([qa, qb]))
                attn.k_proj.weight.copy_(torch.cat([ka, kb]))
                attn.v_proj.weight.copy_(torch.cat([va, vb]))
                attn.o_proj.weight.copy_(
                    torch.cat([a[f"layers.{i}.o.weight"], b[f"layers.{i}.o.weight"]], 1)
                )
                ga, ua = a[f"layers.{i}.gate_up.weight"].chunk(2)
                gb, ub = b[f"layers.{i}.gate_up.weight"].chunk(2)
                mlp.gate_proj.weight.copy_(torch.cat([ga, gb]))
                mlp.up_proj.weight.copy_(torch.cat([ua, ub]))
                mlp.down_proj.weight.copy_(
                    torch.cat([a[f"layers.{i}.down.weight"], b[f"layers.{i}.down.weight"]], 1)
                )
            assert ("head.weight" in a) == (fmt == HEAD_TOO), fmt
            if fmt == HEAD_TOO:
                model.lm_head.weight.copy_(torch.cat([a["head.weight"], b["head.weight"]]))
        if fmt != "int4":  # o and down scaled by their whole rows' absmax
            head = fmt == HEAD_TOO
            one = Engine(path, device="cpu", quantize=fmt, quantize_head=head, **REPLICATED)
            whole = {k: v.dequantize() for k, v in one.decoder.params.items() if k in a}
            for i in range(len(model.model.layers)):
                for name in ("o", "down"):
                    key = f"layers.{i}.{name}.weight"
                    assert torch.equal(torch.cat([a[key], b[key]], 1), whole[key]), key
            if fmt == "w8a8":
                # Its activations are quantized per token over each rank's K slice, so
                # neither one rank's tokens nor a plain recompute are the reference.
                continue
            assert tokens == [o.token_ids for o in one.generate(PROMPTS[:3], GREEDY)]
        for prompt, got in zip(PROMPTS[:3], tokens, strict=True):
            ids = list(prompt)
            for _ in range(GREEDY.max_tokens):
                with torch.no_grad():
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            assert got == ids[len(prompt) :], fmt


def test_each_rank_caches_half_the_kv_heads(world_results):
    (_, kv0, _), (_, kv1, _) = world_results[0]["llama-splits"], world_results[1]["llama-splits"]
    assert kv0 == kv1 == (96, 4, 1, 16)  # tiny Llama: 2 KV heads of 16 -> 1 per rank
    (_, kv0, _), (_, kv1, _) = world_results[0]["gpt2"], world_results[1]["gpt2"]
    assert kv0 == kv1 == (64, 8, 2, 16)  # GPT-2: 4 heads -> 2 per rank


def test_bad_sizes_raise(tiny_llama_dir, tiny_gpt2_dir):
    from fscale.serve.models.loader import model_config
    from fscale.serve.parallel import check_divisible

    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not divide .*num_heads=4"):
        Engine(tiny_llama_dir, device="cpu", tensor_parallel=3)
    # 12 heads split 6 ways, but 4 KV heads neither split 6 ways nor divide 6.
    cfg = dataclasses.replace(
        model_config(str(tiny_llama_dir)), num_heads=12, num_kv_heads=4, intermediate=120
    )
    with pytest.raises(ValueError, match=r"does not divide .*'s num_kv_heads=4: "):
        check_divisible(cfg, 6)
    check_divisible(cfg, 12)  # one head per rank; each KV head on 3 ranks
    check_divisible(cfg, 2)  # two KV heads per rank
    with pytest.raises(ValueError, match="int >= 1"):
        Engine(tiny_gpt2_dir, device="cpu", tensor_parallel=0)
    with pytest.raises(RuntimeError, match="needs a launched world"):
        Engine(tiny_gpt2_dir, device="cpu", tensor_parallel=2)


def test_shards_rebuild_the_full_layer(tiny_llama_dir):
    """Concatenating both ranks' q/k/v, gate/up and o/down slices gives the originals."""
    from fscale.serve.models.loader import load_model
    from fscale.serve.parallel import TensorParallel, shard_model

    lm = load_model(str(tiny_llama_dir))
    a, b = (shard_model(lm, TensorParallel(2, r)) for r in (0, 1))
    p, D, inter = lm.params, lm.config.head_dim, lm.config.intermediate
    qa, ka, va = a.params["layers.0.qkv.weight"].split([2 * D, D, D])
    qb, kb, vb = b.params["layers.0.qkv.weight"].split([2 * D, D, D])
    assert torch.equal(torch.cat([qa, qb, ka, kb, va, vb]), p["layers.0.qkv.weight"])
    ga, ua = a.params["layers.0.gate_up.weight"].chunk(2)
    gb, ub = b.params["layers.0.gate_up.weight"].chunk(2)
    assert torch.equal(torch.cat([ga, gb, ua, ub]), p["layers.0.gate_up.weight"])
    for name in ("o", "down"):
        w = torch.cat([a.params[f"layers.0.{name}.weight"], b.params[f"layers.0.{name}.weight"]], 1)
        assert torch.equal(w, p[f"layers.0.{name}.weight"])
    embeds = [a.params["embed.weight"], b.params["embed.weight"]]
    assert torch.equal(torch.cat(embeds), p["embed.weight"])
    assert embeds[0].shape[0] == lm.config.vocab_size // 2
    assert a.params["norm.weight"] is p["norm.weight"]
    assert a.params["layers.0.down.weight"].shape[1] == inter // 2


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_streamed_shards_equal_the_sliced_whole_model(model, tiny_llama_dir, tiny_gpt2_dir):
    """``load_model(dir, tp=...)`` slices tensor by tensor as it reads: each rank's params
    equal ``shard_model`` of the whole model's, bit for bit, and a tied head stays the
    embedding."""
    from fscale.serve.models.loader import load_model
    from fscale.serve.parallel import TensorParallel, shard_model

    path = str(tiny_llama_dir if model == "llama" else tiny_gpt2_dir)
    whole = load_model(path)
    for rank in (0, 1):
        tp = TensorParallel(2, rank)
        want, got = shard_model(whole, tp).params, load_model(path, tp=tp).params
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        assert (got["head.weight"] is got["embed.weight"]) == (model == "gpt2")
        if model == "llama":  # its own head: this rank's half of the vocabulary rows
            assert got["head.weight"].shape[0] == whole.config.vocab_size // 2
        assert got["layers.1.o.weight"].shape[1] == whole.params["layers.1.o.weight"].shape[1] // 2


def test_a_directory_is_read_a_layer_at_a_time(tmp_path, monkeypatch):
    """Under tensor parallelism a rank's host holds the checkpoint tensors of about one
    layer at a time (plus the replicated embedding and head), never the whole model."""
    import weakref

    import safetensors
    from transformers import LlamaConfig, LlamaForCausalLM

    from fscale.serve.models.loader import load_model
    from fscale.serve.parallel import TensorParallel

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    sd = LlamaForCausalLM(cfg).state_dict()
    nbytes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    layer = sum(n for k, n in nbytes.items() if k.startswith("model.layers.0."))
    rest = sum(n for k, n in nbytes.items() if not k.startswith("model.layers."))

    real, live, peak = safetensors.safe_open, weakref.WeakValueDictionary(), [0]

    class Counting:  # safe_open, counting the bytes of the tensors it handed out still alive
        def __init__(self, *args, **kw):
            self.inner = real(*args, **kw)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            live[id(t)] = t
            peak[0] = max(peak[0], sum(v.numel() * v.element_size() for v in live.values()))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    lm = load_model(str(tmp_path), tp=TensorParallel(2, 0))
    assert lm.params["layers.7.qkv.weight"].shape[0] == (4 + 2 + 2) * 16 // 2
    assert 0 < peak[0] <= rest + layer, (peak[0], rest, layer)
    assert peak[0] < 0.5 * sum(nbytes.values())


def test_vocab_parallel_embedding_and_head_equal_the_whole(tiny_llama_dir, monkeypatch):
    """Each rank holds ceil(V / 2) rows of the token embedding and the head (the last
    rank fewer, its logits padded for the gather), with an odd vocabulary: the summed
    lookups equal the whole table's bit for bit, the gathered logits the whole head's."""
    import dataclasses

    from fscale.hw import comm
    from fscale.serve.models.decoder import Decoder, LoadedModel
    from fscale.serve.models.loader import load_model
    from fscale.serve.parallel import TensorParallel, shard_model, vocab_rows

    lm = load_model(str(tiny_llama_dir))
    V = 319
    params = dict(lm.params)
    for k in ("embed.weight", "head.weight"):
        params[k] = params[k][:V].contiguous()
    lm = LoadedModel(dataclasses.replace(lm.config, vocab_size=V), params, "odd-vocab")
    assert vocab_rows(V, TensorParallel(2, 0)) == (0, 160, 160)
    assert vocab_rows(V, TensorParallel(2, 1)) == (160, 319, 160)
    hidden = torch.randn(3, lm.config.hidden, generator=torch.Generator().manual_seed(0))
    want = Decoder(lm, device="cpu").logits(hidden)

    decoders = [
        Decoder(shard_model(lm, TensorParallel(2, r)), tp=TensorParallel(2, r)) for r in (0, 1)
    ]
    assert [d.head.shape[0] for d in decoders] == [160, 159]
    seen = []

    def gather(t, group=None, **kw):  # rank 1 calls first (its result unused), then rank 0
        seen.append(t)
        return torch.cat([seen[-1], seen[0]])

    monkeypatch.setattr(comm, "all_gather", gather)
    decoders[1].logits(hidden)
    got = decoders[0].logits(hidden)
    assert got.shape == want.shape == (3, V)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    ids = torch.tensor([0, 159, 160, 318, 7, 200])  # both sides of the split, both ends
    parts = []

    def reduce(t, op=None, group=None, **kw):  # rank 1 first (result unused), then rank 0
        assert op == "sum"
        parts.append(t)
        return parts[0] + parts[-1]

    monkeypatch.setattr(comm, "all_reduce", reduce)
    decoders[1].embed_tokens(ids)
    assert torch.equal(decoders[0].embed_tokens(ids), lm.params["embed.weight"][ids])
