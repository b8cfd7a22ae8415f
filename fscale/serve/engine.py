"""The serving engine: requests in, tokens out, one scheduled forward per ``step()``.

Usage::

    from fscale.serve import Engine, SamplingParams
    engine = Engine("path/to/llama-dir", quantize="e3m2", max_tokens_per_step=1024)
    outs = engine.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
    for out in engine.stream("Once upon a time", SamplingParams(temperature=0.8, seed=1)):
        print(out.delta_text, end="", flush=True)

    engine.add_request("r1", "Hi", SamplingParams())     # the server's loop
    while engine.has_unfinished():
        for out in engine.step(): ...

Tensor parallel (see fscale/serve/parallel.py, launched with torchrun)::

    rank, world, device = fs.init_distributed("cuda")
    engine = Engine("path/to/llama-dir", tensor_parallel=world)   # every rank
    if engine.is_leader:                 # rank 0 takes requests, as above
        outs = engine.generate(prompts, params)
        engine.shutdown()                # releases the other ranks' follow()
    else:
        engine.follow()                  # step() until rank 0 shuts down

[Note: overlapped steps]
With ``overlap`` (the default on CUDA) ``step()`` launches step k's forward before it
waits for step k-1's tokens, so the host's work (scheduling, inputs, launching, then
reading tokens, stop checks, detokenizing, outputs) runs while the GPU computes
instead of between its forwards (vLLM's async scheduling). Step k-1's sampled tokens
stay on the device: a sequence that decodes in step k counts its input token in
``num_pending`` and the runner copies it from them on the device. ``step()`` then
returns step k-1's outputs, one step later than without overlap. A sequence that step
k-1 finished by a stop token or string ran one token too many in step k: the token is
dropped, never reported, and its blocks are released after step k was queued (later
steps use them after it on the same stream). One that ends by length is known to end
before its token is read (``last_pending``) and is not scheduled again, so no step
reaches past max_tokens or max_model_len. Prefix-cache commits of a step's blocks wait until its
tokens are known. Greedy and seeded outputs equal the non-overlapped engine's; an
unseeded sampled request may draw differently, since a dropped token consumed a draw
of the engine's shared generator. Off under tensor parallelism (its ranks follow rank
0's step in lockstep).

[Note: threading]
The engine is single-threaded: nothing in it takes a lock. A server runs ``step()`` in
one background thread and calls ``add_request`` / ``abort`` / ``stats`` from others
while holding a lock of its own around every call (``step`` included).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from fscale.hw import comm
from fscale.serve.errors import EngineFull
from fscale.serve.kv_cache import BlockManager
from fscale.serve.models.decoder import Decoder, kv_heads_per_rank
from fscale.serve.models.loader import load_model, model_config
from fscale.serve.parallel import (
    ROW_PARALLEL,
    TensorParallel,
    agree_min,
    broadcast_messages,
    check_divisible,
)
from fscale.serve.params import RequestOutput, SamplingParams
from fscale.serve.runner import ModelRunner
from fscale.serve.sampling import sample_tokens
from fscale.serve.scheduler import POLICIES, Scheduler
from fscale.serve.sequence import Sequence, Status
from fscale.serve.tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger(__name__)


class Engine:
    """A paged-KV, continuously batched inference engine (see the module doc).

    Args:
      model: a Hugging Face model directory (config.json + *.safetensors), an
        ``nn.Module`` (fscale's GPT, HF Llama / GPT-2), or a ``LoadedModel``; a
        directory ``fs.export`` wrote for fscale's GPT (config.json model_type
        ``fscale_gpt``) too.
      dtype: weights and KV dtype; default bf16 on CUDA, fp32 on CPU.
      device: default ``cuda`` when available, else ``cpu``.
      quantize: an ``fs.quantize`` format ("e3m2", "int8", "int4", ...) for the layer
        linears (not embeddings, norms or the head); their matmuls use its kernels.
      quantize_head: quantize the output head too (as TensorRT-LLM's
        ``--quantize_lm_head``): at batch 1 the bf16 head of a 128K vocabulary is a
        sixth of an FP6 8B model's bytes. A head tied to the embedding gets a quantized
        copy; the embedding stays as it is.
      max_tokens_per_step: tokens per forward (the Dynamic SplitFuse budget). It
        bounds each step's time, so it trades TPOT for throughput: 1024 by default,
        which held p99 TPOT <= 50 ms up to the compute ceiling of an 8B model on an
        H100 on both of ``bench/serve.py``'s workloads, where 512 fell behind on
        512/128 on one machine (twice the weight reads per token served).
      kv_cache_gib / num_blocks / block_size: the paged cache's size (num_blocks wins).
      max_model_len: prompt + output limit; default the model's max positions, lowered
        (with a logged warning) to the tokens the KV cache holds. A value given here
        that the cache cannot hold raises ValueError.
      max_num_seqs: running sequences at most; max_waiting: queue length before
        ``add_request`` raises :class:`EngineFull`.
      scheduler: "splitfuse" or "prefill_first".
      prefix_caching: share cached KV blocks of equal prompt prefixes.
      cuda_graphs: replay captured graphs for decode batches (CUDA only).
      prefill_graphs: also capture prefill and mixed steps piecewise, everything but
        attention, per token bucket ([Note: piecewise graphs of mixed steps] in
        runner.py; fused kernels, CUDA, one rank). None (default): where the host's
        launch time would show, that is with quantized weights (their eager launches
        take longer than the GPU's work) or without overlapped steps; plain weights with
        overlap run prefill eagerly, where padding to a bucket only costs (2-4% of
        throughput at 64-256 concurrent requests, ``bench/serve.py`` part a). True:
        wherever possible, with a warning where not; False: prefill steps run eagerly.
      offload_weights: keep layer weights in host memory, streamed a layer ahead.
      fused_kernels: run the decoder's elementwise pieces as fused kernels (residual
        add + RMSNorm, RoPE + KV write, SiLU * up; Llama-style models); default on for
        CUDA, off elsewhere (the CPU lowerings are the eager references). Kernels that
        fail their start-up self-check or the graph capture fall back with a warning.
      overlap: queue each step's forward before reading the last step's tokens
        ([Note: overlapped steps]); outputs then come one ``step()`` later. None
        (default): on CUDA with one rank; on CPU, where work is synchronous, off.
      seed: the generator of requests sampled without their own seed.
      tensor_parallel: ranks that split each layer (Megatron-style, see
        ``fscale/serve/parallel.py``): 1 (default), an int dividing the launched world
        (consecutive ranks form a group), or ``"world"`` for the launched world's size.
        Every rank of the group constructs the engine with the same arguments; the
        group's rank 0 takes requests, the others run :meth:`follow`. Heads, KV heads
        and MLP units must divide by it. CUDA graphs are off when it is > 1.
    """

    def __init__(
        self,
        model,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        quantize: str | None = None,
        quantize_head: bool = False,
        max_tokens_per_step: int = 1024,
        kv_cache_gib: float | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_waiting: int = 1024,
        scheduler: str = "splitfuse",
        prefix_caching: bool = True,
        cuda_graphs: bool = True,
        prefill_graphs: bool | None = None,
        offload_weights: bool = False,
        seed: int = 0,
        fused_kernels: bool | None = None,
        tensor_parallel: int | str = 1,
        overlap: bool | None = None,
    ):
        if scheduler not in POLICIES:
            raise ValueError(f"scheduler={scheduler!r} is not known; use one of {list(POLICIES)}.")
        if quantize is not None:
            from fscale.transforms.quantize import codec

            codec(quantize)  # an unknown format raises here, naming the valid ones
        elif quantize_head:
            raise ValueError("quantize_head=True needs a quantize= format for the head.")
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        tp_size = comm.world_size() if tensor_parallel == "world" else tensor_parallel
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(
                f"tensor_parallel must be an int >= 1 or 'world', got {tensor_parallel!r}."
            )
        # Before any collective: every rank raises alike.
        check_divisible(model_config(model), tp_size)
        self.tp = TensorParallel.create(tp_size)
        lm = load_model(
            model,
            dtype=self.dtype,
            device=self.device,
            tp=self.tp,
            layers_device="cpu" if offload_weights else None,  # streamed a layer ahead
        )
        if quantize is not None:
            lm.params = _quantize(lm.params, quantize, self.tp, self.device, quantize_head)
        self.quantize = quantize
        self.model_config = cfg = lm.config
        self.model_name = lm.name if not isinstance(model, (str, Path)) else Path(model).name
        self.tokenizer = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else ByteTokenizer()
        self.eos_token_ids = _stop_ids(cfg, self.tokenizer)
        self.max_model_len = max_model_len or cfg.max_positions
        if self.max_model_len > cfg.max_positions or self.max_model_len < 1:
            raise ValueError(
                f"max_model_len={max_model_len} must be in [1, {cfg.max_positions}] "
                f"(the model's max positions)."
            )
        self.decoder = Decoder(lm, offload=offload_weights, device=self.device, tp=self.tp)
        if fused_kernels or (
            fused_kernels is None and self.device.type == "cuda" and self.decoder.fusable()
        ):
            self.decoder.enable_fused()
        num_blocks = num_blocks or self._num_blocks(kv_cache_gib, block_size, max_num_seqs)
        # Every rank must manage the same blocks (free memory may differ per GPU).
        num_blocks = agree_min(self.tp, num_blocks, self.device)
        self._fit_to_cache(max_model_len, num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(
            self.blocks,
            max_tokens_per_step=max_tokens_per_step,
            max_num_seqs=max_num_seqs,
            policy=scheduler,
        )
        if overlap is None:
            overlap = self.device.type == "cuda"
        self.overlap = bool(overlap) and self.tp.size == 1
        if prefill_graphs is None and self.overlap and quantize is None:
            prefill_graphs = False  # see the docstring: eager launches hide behind the GPU
        self.runner = ModelRunner(
            self.decoder,
            num_blocks=num_blocks,
            block_size=block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=min(max_num_seqs, max_tokens_per_step),
            cuda_graphs=cuda_graphs,
            prefill_graphs=prefill_graphs,
            max_tokens_per_step=max_tokens_per_step,
            # [Note: warm-up at start] in runner.py; on CPU nothing compiles or tunes.
            warm_up_tokens=max_tokens_per_step if self.device.type == "cuda" else 0,
        )
        self.max_waiting = max_waiting
        self._inflight: _Launched | None = None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._counters = dict(prompt_tokens_total=0, generation_tokens_total=0, steps_total=0)
        self._outbox: list[tuple] = []  # rank 0's requests / aborts for the other ranks
        self._stopped = False

    # -- sizing -----------------------------------------------------------------------------

    def _num_blocks(self, gib: float | None, block_size: int, max_num_seqs: int) -> int:
        cfg = self.model_config
        kv_heads = kv_heads_per_rank(cfg, self.tp.size)  # this rank's
        per_block = 2 * cfg.num_layers * block_size * kv_heads * cfg.head_dim
        per_block *= torch.empty((), dtype=self.dtype).element_size()
        if gib is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                gib = max(0.5, 0.85 * free / 2**30 - 2.0)  # headroom: activations, graphs
            else:  # enough for a few full-length sequences, at most 1 GiB
                want = min(max_num_seqs, 8) * _cdiv(self.max_model_len, block_size) * per_block
                gib = min(1.0, want / 2**30)
        return max(2, int(gib * 2**30) // per_block + 1)

    def _fit_to_cache(self, requested: int | None, num_blocks: int, block_size: int) -> None:
        """Keep ``max_model_len`` within the KV cache's tokens: else every request left
        without max_tokens (the server gives it the rest of the context) is refused.
        The model's own context is lowered (as vLLM does); one the caller asked for raises."""
        capacity = (num_blocks - 1) * block_size  # block 0 is never handed out
        if self.max_model_len <= capacity:
            return
        if requested is not None:
            raise ValueError(
                f"max_model_len={requested} does not fit in the KV cache, which holds "
                f"{capacity} tokens ({num_blocks - 1} blocks x {block_size}); give a larger "
                "kv_cache_gib (or num_blocks) or a smaller max_model_len."
            )
        log.warning(
            "the model's context of %d tokens does not fit in the KV cache (%d tokens); "
            "serving with max_model_len=%d. A larger kv_cache_gib allows more.",
            self.max_model_len,
            capacity,
            capacity,
        )
        self.max_model_len = capacity

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; see the class doc for the errors it raises."""
        self._leader_only("add_request")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}.")
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use; pick a unique id.")
        ids = self._encode(prompt)
        limit = self.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds max_model_len={limit}; shorten the "
                "prompt or lower max_tokens."
            )
        if self.blocks.blocks_for(len(ids) + params.max_tokens) > self.blocks.total:
            raise ValueError(
                f"prompt + max_tokens = {len(ids) + params.max_tokens} tokens need more KV blocks "
                f"than the whole cache holds ({self.blocks.total} x {self.blocks.block_size}); "
                "lower max_tokens or give the engine a larger kv_cache_gib / num_blocks."
            )
        if len(self.scheduler.waiting) >= self.max_waiting:
            raise EngineFull(
                f"{len(self.scheduler.waiting)} requests are waiting (max_waiting="
                f"{self.max_waiting}); retry later."
            )
        self._queue(request_id, ids, params)
        if self.tp.size > 1:
            self._outbox.append(("add", request_id, ids, params))

    def _queue(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, ids, params, arrival=next(self._arrivals), generator=gen)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _leader_only(self, what: str) -> None:
        if not self.tp.leader:
            raise RuntimeError(
                f"{what}: this is rank {self.tp.rank} of a tensor-parallel group; requests "
                "enter on its rank 0 (broadcast each step). Call engine.follow() here."
            )

    def _encode(self, prompt) -> list[int]:
        """A prompt's token ids (text with the tokenizer's special tokens), checked."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise ValueError(
                f"prompt must be a str or a list of token ids (ints), got {type(prompt).__name__}."
            )
        if not ids:
            raise ValueError("the prompt is empty; give at least one token.")
        self._check_vocab(ids, from_text=isinstance(prompt, str))
        return ids

    def _check_vocab(self, ids: list[int], *, from_text: bool) -> None:
        """Reject ids the embedding lacks now: in a step they would fail every request."""
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            hint = " (the tokenizer's vocabulary is larger than the model's)" if from_text else ""
            raise ValueError(f"prompt token ids {bad[:5]} are out of range [0, {V}){hint}.")

    def abort(self, request_id: str) -> None:
        """Cancel a request: its blocks are freed now, its final output comes with the next step."""
        self._leader_only("abort")
        if self.tp.size > 1:
            self._outbox.append(("abort", request_id))
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        self._aborted.append(seq)

    def started(self, request_id: str) -> bool:
        """Whether the request has left the waiting queue for the first time (it got its
        KV blocks and its first prompt chunk went into a step), or is finished, aborted
        or unknown: false only while it waits to start. A preempted request, queued
        again after it ran, stays started."""
        seq = self._seqs.get(request_id)
        return seq is None or seq.started or seq.status is Status.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._aborted) or self._inflight is not None

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; outputs of requests that got tokens or finished.

        Under tensor parallelism every rank of the group calls it (rank 0 from its
        server loop, the others from :meth:`follow`); it starts with rank 0's new
        requests and aborts broadcast to the others. That broadcast happens even when
        nothing is scheduled: an idle step on rank 0 is the server's heartbeat, which
        keeps the others from waiting in it until the collective timeout."""
        if self.tp.size > 1 and self._sync():
            return []
        outputs = [self._output(seq, []) for seq in self._aborted]
        for seq in self._aborted:
            self._seqs.pop(seq.request_id, None)
        self._aborted = []
        batch = self.scheduler.schedule()
        last, self._inflight = self._inflight, None
        launched = None
        if batch.seqs:
            try:
                launched = self._launch(batch, last)
            except BaseException:
                self._inflight = last  # still to be read by the next step
                raise
        if last is not None:
            outputs += self._resolve(last)
        if launched is not None:
            if self.overlap:
                self._inflight = launched
            else:
                outputs += self._resolve(launched)
        return outputs

    def _launch(self, batch, last: _Launched | None) -> _Launched:
        """Queue ``batch``'s forward and its sampling; nothing waits for the device."""
        logits, sampled = self.runner.run(batch, last.tokens if last is not None else None)
        self._counters["steps_total"] += 1
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            # Prompt tokens: those computed for the first time (not recomputed after preemption).
            self._counters["prompt_tokens_total"] += max(
                0,
                min(seq.num_computed + n, seq.num_prompt)
                - max(seq.num_computed, seq.num_cached_tokens or 0),
            )
            seq.num_computed += n
            seq.started = True
        launched = _Launched(list(batch.seqs), sampled)
        if sampled:
            launched.tokens = sample_tokens(
                logits,
                [s.params for s in sampled],
                [s.generator for s in sampled],
                self.generator,
                greedy=self.runner.greedy,
            )
            # A copy taken now: the tokens may sit in a graph's static output, which
            # the next step's replay overwrites before they are read.
            if self.overlap and self.device.type == "cuda":
                host = torch.empty(len(sampled), dtype=torch.long, pin_memory=True)
                launched.host = host.copy_(launched.tokens, non_blocking=True)
                launched.ready = torch.cuda.Event()
                launched.ready.record()
            else:
                launched.host = launched.tokens.to("cpu", copy=True)
            for i, seq in enumerate(sampled):
                # Up to two: the last step's (not read yet) and this one's.
                seq.num_pending += 1
                seq.pending_index = i
                # Certain to be its last token: never schedule past it (the Note).
                seq.last_pending = (
                    len(seq.output_ids) + seq.num_pending >= seq.params.max_tokens
                    or seq.num_tokens >= self.max_model_len
                )
        return launched

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens: append them, commit blocks, check stops."""
        tokens: list[int] = []
        if launched.sampled:
            if launched.ready is not None:
                launched.ready.synchronize()
            tokens = launched.host.tolist()
        for seq, tok in zip(launched.sampled, tokens, strict=True):
            seq.num_pending -= 1
            seq.last_pending = seq.last_pending and seq.num_pending > 0
            if seq.status is not Status.FINISHED:  # else aborted or done: dropped
                seq.token_ids.append(tok)
        for seq in launched.seqs:
            if seq.status is not Status.FINISHED:
                self.blocks.commit(seq)
        outputs = []
        for seq, tok in zip(launched.sampled, tokens, strict=True):
            if seq.status is Status.FINISHED:
                continue
            self._counters["generation_tokens_total"] += 1
            self._check_finished(seq)
            outputs.append(self._output(seq, [tok]))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self._seqs.pop(seq.request_id, None)
        return outputs

    # -- tensor parallelism -----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this rank takes requests (rank 0 of its tensor-parallel group)."""
        return self.tp.leader

    def _sync(self) -> bool:
        """Broadcast rank 0's outbox; other ranks apply it. True when told to stop."""
        msgs = broadcast_messages(self.tp, self._outbox, self.device)
        self._outbox = []
        if self.tp.leader:
            return False
        for m in msgs:
            if m[0] == "add":
                self._queue(*m[1:])
            elif m[0] == "abort":
                self._abort(m[1])
            elif m[0] == "stop":
                self._stopped = True
        return self._stopped

    def follow(self, on_output=None) -> None:
        """A non-leader rank's loop: ``step()`` (in lockstep with rank 0's) until rank 0
        calls :meth:`shutdown`; ``on_output(out)`` sees every output this rank makes."""
        if self.tp.leader:
            raise RuntimeError("follow() is for ranks other than 0 of a tensor-parallel group.")
        while not self._stopped:
            for out in self.step():
                if on_output is not None:
                    on_output(out)

    def shutdown(self) -> None:
        """On rank 0: end the other ranks' :meth:`follow` (requests still queued are
        applied there first). A no-op without tensor parallelism."""
        if self.tp.size > 1 and self.tp.leader and not self._stopped:
            self._outbox.append(("stop",))
            broadcast_messages(self.tp, self._outbox, self.device)
            self._outbox = []
            self._stopped = True

    def _check_finished(self, seq: Sequence) -> None:
        p, tok = seq.params, seq.token_ids[-1]
        if tok in p.stop_token_ids or (tok in self.eos_token_ids and not p.ignore_eos):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
        self._detokenize(seq)

    def _detokenize(self, seq: Sequence) -> None:
        """Extend ``seq.text`` with what the new token completes; stop strings end it.

        [Note: detokenizing in context]
        The new text is ``decode(ids[prefix_offset:])`` minus ``decode(ids[prefix_offset:
        read_offset])`` over prompt + output ids. The offsets start a few prompt tokens
        before the output (``DETOKENIZE_CONTEXT``), so a first output token is decoded as
        a continuation: SentencePiece-style (Metaspace) decoders strip the leading space
        of a text's first token, which decoding the output alone would lose. The text
        then equals HF's ``decode(prompt + output)`` after ``decode(prompt)``.
        """
        ids = seq.token_ids
        stopped_by_token = seq.finish_reason == "stop"
        if stopped_by_token:
            ids = ids[:-1]  # the stop / eos token is not text
        decode = self.tokenizer.decode
        prefix = decode(ids[seq.prefix_offset : seq.read_offset])
        full = decode(ids[seq.prefix_offset :])
        if seq.finish_reason is not None or (
            len(full) > len(prefix) and not full.endswith("\ufffd")
        ):
            seq.text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        stops = seq.params.stop
        if stops:
            start = max(0, len(seq.reported_text) - max(len(s) for s in stops))
            hits = [i for i in (seq.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        finished = seq.finish_reason is not None
        visible = seq.text
        if not finished and seq.params.stop:
            # Hold back a tail that could still become a stop string (it would be cut).
            hold = max(
                (k for s in seq.params.stop for k in range(1, len(s)) if seq.text.endswith(s[:k])),
                default=0,
            )
            visible = seq.text[: len(seq.text) - hold]
        delta = visible[len(seq.reported_text) :]
        seq.reported_text = visible
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            new_token_ids=new,
            text=visible,
            delta_text=delta,
            finished=finished,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )

    # -- conveniences -----------------------------------------------------------------------

    def generate(
        self, prompts, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; final outputs in input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple))
            and prompts
            and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams.")
        rids = [f"generate-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(rids, prompts, params, strict=True):
            self.add_request(rid, prompt, p)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(rids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in rids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs (deltas) until it finishes; closing aborts it."""
        rid = f"stream-{next(self._ids)}"
        self.add_request(rid, prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(rid)

    def stats(self) -> dict:
        """Queue, cache and token counters (what the server exports as metrics)."""
        used, total = self.blocks.num_used, self.blocks.total
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "num_preempted_total": self.scheduler.num_preempted_total,
            "kv_blocks_used": used,
            "kv_blocks_total": total,
            "kv_usage": used / total,
            **self._counters,
        }


class _Launched:
    """A step whose forward is queued: its sequences, those it samples, and their
    tokens (device; with ``host``/``ready``, a pinned copy and its event)."""

    __slots__ = ("seqs", "sampled", "tokens", "host", "ready")

    def __init__(self, seqs: list[Sequence], sampled: list[Sequence]):
        self.seqs, self.sampled = seqs, sampled
        self.tokens: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.ready = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stop_ids(cfg, tokenizer) -> frozenset[int]:
    """The ids that end a generation: config.json's and generation_config.json's eos
    ids (``cfg``; a model may list several) and the tokenizer's eos token."""
    ids = set(cfg.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return frozenset(ids)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quantize(
    params: dict, fmt: str, tp: TensorParallel, device: torch.device, head: bool = False
) -> dict:
    """``fs.quantize`` the layer linears (and with ``head`` the head); the int group size
    is the largest dividing every K. Under tensor parallelism see [Note: quantized
    shards] (the head's shards are whole vocabulary rows)."""
    from fscale.transforms.quantize import codec, quantize

    ks = [v.shape[1] for k, v in params.items() if k.startswith("layers.") and v.dim() == 2]
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), 32)
    row_absmax = None
    if tp.size > 1 and codec(fmt).row_scaled:

        def row_absmax(name: str, absmax: torch.Tensor) -> torch.Tensor:
            if not name.endswith(ROW_PARALLEL):
                return absmax
            whole = absmax.to(device)
            comm.all_reduce(whole, op="max", group=tp.group, tag="serve.quant_scales")
            return whole.to(absmax.device)

    def selected(name: str, t: torch.Tensor) -> bool:
        return (name.startswith("layers.") and t.dim() == 2) or (head and name == "head.weight")

    # pad=True lets any shape through (tiny test models have K=64).
    return quantize(
        params,
        fmt,
        select=selected,
        group_size=group,
        pad=True,
        row_absmax=row_absmax,
    )


# [Note: quantized shards]
# Under tensor parallelism each rank quantizes its own shard. Column-parallel weights
# (q/k/v, gate/up, fc: whole rows) pack exactly as those rows of the whole weight. The
# row-parallel ones (o, down: a K slice of every row) would get scales from their
# slice's absmax; for the formats whose one scale per row comes from the row's absmax
# (FPx, w8a8, fp8), one all-reduce (max) per weight gives every rank the whole row's,
# so each shard is the slice of what one rank would pack and the group serves the same
# quantized model as a single GPU (tested bit for bit). The group-wise int formats
# match where the group size divides every shard's K (real models: 128). w8a8 and fp8
# still quantize each token's activations over the rank's K slice (no collective per
# product), so their outputs differ slightly from one rank's.
