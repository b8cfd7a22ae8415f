"""One decoder forward over a flattened token batch and a paged KV cache.

Llama (RMSNorm, RoPE, GQA, SwiGLU), GPT-2 (learned positions, LayerNorm, GELU) and
fscale's GPT all map onto :class:`DecoderConfig` and one params dict with these names
(linear weights ``[out, in]``, so ``fs.quantize``'s default selection picks exactly the
layer linears; ``embed``/``pos_embed``/``head`` are left alone)::

    embed.weight  pos_embed.weight?  norm.weight  norm.bias?  head.weight (may be embed's)
    layers.{i}.norm1.weight/.bias?  layers.{i}.qkv.weight/.bias?  layers.{i}.o.weight/.bias?
    layers.{i}.norm2.weight/.bias?  layers.{i}.gate_up.weight (swiglu) | layers.{i}.fc.* (gelu)
    layers.{i}.down.weight/.bias?

Usage::

    dec = Decoder(LoadedModel(cfg, params, "name"), device)
    dec = Decoder(shard_model(lm, tp), device=dev, tp=tp)           # tensor parallel
    hidden = dec.forward(input_ids, positions, meta, kv_caches)    # [T, hidden]
    logits = dec.logits(hidden[last_rows])                          # [B, vocab] float32

Under tensor parallelism (``fscale/serve/parallel.py``) the params are this rank's
shard, ``cfg`` stays the whole model's, and ``self.num_heads`` / ``num_kv_heads`` /
``intermediate`` are this rank's; the o and down projections are all-reduced over the
group (their biases added after the sum); the token embedding and the head hold this
rank's vocabulary rows (``self.embed`` / ``self.head``): embeddings are all-reduced,
logits all-gathered.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fscale.hw import comm
from fscale.kernels.paged_attention import paged_attention


@dataclass(frozen=True)
class DecoderConfig:
    """The shape and flavour of a decoder (see the module doc for the params names)."""

    arch: str
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    mlp: str = "swiglu"  # "swiglu" | "gelu_tanh" | "gelu"
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a generation


def eos_ids(value) -> tuple[int, ...]:
    """A config's ``eos_token_id`` (absent, an int or a list of ints) as a tuple."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


@dataclass
class LoadedModel:
    """A config, its params (see the module doc) and a display name."""

    config: DecoderConfig
    params: dict[str, torch.Tensor]
    name: str
    tokenizer_path: object = None  # a directory with tokenizer files, or None (bytes)
    extra: dict = field(default_factory=dict)


# Rows (tokens) up to which a step's gate_up product may end in SiLU * up itself (the
# decode batches, where that saves the SiLU kernel's launch; prefill keeps its kernel).
# Opt-in with FSCALE_FPX_SWIGLU=1: on one H200 (2026-12-06, the race-free Gluon kernel,
# [Note: an MMA reads its A registers until it retires] in fpx_gluon.py) the 8B FP6
# decode ran 362 tok/s at batch 1 with it against 386 without (one run each, not
# broken down): the epilogue costs more than the SiLU kernel's launch it saves.
SWIGLU_MAX_ROWS = 16


