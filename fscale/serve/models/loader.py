"""Load a model for the engine: an HF directory (config.json + *.safetensors, no network)
or an ``nn.Module`` (fscale's GPT, or an HF Llama / GPT-2 module).

Usage::

    lm = load_model("models/llama-3.1-8b", dtype=torch.bfloat16, device="cuda")
    lm = load_model(GPT(GPTConfig.tiny()), dtype=torch.float32, device="cpu")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fscale.serve.models.decoder import LoadedModel
from fscale.serve.models.fscale_gpt import fscale_gpt
from fscale.serve.models.gpt2 import ARCHITECTURES as GPT2_ARCHS
from fscale.serve.models.gpt2 import gpt2_config, gpt2_params
from fscale.serve.models.llama import ARCHITECTURES as LLAMA_ARCHS
from fscale.serve.models.llama import llama_config, llama_params

SUPPORTED = (*LLAMA_ARCHS, *GPT2_ARCHS, "fscale.models.GPT")


def _build(config: dict, get, name: str, tokenizer_path) -> LoadedModel:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in LLAMA_ARCHS or (arch is None and config.get("model_type") == "llama"):
        cfg = llama_config(config)
        params = llama_params(cfg, get, tie=bool(config.get("tie_word_embeddings", False)))
    elif arch in GPT2_ARCHS or (arch is None and config.get("model_type") == "gpt2"):
        cfg = gpt2_config(config)
        params = gpt2_params(cfg, get)
    else:
        raise ValueError(
            f"model {name!r}: architecture {arch or config.get('model_type')!r} is not "
            f"supported; supported: {list(SUPPORTED)}."
        )
    missing = [k for k, v in params.items() if v is None]
    if missing:
        raise ValueError(f"model {name!r}: checkpoint lacks tensors for {missing[:5]} ...")
    return LoadedModel(cfg, params, name, tokenizer_path)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def place(params: dict, dtype: torch.dtype, device) -> dict:
    """``params`` in ``dtype`` on ``device``."""
    # Each distinct tensor is converted once, so tied weights stay one tensor.
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in params.items():
        if id(v) not in done:
            done[id(v)] = v.detach().to(device=device, dtype=dtype).contiguous()
        out[k] = done[id(v)]
    return out


def load_model(model, *, dtype: torch.dtype = torch.float32, device="cpu") -> LoadedModel:
    """A :class:`LoadedModel` with params in ``dtype`` on ``device``."""
    if isinstance(model, LoadedModel):
        return LoadedModel(
            model.config, place(model.params, dtype, device), model.name, model.tokenizer_path
        )
    if isinstance(model, nn.Module):
        if hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "tok_emb"):
            lm = fscale_gpt(model)
        elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
            sd = dict(model.state_dict())
            lm = _build(model.config.to_dict(), sd.get, type(model).__name__, None)
        else:
            raise ValueError(
                f"Engine cannot serve a {type(model).__name__}; pass a model directory or one "
                f"of {list(SUPPORTED)}."
            )
        lm.params = place(lm.params, dtype, device)
        return lm
    path = Path(model)
    if not (path / "config.json").exists():
        raise ValueError(
            f"model directory {str(path)!r} has no config.json; pass a Hugging Face model "
            "directory (config.json + *.safetensors) or an nn.Module."
        )
    files = _safetensors_files(path)
    if not files:
        raise ValueError(
            f"model directory {str(path)!r} has no *.safetensors weights; save the model with "
            "save_pretrained(safe_serialization=True)."
        )
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    config = json.loads((path / "config.json").read_text())
    lm = _build(config, tensors.get, path.name, path)
    lm.params = place(lm.params, dtype, device)
    return lm
