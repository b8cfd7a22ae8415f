"""Full params <-> safetensors files under the module's ``state_dict`` names.

``export`` is how a trained model leaves fscale: one ``.safetensors`` file of full,
unsharded tensors (fp32 masters by default), keyed as ``module.state_dict()`` keys
them, so ``transformers``' ``from_pretrained``, ``safetensors.torch.load_file`` +
``module.load_state_dict(strict=True)`` or any other reader of the format loads it.
``load_safetensors`` and ``load_state_dict`` go the other way, into the params dict
of ``fs.functional``.

[Note: names of tied weights]
``fs.functional`` keeps a tied Parameter once, under its first name (GPT-2's
``transformer.wte.weight``; its ``lm_head.weight`` is an alias). ``module.state_dict()``
lists it under every name, and by default so does the file (``tied="all"``): then a
strict ``load_state_dict`` of any module finds every key. safetensors refuses tensors
that share memory, so each alias is written as its own copy. ``tied="first"`` writes the
first name only, as ``transformers``' ``save_pretrained`` does; ``from_pretrained``
re-ties the head either way (checked in ``tests/test_export.py``). Loading accepts a
tied weight under any of its names, and when a file holds several they must agree.

[Note: export is a collective]
Sharded (ZeRO-3) params and the fp32 masters of stages 1/2 are gathered first with
``fs.gather_params``: every rank must call ``export``. Rank 0 alone writes; the others
then learn, through one all-reduce, whether it succeeded, so a failed write raises on
every rank instead of leaving the others to hang in their next collective. The write is
atomic: a temporary file in the target directory, fsync, rename, fsync of the directory;
a crash at any moment leaves the old file (or none), never a truncated one.

Usage::

    fs.export("out/gpt2", params, state, model=model)   # out/gpt2/model.safetensors (+ config.json)
    model = transformers.AutoModelForCausalLM.from_pretrained("out/gpt2")

    params, apply = fs.functional(model)
    params = fs.load_safetensors("out/gpt2", params, model=apply)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from fscale.functional import Apply
from fscale.hw import comm
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms.quantize import dequantize
from fscale.transforms.zero import gather_params

FILE_NAME = "model.safetensors"  # what transformers' from_pretrained looks for in a directory
INDEX_NAME = "model.safetensors.index.json"  # a checkpoint sharded over several files
CONFIG_NAME = "config.json"
# config.json keys that mark fscale's GPT (its GPTConfig fields beside them), as HF's
# model_type / architectures mark theirs: fscale.serve's loader builds the GPT from it.
FSCALE_GPT_TYPE = {"model_type": "fscale_gpt", "architectures": ["fscale.models.GPT"]}

__all__ = ["export", "load_safetensors", "load_state_dict"]


def export(
    path: str | os.PathLike,
    params: dict[str, torch.Tensor],
    state: dict | None = None,
    *,
    model: nn.Module | Apply | None = None,
    dtype: torch.dtype | None = torch.float32,
    tied: Literal["all", "first"] = "all",
    metadata: Mapping[str, str] | None = None,
    config: Any = None,
) -> pathlib.Path:
    """Write full params as one safetensors file, named as the module names them.

    Args:
      path: a ``.safetensors`` file, or a directory (created) that receives
        ``model.safetensors`` and, for a Hugging Face model, its ``config.json``:
        then ``from_pretrained(path)`` loads it.
      params: the params dict, as ``fs.functional`` or a step returned it (ZeRO shards
        and offloaded params included).
      state: the step's state: with it, stages 1/2 under mixed precision export the
        fp32 masters instead of the compute-dtype params.
      model: the module (or ``fs.functional``'s apply). With it, keys are the module's
        ``state_dict`` keys: tied weights under their aliases too ([Note: names of tied
        weights]), persistent buffers and frozen params from the module. Without it,
        the params' own names.
      dtype: floating tensors are cast to it (fp32 by default); None keeps each one's.
      tied: ``"all"`` writes a tied weight under every name, ``"first"`` under its
        first name only (``save_pretrained``'s convention, a smaller file).
      metadata: extra string pairs for the file header.
      config: written as ``config.json`` beside ``model.safetensors`` (``path`` a
        directory): a ``transformers`` config (``save_pretrained``), a dataclass or a
        mapping (as JSON). By default the model's ``config`` attribute, where it has one,
        or fscale's GPT's ``GPTConfig`` (marked ``model_type: fscale_gpt``, which
        ``fscale.serve`` loads).
        A directory export with neither warns: ``from_pretrained`` needs a config.

    Returns:
      The file written (on every rank).

    Raises:
      ValueError: a param the module does not have, or a bad option.
      RuntimeError: on ranks other than 0, when rank 0 failed to write.

    Collective whenever params are sharded or the world has several ranks: every rank
    calls it ([Note: export is a collective]).
    """
    if tied not in ("all", "first"):
        raise ValueError(f"fs.export: tied must be 'all' or 'first', got {tied!r}.")
    if config is not None:
        _config_json(config)  # a config that cannot be written raises before any collective
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"fs.export: dtype must be a floating dtype or None, got {dtype}.")
    target = _file_path(path)
    full = dequantize(gather_params(params, state))  # collective: before any rank may fail
    module, aliases = _module_and_aliases(model)

    error: BaseException | None = None
    if comm.rank() == 0:
        try:
            tensors = _tensors_to_write(full, module, aliases, dtype, tied)
            header = {"format": "pt", **dict(metadata or {})}
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(tensors, target, header)
            if target.name == FILE_NAME:
                _write_config(target.parent, config, module)
        except BaseException as e:  # re-raised below, after the other ranks hear of it
            error = e
    _agree_on_success(error, target)
    return target


def load_safetensors(
    path: str | os.PathLike,
    params: dict[str, torch.Tensor],
    *,
    model: nn.Module | Apply | None = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Params filled from a safetensors file (or a directory holding one, or a sharded set).

    Args:
      path: a ``.safetensors`` file, or a directory with ``model.safetensors`` or
        ``model.safetensors.index.json`` (a Hugging Face checkpoint).
      params: full params from ``fs.functional`` (not shards: load, then ``step.init``).
      model: the module or apply: lets a tied weight be found under any of its names
        and fills buffers and frozen params of the module from the file.
      strict: missing or unexpected keys raise (else missing params keep their value).

    Returns:
      A new params dict: same keys, each tensor on its param's device and in its dtype.
    """
    return load_state_dict(
        _read(_file_path(path, reading=True)), params, model=model, strict=strict
    )


@torch.no_grad()
def load_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    *,
    model: nn.Module | Apply | None = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Params filled from a state dict (e.g. a Hugging Face model's ``state_dict()``).

    Same arguments and result as :func:`load_safetensors`, with the tensors given.

    Raises:
      ValueError: a shape mismatch (naming the param and both shapes); with ``strict``,
        missing or unexpected keys (listing them); tied names whose tensors differ.
    """
    module, aliases = _module_and_aliases(model)
    owner = {name: name for name in params}  # any key naming a param -> its params key
    for first, others in aliases.items():
        if first in params:
            owner.update((alias, first) for alias in others)
    extra = _module_extras(module)  # buffers and frozen params: filled in the module

    out = dict(params)
    seen: dict[str, str] = {}
    unexpected = []
    into_module = []  # copied only once every key has been checked
    for key, value in state_dict.items():
        if key in extra:
            _check_shape(key, value, extra[key], "the module's")
            into_module.append(key)
            continue
        name = owner.get(key)
        if name is None:
            unexpected.append(key)
            continue
        _check_shape(key, value, params[name], "params[" + repr(name) + "]")
        if name in seen:
            if not torch.equal(state_dict[seen[name]].to(value.dtype), value):
                raise ValueError(
                    f"{seen[name]!r} and {key!r} are one tied weight in the module but hold "
                    "different values in the state dict; drop one, or untie the module."
                )
            continue
        seen[name] = key
        p = params[name]
        out[name] = value.to(device=p.device, dtype=p.dtype, copy=True)
    missing = [n for n in params if n not in seen]
    if strict and (missing or unexpected):
        raise ValueError(
            f"state dict does not match the params: missing {_listing(missing)}, unexpected "
            f"{_listing(unexpected)}. Pass model= (the module or apply) so tied names and "
            "buffers are known, or strict=False to load what matches."
        )
    for key in into_module:
        extra[key].copy_(state_dict[key])
    return out


# ----------------------------------------------------------------------------- helpers


def _file_path(path: str | os.PathLike, reading: bool = False) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is neither a .safetensors file nor a directory.")
    if reading and not (path / FILE_NAME).exists() and (path / INDEX_NAME).exists():
        return path / INDEX_NAME
    return path / FILE_NAME


def _module_and_aliases(model) -> tuple[nn.Module | None, dict[str, list[str]]]:
    if model is None:
        return None, {}
    if isinstance(model, Apply):
        return model.module, model.aliases
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module or fs.functional's apply, got {type(model).__name__}."
        )
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[first[id(p)]].append(name)
        else:
            first[id(p)] = name
            aliases[name] = []
    return model, aliases


def _module_extras(module: nn.Module | None) -> dict[str, torch.Tensor]:
    """State-dict entries that are not trainable params: persistent buffers, frozen params."""
    if module is None:
        return {}
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in trainable}


def _tensors_to_write(full, module, aliases, dtype, tied) -> dict[str, torch.Tensor]:
    names: dict[str, str] = {}  # file key -> params key
    for name in full:
        names[name] = name
        if tied == "all":
            names.update((alias, name) for alias in aliases.get(name, ()))
    if module is not None:
        expected = module.state_dict(keep_vars=True)
        unknown = [n for n in names if n not in expected]
        if unknown:
            raise ValueError(
                f"fs.export: params {_listing(unknown)} are not in "
                f"{type(module).__name__}.state_dict(); pass the module these params came from."
            )
        extras = _module_extras(module)
        dropped = {a for others in aliases.values() for a in others} if tied == "first" else ()
        absent = [k for k in expected if k not in names and k not in extras and k not in dropped]
        if absent:
            raise ValueError(
                f"fs.export: the module's trainable params {_listing(absent)} are not in params; "
                "pass the whole params dict (as fs.functional or the step returned it)."
            )
        order = [k for k in expected if k in names or k in extras]
    else:
        extras, order = {}, list(names)
    tensors = {}
    for key in order:
        t = full[names[key]] if key in names else extras[key]
        if t is None:
            raise ValueError(
                f"fs.export: param {key!r} is None; export the params a step returned."
            )
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        # copy=True: safetensors refuses tensors sharing memory (tied aliases, views).
        tensors[key] = t.detach().to("cpu", cast, copy=True).contiguous()
    return tensors


def _atomic_save(tensors: dict[str, torch.Tensor], target: pathlib.Path, header: dict) -> None:
    from safetensors.torch import save_file

    # mkstemp: a fresh file created with O_EXCL in the target's directory (the rename
    # below must not cross file systems), never a name someone else planted.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an export is meant to be read
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _write_config(directory: pathlib.Path, config, module) -> None:
    """``config.json`` beside the weights: ``config``, else the module's own config."""
    if config is None:
        config = getattr(module, "config", None)
    if config is None and isinstance(module, GPT):
        config = module.cfg
    if config is None:
        warnings.warn(
            f"fs.export wrote {directory / FILE_NAME} without a config.json, so "
            "from_pretrained cannot load the directory: pass model= (a transformers model) "
            "or config= (its config, a dataclass or a dict).",
            stacklevel=3,
        )
        return
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)  # a Hugging Face config: from_pretrained-able
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_config_json(config), indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / CONFIG_NAME)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _config_json(config) -> dict:
    if hasattr(config, "save_pretrained") or hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, GPTConfig):  # fscale.serve loads such a directory
        return {**dataclasses.asdict(config), **FSCALE_GPT_TYPE}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(
            "fs.export: config must be a transformers config, a dataclass instance or a "
            f"mapping, got {type(config).__name__}."
        )
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fs.export: config is not JSON-serialisable ({e}).") from None
    return dict(config)


def _agree_on_success(error: BaseException | None, target: pathlib.Path) -> None:
    if comm.world_size() > 1:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if comm.backend() == "nccl"
            else torch.device("cpu")
        )
        failed = torch.tensor([float(error is not None)], device=device)
        comm.all_reduce(failed, op="max")
        if error is None and failed.item():
            raise RuntimeError(f"fs.export: rank 0 failed to write {target}; see its error.")
    if error is not None:
        raise error


def _read(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = [path]
    if path.name == INDEX_NAME:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a safetensors index ({e}).") from e
        files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
    out: dict[str, Any] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no safetensors file at {f}.")
        try:
            out.update(load_file(f, device="cpu"))
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}).") from e
    return out


def _check_shape(key: str, value: torch.Tensor, into: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(into.shape):
        hint = (
            " params are ZeRO shards: load into the full params of fs.functional, then step.init."
            if getattr(into, "_fscale_shard", None) is not None
            else ""
        )
        raise ValueError(
            f"{key!r} has shape {tuple(value.shape)} in the state dict but {what} "
            f"shape is {tuple(into.shape)}.{hint}"
        )


def _listing(names: list[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
