"""fscale's :class:`~fscale.models.GPT` -> the decoder's config and params.

Its fused ``qkv`` Linear is already ``[q; k; v]`` along the output dim; the head is tied
to ``tok_emb`` (or its own weight); the vocabulary is bytes unless the model says so.

Usage::

    lm = fscale_gpt(GPT(GPTConfig.tiny()))
"""

from __future__ import annotations

from fscale.serve.models.decoder import DecoderConfig, LoadedModel


def fscale_gpt(model) -> LoadedModel:
    c = model.cfg
    if c.experts:  # the decoder's MLP is one dense FFN per layer
        raise ValueError(
            f"fscale.serve: this GPT is a mixture of experts ({c.experts} experts per MoE "
            "block); the engine serves dense GPTs, Llama and GPT-2 models. Train or export a "
            "dense model (experts=0)."
        )
    sd = dict(model.named_parameters(remove_duplicate=False))
    cfg = DecoderConfig(
        arch="fscale_gpt",
        vocab_size=c.vocab_size,
        hidden=c.d_model,
        num_layers=c.n_layer,
        num_heads=c.n_head,
        num_kv_heads=c.n_head,
        head_dim=c.d_model // c.n_head,
        intermediate=4 * c.d_model,
        max_positions=c.seq_len,
        norm="layer",
        norm_eps=1e-5,
        positions="learned",
        mlp="gelu_tanh",
    )
    params = {
        "embed.weight": sd["tok_emb.weight"],
        "pos_embed.weight": sd["pos_emb.weight"],
        "norm.weight": sd["ln_f.weight"],
        "norm.bias": sd.get("ln_f.bias"),
        "head.weight": sd["head.weight"],
    }
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        names = {
            "norm1": "ln1",
            "qkv": "attn.qkv",
            "o": "attn.proj",
            "norm2": "ln2",
            "fc": "mlp.fc",
            "down": "mlp.proj",
        }
        for me, theirs in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"{b}{theirs}.{kind}")
                if t is not None:
                    params[f"layers.{i}.{me}.{kind}"] = t
    params = {k: v.detach() for k, v in params.items() if v is not None}
    return LoadedModel(cfg, params, type(model).__name__)
