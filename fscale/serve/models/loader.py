"""Load a model for the engine: an HF directory (config.json + *.safetensors, no network)
or an ``nn.Module`` (fscale's GPT, or an HF Llama / GPT-2 module).

A directory is read one tensor at a time: each param is converted, sliced to this
rank's shard under tensor parallelism and moved to its device as soon as it is made,
so the host holds about one layer's tensors, never the whole model per rank.

Usage::

    lm = load_model("models/llama-3.1-8b", dtype=torch.bfloat16, device="cuda")
    lm = load_model("models/llama-3.1-8b", dtype=torch.bfloat16, device="cuda", tp=tp)
    lm = load_model(GPT(GPTConfig.tiny()), dtype=torch.float32, device="cpu")
    cfg = model_config("models/llama-3.1-8b")          # the config alone, nothing read
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from fscale.serve.models.decoder import DecoderConfig, LoadedModel, eos_ids, map_params
from fscale.serve.models.fscale_gpt import fscale_gpt
from fscale.serve.models.gpt2 import ARCHITECTURES as GPT2_ARCHS
from fscale.serve.models.gpt2 import gpt2_config, gpt2_params
from fscale.serve.models.llama import ARCHITECTURES as LLAMA_ARCHS
from fscale.serve.models.llama import MODEL_TYPES as LLAMA_TYPES
from fscale.serve.models.llama import llama_config, llama_params
from fscale.serve.parallel import TensorParallel, check_divisible, shard_param

SUPPORTED = (*LLAMA_ARCHS, *GPT2_ARCHS, "fscale.models.GPT")


def _family(config: dict, name: str) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in LLAMA_ARCHS or (arch is None and config.get("model_type") in LLAMA_TYPES):
        return "llama"
    if arch in GPT2_ARCHS or (arch is None and config.get("model_type") == "gpt2"):
        return "gpt2"
    raise ValueError(
        f"model {name!r}: architecture {arch or config.get('model_type')!r} is not "
        f"supported; supported: {list(SUPPORTED)}."
    )


def _config(config: dict, name: str) -> DecoderConfig:
    family = _family(config, name)
    return llama_config(config) if family == "llama" else gpt2_config(config)


def _build(config: dict, get, name: str, tokenizer_path, finish) -> LoadedModel:
    if _family(config, name) == "llama":
        cfg = llama_config(config)
        tie = bool(config.get("tie_word_embeddings", False))
        params = llama_params(cfg, get, tie=tie, finish=finish(cfg))
    else:
        cfg = gpt2_config(config)
        params = gpt2_params(cfg, get, finish=finish(cfg))
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


FSCALE_GPT = "fscale_gpt"  # config.json's model_type of fs.export's fscale GPT directories


def _fscale_gpt_module(config: dict, path: Path, *, weights: bool) -> nn.Module:
    """fscale's GPT from an ``fs.export`` directory (its GPTConfig fields in config.json),
    with the directory's weights when ``weights`` (else left as initialised: shapes only)."""
    import dataclasses

    from fscale.export import load_safetensors
    from fscale.functional import functional
    from fscale.models import GPT, GPTConfig

    names = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {k: v for k, v in config.items() if k in names}
    try:
        cfg = GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model {path.name!r}: config.json is not a GPTConfig ({e}).") from None
    with torch.device("meta") if not weights else contextlib.nullcontext():
        module = GPT(cfg)
    if weights:
        params, apply = functional(module)
        loaded = load_safetensors(path, params, model=apply)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(loaded[name])
    return module.eval()


def _is_fscale_gpt(model: nn.Module) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "tok_emb")


def _not_servable(model) -> ValueError:
    return ValueError(
        f"Engine cannot serve a {type(model).__name__}; pass a model directory or one "
        f"of {list(SUPPORTED)}."
    )


def _directory(path: Path) -> tuple[dict, list[Path]]:
    """A model directory's config.json and safetensors files, or a ValueError."""
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
    return _read_config(path), files


