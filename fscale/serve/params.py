"""What a request asks for (``SamplingParams``) and what it gets back (``RequestOutput``).

Usage::

    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=1, stop=["\\n"])
    out = engine.generate("Once upon a time", params)[0]   # a finished RequestOutput
    print(out.text, out.finish_reason)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Args:
      max_tokens: tokens to generate at most (>= 1).
      temperature: 0 is greedy (argmax); otherwise logits / temperature (> 0).
      top_k: keep the k most likely tokens; 0 or -1 is off.
      top_p: keep the smallest set of tokens whose probability reaches p, in (0, 1].
      seed: a per-request generator: the same seed gives the same tokens in any batch.
      stop: strings that end the output (detected on the text, excluded from it).
      stop_token_ids: token ids that end the output (kept in ``token_ids``).
      ignore_eos: keep going past the tokenizer's eos token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = ()
    stop_token_ids: list[int] | tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name: str, allowed: str):
            value = getattr(self, name)
            return ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}.")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise bad("max_tokens", "an int >= 1")
        if self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "an int >= 1, or 0 / -1 for off")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise bad("top_p", "a number in (0, 1]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise bad("seed", "an int or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of token ids (ints >= 0)")
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class RequestOutput:
    """One request's progress after a step (or its final state).

    ``token_ids``/``text`` hold everything generated so far; ``new_token_ids``/
    ``delta_text`` what this step added (what a stream sends). ``text`` excludes a
    matched stop string; text of a trailing incomplete UTF-8 character is held back
    until it decodes. ``num_cached_tokens``: prompt tokens served from the prefix cache.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    num_cached_tokens: int = 0
