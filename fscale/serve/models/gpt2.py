"""HF GPT-2 checkpoints (``GPT2LMHeadModel``) -> the decoder's config and params.

GPT-2's ``Conv1D`` stores weights ``[in, out]``: they are transposed at load, so every
linear is ``F.linear``-shaped. The head is always the token embedding (tied).

Usage::

    cfg = gpt2_config(json.load(open("config.json")))
    params = gpt2_params(cfg, get)
"""

from __future__ import annotations

import torch

from fscale.serve.models.decoder import DecoderConfig, eos_ids

ARCHITECTURES = ("GPT2LMHeadModel",)
_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_config(c: dict) -> DecoderConfig:
    act = c.get("activation_function", "gelu_new")
    if act not in _ACTS:
        raise ValueError(
            f"GPT-2 activation_function={act!r} is not supported; use one of {list(_ACTS)}."
        )
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
        raise ValueError(
            "GPT-2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn is not supported."
        )
    if c.get("scale_attn_weights", True) is False:
        raise ValueError("GPT-2 with scale_attn_weights=False is not supported.")
    d, heads = c["n_embd"], c["n_head"]
    return DecoderConfig(
        arch="gpt2",
        vocab_size=c["vocab_size"],
        hidden=d,
        num_layers=c["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate=c.get("n_inner") or 4 * d,
        max_positions=c.get("n_positions", 1024),
        norm="layer",
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        mlp=_ACTS[act],
        eos_token_ids=eos_ids(c.get("eos_token_id")),
    )


def gpt2_params(cfg: DecoderConfig, get, finish=None) -> dict[str, torch.Tensor]:
    """``get(name)`` returns a checkpoint tensor (or None); ``finish(name, t)`` turns
    each param into its final form as it is made (see ``llama_params``)."""

    def g(name):
        # Hub checkpoints name tensors with or without the "transformer." prefix.
        t = get("transformer." + name)
        return t if t is not None else get(name)

    def t(name):
        w = g(name)
        return None if w is None else w.t().contiguous()

    def done(name, v):
        return v if v is None or finish is None else finish(name, v)

    out = {
        "embed.weight": done("embed.weight", g("wte.weight")),
        "pos_embed.weight": done("pos_embed.weight", g("wpe.weight")),
        "norm.weight": done("norm.weight", g("ln_f.weight")),
        "norm.bias": done("norm.bias", g("ln_f.bias")),
    }
    out["head.weight"] = out["embed.weight"]
    for i in range(cfg.num_layers):
        h = f"h.{i}."
        layer = {
            "norm1.weight": g(h + "ln_1.weight"),
            "norm1.bias": g(h + "ln_1.bias"),
            "qkv.weight": t(h + "attn.c_attn.weight"),
            "qkv.bias": g(h + "attn.c_attn.bias"),
            "o.weight": t(h + "attn.c_proj.weight"),
            "o.bias": g(h + "attn.c_proj.bias"),
            "norm2.weight": g(h + "ln_2.weight"),
            "norm2.bias": g(h + "ln_2.bias"),
            "fc.weight": t(h + "mlp.c_fc.weight"),
            "fc.bias": g(h + "mlp.c_fc.bias"),
            "down.weight": t(h + "mlp.c_proj.weight"),
            "down.bias": g(h + "mlp.c_proj.bias"),
        }
        out.update({f"layers.{i}.{k}": done(f"layers.{i}.{k}", v) for k, v in layer.items()})
        del layer  # before the next layer's reads: a streamed load holds one layer
    return out