def kv_heads_per_rank(cfg: DecoderConfig, size: int) -> int:
    """KV heads one of ``size`` tensor-parallel ranks holds: 1/``size`` of them, or one
    when there are fewer than ranks ([Note: replicated KV heads] in serve/parallel.py)."""
    return max(1, cfg.num_kv_heads // size)


def map_params(params: dict, fn) -> dict:
    """``{name: fn(name, t)}``, ``fn`` called once per distinct tensor so that tied
    weights stay one tensor; a head tied to the embedding goes through ``fn`` as
    ``embed.weight`` (under tensor parallelism: the embedding's slice)."""
    embed = params.get("embed.weight")
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in params.items():
        if id(v) not in done:
            done[id(v)] = fn("embed.weight" if v is embed else k, v)
        out[k] = done[id(v)]
    return out


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 / linear ``rope_scaling`` applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / rs["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3."
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF Llama's rotate_half convention: the two halves of head_dim are (re, im).
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


@dataclass
class AttentionMeta:
    """Where each new token goes and what it attends to (built by the runner)."""

    slot_mapping: torch.Tensor  # [T] long: cache slot = block * block_size + offset
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: keys after this step
    query_start_loc: torch.Tensor  # [B + 1] int32
    max_query_len: int


class Decoder:
    """The paged forward of a :class:`LoadedModel` (params are used as given: plain or
    quantized tensors; ``F.linear`` on a QuantizedWeight runs its kernel)."""

    def __init__(
        self, lm: LoadedModel, *, offload: bool = False, device=None, fused: bool = False, tp=None
    ):
        self.cfg = cfg = lm.config
        # tp: a fscale.serve.parallel.TensorParallel (params already sharded) or None.
        self.tp = tp if tp is not None and tp.size > 1 else None
        n = self.tp.size if self.tp is not None else 1
        self.num_heads, self.num_kv_heads = cfg.num_heads // n, kv_heads_per_rank(cfg, n)
        self.intermediate = cfg.intermediate // n
        self.params = dict(lm.params)
        self.device = (
            torch.device(device) if device is not None else lm.params["embed.weight"].device
        )
        self.layers = [
            {k.split(".", 2)[2]: v for k, v in lm.params.items() if k.startswith(f"layers.{i}.")}
            for i in range(cfg.num_layers)
        ]
        self.stream = None
        if offload:
            from fscale.serve.models.offload import LayerStream

            self.stream = LayerStream(self.layers, self.device)
            # The stream's host copies (pinned on CUDA) replace the loaded layers: one
            # host copy of weights that do not fit the device, not two.
            self.layers = self.stream.host
            for i, layer in enumerate(self.layers):
                self.params.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        if cfg.positions == "rope":
            pos = torch.arange(cfg.max_positions, dtype=torch.float32)
            freqs = torch.outer(pos, rope_inv_freq(cfg))
            self.cos = freqs.cos().to(self.device)
            self.sin = freqs.sin().to(self.device)
        # Under tensor parallelism the token embedding and the head are this rank's
        # vocabulary rows [lo, hi) (``shard_param``); its logits are padded to ``per``
        # rows for the gather (fscale/serve/parallel.py, vocab_rows).
        self.embed = lm.params["embed.weight"]
        self.head = lm.params["head.weight"]
        self.vocab_lo, self.head_pad = 0, 0
        if self.tp is not None:
            from fscale.serve.parallel import vocab_rows

            lo, hi, per = vocab_rows(cfg.vocab_size, self.tp)
            if self.embed.shape[0] != hi - lo or self.head.shape[0] != hi - lo:
                raise ValueError(
                    f"tensor parallel rank {self.tp.rank}: embedding / head have "
                    f"{self.embed.shape[0]} / {self.head.shape[0]} rows, not the {hi - lo} "
                    "of its vocabulary slice; shard the model with load_model(..., tp=) or "
                    "shard_model first."
                )
            self.vocab_lo, self.head_pad = lo, per - (hi - lo)
        self.scale = cfg.head_dim**-0.5
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.fused: dict | None = None
        # The fused path's linears: the kernel table's one-row GEMV on CUDA
        # (fscale/kernels/gemv.py; any other product, more rows or quantized weights,
        # goes on to F.linear); F.linear everywhere else.
        self.linear = F.linear
        if fused:
            self.enable_fused()

    # -- fused elementwise path ----------------------------------------------------------------

    def fusable(self) -> bool:
        """RMSNorm + RoPE + SwiGLU (Llama-style): the shape the fused kernels cover."""
        c = self.cfg
        return c.norm == "rms" and c.positions == "rope" and c.mlp == "swiglu"

    def enable_fused(self, impls: dict | None = None, *, check: bool = True) -> bool:
        """Use the fused kernels of ``fscale/kernels/fused_decoder.py`` (see
        [Note: the fused layer]) and the one-row GEMV of ``fscale/kernels/gemv.py``;
        ``impls`` (op -> lowering) overrides the kernel table's choice (tests).
        Returns whether the fused path is on; a model it does not cover, or kernels that
        fail their self-check on this device, keep the eager path with a warning."""
        from fscale.kernels import fused_decoder as fd

        if not self.fusable():
            warnings.warn(
                f"fused kernels cover RMSNorm/RoPE/SwiGLU decoders only; {self.cfg.arch} "
                f"(norm={self.cfg.norm}, positions={self.cfg.positions}, mlp={self.cfg.mlp}) "
                "runs the eager path.",
                stacklevel=2,
            )
            self.fused = None
            return False
        from fscale.kernels import gemv

        impls = dict(impls or fd.resolve_all(self.device, self._dtype))
        gemv_impl = impls.pop(gemv.OP, None)
        if check:
            cfg = self.cfg
            bad = fd.self_check(
                impls,
                self.device,
                self._dtype,
                hidden=cfg.hidden,
                H=self.num_heads,
                KVH=self.num_kv_heads,
                D=cfg.head_dim,
                intermediate=self.intermediate,
            )
            if bad:
                warnings.warn(
                    f"fused decoder kernels disagree with their references or fail on "
                    f"{self.device}: {bad}; the decoder runs its eager path.",
                    stacklevel=2,
                )
                self.fused = None
                return False
        self.fused = impls
        self.linear = self._resolve_gemv(gemv_impl, check)
        return True

    def _resolve_gemv(self, impl, check: bool):
        """The one-row GEMV (``impl``, else the kernel table's), if it passes its check."""
        from fscale.hw import dispatch
        from fscale.kernels import gemv

        impl = impl or dispatch.resolve(gemv.OP, self.device, self._dtype).impl
        bad = gemv.self_check(impl, self.device, self._dtype, self.cfg.hidden) if check else None
        if bad:
            warnings.warn(f"gemv kernel fails on {self.device} ({bad}); F.linear.", stacklevel=3)
            return F.linear
        return impl

    def disable_fused(self, reason: str) -> None:
        warnings.warn(f"fused decoder kernels turned off ({reason}); eager path.", stacklevel=2)
        self.fused = None
        self.linear = F.linear

    def _norm(self, x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
        w = p[f"{name}.weight"]
        if self.cfg.norm == "rms":
            y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps)
            return w * y.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), w, p.get(f"{name}.bias"), self.cfg.norm_eps)

    def _mlp(self, h: torch.Tensor, p: dict) -> torch.Tensor:
        if self.cfg.mlp == "swiglu":
            gate, up = F.linear(h, p["gate_up.weight"], p.get("gate_up.bias")).chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            approx = "tanh" if self.cfg.mlp == "gelu_tanh" else "none"
            a = F.gelu(F.linear(h, p["fc.weight"], p.get("fc.bias")), approximate=approx)
        return self._row_linear(a, p, "down")

    def _row_linear(self, x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
        """``F.linear`` of a row-parallel projection (o, down): under tensor parallelism
        each rank's partial product is summed over the group, then the bias is added."""
        if self.tp is None:
            return self.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
        y = comm.all_reduce(self.linear(x, p[f"{name}.weight"]), op="sum", group=self.tp.group)
        b = p.get(f"{name}.bias")
        return y if b is None else y + b

    def forward(self, input_ids, positions, meta: AttentionMeta, kv_caches) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm; writes the new K/V."""
        if self.fused is not None:
            return self._forward_fused(input_ids, positions, meta, kv_caches)
        cfg, T = self.cfg, input_ids.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, cfg.head_dim
        x = self.embed_tokens(input_ids)
        if cfg.positions == "learned":
            x = x + F.embedding(positions, self.params["pos_embed.weight"])
        else:
            cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        layers = self.stream if self.stream is not None else self.layers
        for (k_cache, v_cache), p in zip(kv_caches, layers, strict=True):
            h = self._norm(x, p, "norm1")
            qkv = F.linear(h, p["qkv.weight"], p.get("qkv.bias"))
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
            if cfg.positions == "rope":
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
            v_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
            o = self.attention(q, (k_cache, v_cache), meta)
            x = x + self._row_linear(o.reshape(T, H * D), p, "o")
            x = x + self._mlp(self._norm(x, p, "norm2"), p)
        return self._norm(x, self.params, "norm")

    # [Note: the fused layer]
    # The same math as forward(), regrouped so that every elementwise run between two
    # GEMMs is one kernel: the residual add of a sublayer's output is fused into the
    # next norm (add_rms_norm returns the new residual and the normed input), RoPE of
    # q and k plus the K/V cache write is one kernel reading the qkv projection, and
    # SiLU(gate) * up one more. A layer is 4 GEMMs + attention + 3 small kernels
    # (eager: ~25 small kernels). Rounding points are the eager path's, so bf16 results
    # agree up to fp32 reduction order.
    def _forward_fused(self, input_ids, positions, meta: AttentionMeta, kv_caches):
        res, delta = self.fused_embed(input_ids), None
        layers = self.stream if self.stream is not None else self.layers
        for kv, p in zip(kv_caches, layers, strict=True):
            res, q = self.fused_pre(p, res, delta, positions, meta.slot_mapping, kv)
            res, delta = self.fused_post(p, res, self.attention(q, kv, meta))
        return self.fused_final(res, delta)

    # The fused forward in pieces: the runner's piecewise graphs ([Note: piecewise graphs
    # of mixed steps] in runner.py) capture everything between two attentions.

    def fused_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start ``[T, hidden]``."""
        return self.embed_tokens(input_ids)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[T, hidden]``; under tensor parallelism each rank looks up
        the ids in its vocabulary rows, zeros elsewhere, summed over the group."""
        if self.tp is None:
            return F.embedding(input_ids, self.embed)
        local = input_ids - self.vocab_lo
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = F.embedding(torch.where(mine, local, 0), self.embed)
        x = torch.where(mine[:, None], x, 0)
        return comm.all_reduce(x, op="sum", group=self.tp.group)

    def fused_pre(self, p: dict, res, delta, positions, slot_mapping, kv) -> tuple:
        """Layer ``p`` up to attention: the pending ``delta`` added into ``res``, norm1,
        qkv, RoPE and the K/V write at ``slot_mapping``; returns (res, q ``[T, H, D]``)."""
        from fscale.kernels.fused_decoder import ADD_RMS_NORM, ROPE_KV_WRITE

        f, cfg = self.fused, self.cfg
        res, h = f[ADD_RMS_NORM](res, delta, p["norm1.weight"], cfg.norm_eps)
        qkv = self.linear(h, p["qkv.weight"], p.get("qkv.bias"))
        k_cache, v_cache = kv
        q = f[ROPE_KV_WRITE](
            qkv, positions, self.cos, self.sin, k_cache, v_cache, slot_mapping,
            H=self.num_heads, KVH=self.num_kv_heads, D=cfg.head_dim,
        )  # fmt: skip
        return res, q

    def attention(self, q: torch.Tensor, kv, meta: AttentionMeta) -> torch.Tensor:
        """Paged attention of ``q`` ``[T, H, D]`` over the cache: ``[T, H, D]``."""
        return paged_attention(
            q,
            kv[0],
            kv[1],
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scale=self.scale,
            max_query_len=meta.max_query_len,
        )

    def fused_post(self, p: dict, res, o: torch.Tensor) -> tuple:
        """Layer ``p`` after attention: o projection, norm2, MLP; returns (res, delta),
        the MLP's output still to be added into ``res`` by the next norm."""
        from fscale.kernels.fused_decoder import ADD_RMS_NORM, SILU_MUL

        f, T = self.fused, o.shape[0]
        a = self._row_linear(o.reshape(T, self.num_heads * self.cfg.head_dim), p, "o")
        res, h = f[ADD_RMS_NORM](res, a, p["norm2.weight"], self.cfg.norm_eps)
        w, b = p["gate_up.weight"], p.get("gate_up.bias")
        act = self._fpx_swiglu(h, w, b) if T <= SWIGLU_MAX_ROWS else None
        if act is None:
            act = f[SILU_MUL](self.linear(h, w, b))
        return res, self._row_linear(act, p, "down")

    @staticmethod
    def _fpx_swiglu(h: torch.Tensor, w, b) -> torch.Tensor | None:
        """SiLU(gate) * up in the FPx product's own launch (the Gluon or Triton kernel
        the product would use: ``fpx_triton.fused_swiglu``), where the weight is a plain
        packed FPx one ([Note: the SwiGLU epilogue] in fscale/kernels/fpx_gluon.py);
        None where not."""
        packed = getattr(w, "exact_packed", None)  # a QuantizedWeight's, when plain
        if packed is None or os.environ.get("FSCALE_FPX_SWIGLU", "0") != "1":
            return None
        from fscale.kernels import fpx_triton  # (on CPU it runs under the interpreter only)

        return fpx_triton.fused_swiglu(h, packed, b)

    def fused_final(self, res, delta) -> torch.Tensor:
        """The last delta added, then the final norm: hidden states ``[T, hidden]``."""
        from fscale.kernels.fused_decoder import ADD_RMS_NORM

        norm = self.fused[ADD_RMS_NORM]
        return norm(res, delta, self.params["norm.weight"], self.cfg.norm_eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, vocab]`` logits of ``hidden`` ``[B, hidden]`` (every rank's)."""
        part = self.linear(hidden, self.head)
        if self.tp is None:
            return part.float()
        # Gathered along dim 0 in rank order: each rank's [per, B] slice of the vocabulary.
        part = F.pad(part, (0, self.head_pad)).t().contiguous()
        full = comm.all_gather(part, group=self.tp.group)[: self.cfg.vocab_size]
        return full.t().float().contiguous()

    @torch.no_grad()
    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` of one whole sequence without a cache (tests' reference)."""
        T = input_ids.shape[0]
        cfg, bs, kvh = self.cfg, 16, self.num_kv_heads
        nb = -(-T // bs) + 1
        caches = [
            (
                torch.zeros(nb, bs, kvh, cfg.head_dim, dtype=self._dtype, device=self.device),
                torch.zeros(nb, bs, kvh, cfg.head_dim, dtype=self._dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]
        dev = self.device
        meta = AttentionMeta(
            slot_mapping=torch.arange(bs, bs + T, device=dev),
            block_tables=torch.arange(1, nb, dtype=torch.int32, device=dev)[None],
            seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, T], dtype=torch.int32, device=dev),
            max_query_len=T,
        )
        pos = torch.arange(T, device=dev)
        return self.logits(self.forward(input_ids.to(dev), pos, meta, caches))

    @property
    def _dtype(self) -> torch.dtype:
        return self.embed.dtype
