"""Reference models used by tests, examples and benchmarks."""

from fscale.models.gpt import GPT, Block, GPTConfig, gpt_loss
from fscale.models.moe import Experts, MoE

__all__ = ["GPT", "Block", "GPTConfig", "gpt_loss", "MoE", "Experts"]
