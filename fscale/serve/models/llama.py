"""HF Llama-family checkpoints -> the decoder's config and params.

``LlamaForCausalLM``, and the two that differ from it only in what the decoder already
takes: ``MistralForCausalLM`` (a sliding attention window) and ``Qwen2ForCausalLM``
(q/k/v biases, which the checkpoint carries). A sliding window shorter than the model's
context becomes the served context: within the window, full attention and sliding-window
attention see the same keys, so the output is exact; longer sequences are refused.

q/k/v are fused into one ``qkv`` weight and gate/up into ``gate_up`` (fewer, larger
matmuls); a missing ``lm_head.weight`` (tied embeddings) reuses the embedding.

Usage::

    cfg = llama_config(json.load(open("config.json")))
    params = llama_params(cfg, get, tie=False)   # get(hf_name) -> tensor or None
"""

from __future__ import annotations

import torch

from fscale.serve.models.decoder import DecoderConfig, eos_ids

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = ("llama", "mistral", "qwen2")


def llama_config(c: dict) -> DecoderConfig:
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act={c['hidden_act']!r} is not supported; only 'silu'.")
    # transformers 5 keeps rope_theta / scaling in rope_parameters; 4.x at the top level.
    rope = dict(c.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    return DecoderConfig(
        arch="llama",
        vocab_size=c["vocab_size"],
        hidden=hidden,
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        intermediate=c["intermediate_size"],
        max_positions=_context(c),
        norm="rms",
        norm_eps=c.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=float(theta),
        rope_scaling=scaling,
        mlp="swiglu",
        # Llama-3-Instruct lists several (<|end_of_text|>, <|eot_id|>): keep them all.
        eos_token_ids=eos_ids(c.get("eos_token_id")),
    )


def _context(c: dict) -> int:
    """Positions served: the model's, or its sliding window where that is shorter (Qwen2
    slides only with ``use_sliding_window``)."""
    positions = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    return min(positions, window) if window else positions


def llama_params(cfg: DecoderConfig, get, *, tie: bool, finish=None) -> dict[str, torch.Tensor]:
    """``get(name)`` returns a checkpoint tensor (or None when absent); ``finish(name, t)``
    turns each param into its final form (a shard, on its device) as it is made, so a
    streamed checkpoint holds one layer's tensors at a time."""

    def cat(*names):
        ts = [get(n) for n in names]
        if all(t is None for t in ts):
            return None
        return torch.cat(ts, dim=0)

    def done(name, t):
        return t if t is None or finish is None else finish(name, t)

    out = {
        "embed.weight": done("embed.weight", get("model.embed_tokens.weight")),
        "norm.weight": done("norm.weight", get("model.norm.weight")),
    }
    head = None if tie else done("head.weight", get("lm_head.weight"))
    out["head.weight"] = head if head is not None else out["embed.weight"]
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        a = hf + "self_attn."
        layer = {
            "norm1.weight": get(hf + "input_layernorm.weight"),
            "qkv.weight": cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            "qkv.bias": cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            "o.weight": get(a + "o_proj.weight"),
            "o.bias": get(a + "o_proj.bias"),
            "norm2.weight": get(hf + "post_attention_layernorm.weight"),
            "gate_up.weight": cat(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            "gate_up.bias": cat(hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"),
            "down.weight": get(hf + "mlp.down_proj.weight"),
            "down.bias": get(hf + "mlp.down_proj.bias"),
        }
        out.update({me + k: done(me + k, v) for k, v in layer.items() if v is not None})
        del layer  # before the next layer's reads: a streamed load holds one layer
    return out
