"""The state protocol: every slot of a step's state describes itself for a checkpoint.

``describe(state)`` walks the state dict (slots keyed by owner) and returns a flat
``{path: entry}`` where an entry is either a ``TensorEntry`` (a tensor that lives in
this process, with its placement) or a ``StoredTensor`` (bytes that live in a file,
such as NVMe swap, with offset, shape, dtype and placement), or plain metadata:
``None``, bools, numbers, strings, dtypes, and lists/dicts of those. Dicts, lists,
tuples and NamedTuples (optimizer states) are walked; an object describes itself
with a ``describe_state()`` method returning any of the above. Anything else (a
closure, a thread pool, an open file) raises naming its path: state must hold no
closures, so that a checkpoint can be written for every stack.

Usage::

    entries = describe(state)
    entries["optimizer/mu/blocks.0.w"].tensor, entries[...].placement
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from fscale.placement import Placement, placement_of, replicated


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of this process and how it maps onto the mesh."""

    tensor: torch.Tensor
    placement: Placement


@dataclass(frozen=True)
class StoredTensor:
    """A tensor held in a file (NVMe swap): ``length`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    placement: Placement

    def read(self) -> torch.Tensor:
        """The tensor, read from its file."""
        n = 1
        for s in self.shape:
            n *= s
        nbytes = n * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = bytearray(f.read(nbytes))
        if len(raw) != nbytes:
            raise OSError(f"{self.path}: {len(raw)} bytes at offset {self.offset}, want {nbytes}.")
        return torch.frombuffer(raw, dtype=self.dtype).view(self.shape).clone()


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def describe(state: dict) -> dict[str, Any]:
    """The checkpointable description of ``state``: ``{path: entry}`` (see module doc)."""
    if not isinstance(state, dict):
        raise TypeError(f"describe: state must be the dict step.init returns, got {type(state)}.")
    out: dict[str, Any] = {}
    for key, slot in state.items():
        _walk(str(key), slot, out)
    return out


def _walk(path: str, value: Any, out: dict) -> None:
    # detach(): the same data without the Python attributes fscale tags shards with
    # (their process group among them), which a checkpoint writer could not pickle.
    if isinstance(value, TensorEntry):
        out[path] = TensorEntry(value.tensor.detach(), value.placement)
    elif isinstance(value, StoredTensor):
        out[path] = value
    elif isinstance(value, torch.Tensor):
        out[path] = TensorEntry(value.detach(), placement_of(value) or replicated(value))
    elif isinstance(value, _PLAIN) or isinstance(value, enum.Enum):
        out[path] = value
    elif hasattr(value, "describe_state"):
        _walk(path, value.describe_state(), out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(f"{path}/{k}", v, out)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        for k in value._fields:
            _walk(f"{path}/{k}", getattr(value, k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(f"{path}/{i}", v, out)
    else:
        raise TypeError(
            f"state entry {path!r} is a {type(value).__name__}, which cannot describe itself "
            "for a checkpoint; keep tensors and plain metadata in state, or give the object a "
            "describe_state() method returning them."
        )
