"""The model runner: owns the KV cache, turns a scheduled batch into one flattened
forward, and replays CUDA graphs for decode batches.

Usage::

    runner = ModelRunner(decoder, num_blocks=512, block_size=16, max_model_len=2048,
                         max_num_seqs=64, cuda_graphs=True)
    logits, sampled = runner.run(batch)    # logits of each sequence that completes a token

[Note: one forward per step]
All new tokens of the step (decode tokens and prompt chunks) are concatenated into one
``[T]`` batch with their positions and cache slots; attention gets per-sequence query
offsets, key counts and block tables (varlen, no padding). Only the last token of a
sequence whose tokens are then all computed is projected to logits and sampled.

[Note: CUDA graphs]
A step whose sequences all decode (one token each) replays a graph captured for the
smallest bucket (1, 2, 4, 8, 16, 32, ... up to max_num_seqs) that holds it. Padding
rows write their K/V into block 0, which the block manager never hands out, and attend
to it alone: their results are discarded. Capture needs an attention lowering without
host syncs (the Triton kernel; the torch reference reads lengths on the host), so
graphs are only used on CUDA with that lowering, and never with streamed weights
(their copies are not in the graph). Mixed prefill steps run eagerly.
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels.paged_attention import OP as ATTENTION_OP
from fscale.serve.models.decoder import AttentionMeta, Decoder
from fscale.serve.scheduler import Batch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ModelRunner:
    """KV cache + inputs + forward (+ CUDA graphs) for a :class:`Decoder`."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        cuda_graphs: bool = True,
        kv_dtype: torch.dtype | None = None,
    ):
        self.decoder = decoder
        cfg = decoder.cfg
        self.device = decoder.device
        self.block_size = block_size
        self.max_blocks = _cdiv(max_model_len, block_size)
        dtype = kv_dtype or decoder._dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]
        self.graphs: dict[int, tuple] = {}
        self.graph_sizes: list[int] = []
        if cuda_graphs and self._graphs_possible():
            self._capture(max_num_seqs)

    # -- inputs -----------------------------------------------------------------------------

    def prepare(self, batch: Batch):
        """Flattened inputs of ``batch`` (host lists) and the rows / sequences to sample."""
        bs = self.block_size
        ids, pos, slots, qsl, lens, sample_rows, sampled = [], [], [], [0], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            s = seq.num_computed
            ids.extend(seq.token_ids[s : s + n])
            pos.extend(range(s, s + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
            qsl.append(qsl[-1] + n)
            lens.append(s + n)
            if s + n == len(seq.token_ids):
                sample_rows.append(qsl[-1] - 1)
                sampled.append(seq)
        return ids, pos, slots, qsl, lens, sample_rows, sampled

    def _tables(self, batch: Batch, rows: int, width: int) -> torch.Tensor:
        t = torch.zeros(rows, width, dtype=torch.int32)
        for i, seq in enumerate(batch.seqs):
            t[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        return t

    # -- running ----------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: Batch):
        """Forward ``batch``; returns (logits ``[S, V]`` float32, the S sampled sequences)."""
        ids, pos, slots, qsl, lens, sample_rows, sampled = self.prepare(batch)
        B = len(batch.seqs)
        decode = len(ids) == B
        if decode and self.graph_sizes and B <= self.graph_sizes[-1]:
            return self._replay(batch, ids, pos, slots, lens), sampled
        dev = self.device
        width = max(len(s.block_table) for s in batch.seqs)
        meta = AttentionMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=self._tables(batch, B, width).to(dev, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)),
        )
        hidden = self.decoder.forward(
            torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True),
            meta,
            self.kv,
        )
        rows = torch.tensor(sample_rows, dtype=torch.long).to(dev, non_blocking=True)
        return self.decoder.logits(hidden[rows]), sampled

    # -- CUDA graphs ------------------------------------------------------------------------

    def _graphs_possible(self) -> bool:
        if self.device.type != "cuda" or self.decoder.stream is not None:
            return False
        return not dispatch.resolve(ATTENTION_OP, self.device, self.decoder._dtype).is_reference

    def _capture(self, max_num_seqs: int) -> None:
        sizes, n = [], 1
        while n < max_num_seqs:
            sizes.append(n)
            n *= 2
        sizes.append(max_num_seqs)
        dev, W = self.device, self.max_blocks
        # Static inputs sized for the largest bucket; smaller graphs use their leading rows.
        N = sizes[-1]
        self._static = {
            "ids": torch.zeros(N, dtype=torch.long, device=dev),
            "pos": torch.zeros(N, dtype=torch.long, device=dev),
            "slots": torch.zeros(N, dtype=torch.long, device=dev),
            "tables": torch.zeros(N, W, dtype=torch.int32, device=dev),
            "lens": torch.ones(N, dtype=torch.int32, device=dev),
            "qsl": torch.arange(N + 1, dtype=torch.int32, device=dev),
        }
        st = self._static
        pool = None
        for b in reversed(sizes):

            def fwd(b=b):
                meta = AttentionMeta(
                    st["slots"][:b], st["tables"][:b], st["lens"][:b], st["qsl"][: b + 1], 1
                )
                return self.decoder.logits(
                    self.decoder.forward(st["ids"][:b], st["pos"][:b], meta, self.kv)
                )

            with torch.inference_mode():
                fwd()  # warm-up: compiles/tunes kernels outside the capture
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = fwd()
            pool = g.pool()
            self.graphs[b] = (g, out)
        self.graph_sizes = sizes

    def _replay(self, batch: Batch, ids, pos, slots, lens) -> torch.Tensor:
        B = len(ids)
        b = next(s for s in self.graph_sizes if s >= B)
        st = self._static
        width = max(len(s.block_table) for s in batch.seqs)
        host = torch.zeros(4, b, dtype=torch.long)
        host[0, :B] = torch.tensor(ids)
        host[1, :B] = torch.tensor(pos)
        host[2, :B] = torch.tensor(slots)  # padding rows: slot 0 of block 0
        host[3, :] = 1
        host[3, :B] = torch.tensor(lens)
        host = host.to(self.device, non_blocking=True)
        st["ids"][:b].copy_(host[0])
        st["pos"][:b].copy_(host[1])
        st["slots"][:b].copy_(host[2])
        st["lens"][:b].copy_(host[3])
        st["tables"][:b].zero_()
        st["tables"][:B, :width].copy_(
            self._tables(batch, B, width).to(self.device, non_blocking=True)
        )
        g, out = self.graphs[b]
        g.replay()
        return out[:B]
