"""Reference models used by tests, examples and benchmarks."""

from fscale.models.gpt import GPT, Block, GPTConfig, gpt_loss

__all__ = ["GPT", "Block", "GPTConfig", "gpt_loss"]