def _read_config(path: Path) -> dict:
    """config.json, its ``eos_token_id`` joined with generation_config.json's: HF
    ``generate`` stops at the latter's ids (Llama-3-Instruct's <|eot_id|> is only there)."""
    config = json.loads((path / "config.json").read_text())
    generation = path / "generation_config.json"
    if generation.exists():
        extra = eos_ids(json.loads(generation.read_text()).get("eos_token_id"))
        ids = eos_ids(config.get("eos_token_id")) + extra
        config["eos_token_id"] = list(dict.fromkeys(ids))  # union, first seen first
    return config


def model_config(model) -> DecoderConfig:
    """The :class:`DecoderConfig` of what ``load_model`` takes, without reading weights
    (a directory's config.json; the errors are ``load_model``'s)."""
    if isinstance(model, LoadedModel):
        return model.config
    if isinstance(model, nn.Module):
        if _is_fscale_gpt(model):
            return fscale_gpt(model).config
        if hasattr(model, "config") and hasattr(model.config, "to_dict"):
            return _config(model.config.to_dict(), type(model).__name__)
        raise _not_servable(model)
    path = Path(model)
    config = _directory(path)[0]
    if config.get("model_type") == FSCALE_GPT:
        return fscale_gpt(_fscale_gpt_module(config, path, weights=False)).config
    return _config(config, path.name)


def _finisher(dtype: torch.dtype, device, tp: TensorParallel | None, layers_device=None):
    """cfg -> finish(name, t): ``t`` sliced to this rank's shard (under ``tp``), in
    ``dtype``, contiguous on ``device`` (layer params on ``layers_device`` if given)."""

    def for_config(cfg: DecoderConfig):
        def finish(name: str, t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if tp is not None:
                t = shard_param(cfg, tp, name, t)
            to = layers_device if layers_device and name.startswith("layers.") else device
            return t.to(device=to, dtype=dtype).contiguous()

        return finish

    return for_config


def place(params: dict, dtype: torch.dtype, device, finish=None) -> dict:
    """``params`` in ``dtype`` on ``device`` (or each through ``finish(name, t)``)."""
    return map_params(params, finish or _finisher(dtype, device, None)(None))


def load_model(
    model,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    tp: TensorParallel | None = None,
    layers_device=None,
) -> LoadedModel:
    """A :class:`LoadedModel` with params in ``dtype`` on ``device``; with ``tp`` (a
    :class:`TensorParallel` of more than one rank) this rank's shard of them
    (``shard_param``; the config stays the whole model's); ``layers_device``: where the
    ``layers.*`` params go instead (``"cpu"`` for weights streamed from the host)."""
    if tp is not None and tp.size == 1:
        tp = None
    if tp is not None:
        check_divisible(model_config(model), tp.size)
    finish = _finisher(dtype, device, tp, layers_device)
    if isinstance(model, LoadedModel):
        cfg = model.config
        params = place(model.params, dtype, device, finish(cfg))
        return LoadedModel(cfg, params, model.name, model.tokenizer_path, dict(model.extra))
    if isinstance(model, nn.Module):
        if _is_fscale_gpt(model):
            lm = fscale_gpt(model)
            lm.params = place(lm.params, dtype, device, finish(lm.config))
            return lm
        if hasattr(model, "config") and hasattr(model.config, "to_dict"):
            sd = dict(model.state_dict())
            return _build(model.config.to_dict(), sd.get, type(model).__name__, None, finish)
        raise _not_servable(model)
    path = Path(model)
    config, files = _directory(path)
    if config.get("model_type") == FSCALE_GPT:  # fs.export of fscale's GPT
        module = _fscale_gpt_module(config, path, weights=True)
        lm = load_model(module, dtype=dtype, device=device, tp=tp, layers_device=layers_device)
        lm.name = path.name
        return lm
    from safetensors import safe_open

    # Under tensor parallelism a tensor is sliced on the host, then only the shard
    # moves; otherwise it moves first and q/k/v (gate/up) are joined on the device.
    build_on = "cpu" if tp is not None or layers_device is not None else device
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            fh = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            where.update(dict.fromkeys(fh.keys(), fh))

        def get(name: str) -> torch.Tensor | None:
            fh = where.get(name)
            return None if fh is None else fh.get_tensor(name).to(build_on, dtype)

        return _build(config, get, path.name, path, finish)
