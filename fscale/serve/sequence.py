"""A request inside the engine: its tokens, KV blocks, progress and text state.

Usage::

    seq = Sequence("r1", [1, 2, 3], SamplingParams(), arrival=0)
    seq.remaining            # tokens whose K/V is not in the cache yet (3)
"""

from __future__ import annotations

from enum import Enum

import torch

from fscale.serve.params import SamplingParams

# Prompt tokens decoded ahead of the output: enough for a tokenizer to know that the
# output does not start the text (SentencePiece drops a leading space there).
DETOKENIZE_CONTEXT = 5


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request. ``token_ids`` is prompt + output; ``num_computed`` of them have K/V.

    [Note: a sequence's progress]
    ``num_computed`` counts the leading tokens whose K/V sit in the blocks of
    ``block_table``. A step feeds ``token_ids[num_computed : num_computed + n]``; when that
    reaches the end of ``token_ids`` the last position's logits give the next token,
    which is appended (so a decoding sequence always has ``remaining == 1``). Preemption
    releases the blocks and sets ``num_computed = 0``: the prompt and the output so far
    are recomputed later (the prefix cache usually still holds most of them).

    Under overlapped steps ([Note: overlapped steps] in engine.py) the next token may
    still be on the device: ``num_pending`` counts such tokens (up to two: the last
    step's, not read yet, and the one just launched), ``pending_index`` is the newest
    one's row in the last launched step's sampled tokens, and ``num_tokens`` includes
    them. A sequence whose newest pending token is certain to be its last (max_tokens
    or max_model_len) has ``last_pending`` set: nothing is ``remaining``, so it is not
    scheduled again.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        arrival: int,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.arrival = arrival
        self.generator = generator
        self.status = Status.WAITING
        self.started = False  # scheduled at least once; preemption does not reset it
        self.finish_reason: str | None = None
        self.num_computed = 0
        self.num_pending = 0
        self.pending_index = -1
        self.last_pending = False
        self.block_table: list[int] = []
        self.num_cached_tokens: int | None = None  # prefix-cache hits at first admission
        # Prefix-cache hash chain over the full blocks registered so far.
        self.num_hashed = 0
        self.last_hash: bytes | None = None
        # Output bookkeeping (engine.py): tokens/text already reported.
        self.num_reported = 0
        self.text = ""
        self.reported_text = ""
        # Incremental detokenization over token_ids ([Note: detokenizing in context] in
        # engine.py): the output's text starts after the last prompt tokens' text.
        self.read_offset = len(self.prompt_ids)
        self.prefix_offset = max(0, self.read_offset - DETOKENIZE_CONTEXT)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_tokens(self) -> int:
        """Tokens so far, those still on the device included."""
        return len(self.token_ids) + self.num_pending

    @property
    def remaining(self) -> int:
        return 0 if self.last_pending else self.num_tokens - self.num_computed

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={len(self.token_ids)}, "
            f"computed={self.num_computed}, blocks={self.block_table}, {self.status.value})"
        )
