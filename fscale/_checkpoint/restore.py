"""Which checkpoint entry fills which target entry, and the plain metadata back
([Note: what load fills] in ``fscale/checkpoint.py``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fscale.state import StoredTensor, TensorEntry


def _source_key(key: str, t, saved: dict, slots: set, where: str) -> str | None:
    dtype = t.dtype
    param = _param_of(key)
    same = saved.get(key)
    if isinstance(same, TensorStorageMetadata) and (
        param is None or same.properties.dtype == dtype
    ):
        return key
    if param is not None:
        copies = [
            k
            for k, m in saved.items()
            if isinstance(m, TensorStorageMetadata) and _param_of(k) == param
        ]
        if copies:
            # The most precise copy; a master before the param itself.
            return max(
                copies, key=lambda k: (saved[k].properties.dtype.itemsize, k != f"params/{param}")
            )
    slot = key.split("/", 1)[0]
    if slot not in slots:
        return None
    raise ValueError(
        f"checkpoint {where} has no entry {key!r} although it has the slot {slot!r}; it was "
        "saved by another optimizer or transform configuration: build the step as the run "
        "that saved it did."
    )


def _param_of(key: str) -> str | None:
    """The param a copy entry holds: ``params/<name>`` or ``<slot>/master/<name>``."""
    if key.startswith("params/"):
        return key[len("params/") :]
    m = re.match(r"^[^/]+/master/(.+)$", key)
    return m.group(1) if m else None


def _check_model(where: str, saved: dict, layout) -> None:
    saved_params = {
        k[len("params/") :]: tuple(m.size) for k, m in saved.items() if k.startswith("params/")
    }
    for k, m in saved.items():  # params kept only as their masters ([Note: mirrored params])
        p = _param_of(k)
        if p is not None and p not in saved_params and isinstance(m, TensorStorageMetadata):
            saved_params[p] = tuple(m.size)
    mine = {p: tuple(pl.shape) for p, pl in zip(layout.paths, layout.placements, strict=True) if pl}
    missing = sorted(set(mine) - set(saved_params))
    unexpected = sorted(set(saved_params) - set(mine))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} is of another model: params missing from it "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, params it has that the "
            f"model lacks {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Load it "
            "into the model that saved it."
        )
    for p, shape in mine.items():
        if saved_params[p] != shape:
            raise ValueError(
                f"checkpoint {where}: param {p!r} has shape {saved_params[p]} in the "
                f"checkpoint but {shape} in the model; build the model with the config "
                "that saved it."
            )


def _make_lazy(path: str, value: Any, saved: dict) -> None:
    """Let every object of ``value`` with ``make_entries`` create, before DCP reads,
    the tensors it makes lazily ([Note: what load fills], the last item)."""
    if isinstance(value, (torch.Tensor, TensorEntry, StoredTensor)):
        return
    if hasattr(value, "describe_state"):
        if hasattr(value, "make_entries"):
            prefix = path + "/"
            value.make_entries(
                {
                    k[len(prefix) :]: (tuple(m.size), m.properties.dtype)
                    for k, m in saved.items()
                    if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
                }
            )
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _make_lazy(f"{path}/{k}" if path else str(k), v, saved)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        for k in value._fields:
            _make_lazy(f"{path}/{k}", getattr(value, k), saved)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _make_lazy(f"{path}/{i}", v, saved)


def _restore_plain(state: dict, values: dict) -> dict:
    return {k: _restore(str(k), v, values) for k, v in state.items()}


def _restore(path: str, value: Any, values: dict) -> Any:
    """``value`` with its plain metadata replaced by ``values[path]`` where saved."""
    if isinstance(value, (torch.Tensor, TensorEntry, StoredTensor)):
        return value
    if hasattr(value, "describe_state"):
        if hasattr(value, "load_state"):
            prefix = path + "/"
            value.load_state(
                {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            )
        return value  # else: metadata derived from the stack (layout, shard specs)
    if isinstance(value, dict):
        return {k: _restore(f"{path}/{k}", v, values) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(
            *(_restore(f"{path}/{k}", getattr(value, k), values) for k in value._fields)
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_restore(f"{path}/{i}", v, values) for i, v in enumerate(value))
    return values.get(path, value)
