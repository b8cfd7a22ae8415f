"""Decoder models the engine runs: one paged forward, three weight mappings.

Usage::

    lm = load_model("path/to/llama-dir", dtype=torch.bfloat16, device="cuda")
    lm = load_model(fscale_gpt_module)          # or an nn.Module (fscale GPT, HF Llama/GPT-2)
"""

from fscale.serve.models.decoder import Decoder, DecoderConfig, LoadedModel
from fscale.serve.models.loader import SUPPORTED, load_model

__all__ = ["SUPPORTED", "Decoder", "DecoderConfig", "LoadedModel", "load_model"]
