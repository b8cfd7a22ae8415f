"""``QuantizedWeight``: a linear weight held packed, whose ``F.linear`` runs the format's kernel.

Its ``__torch_function__`` sends ``F.linear(x, w, b)`` -- and ``x @ w.t()``,
``torch.addmm(b, x, w)`` for weights stored ``[in, out]`` (``Conv1D``) -- to the
codec's fused linear (``_fast_path``); ``.t()`` and device moves keep the packing;
any other op sees the dequantized weight.

Usage::

    w = QuantizedWeight(c.pack(weight), c, dtype=weight.dtype)  # c = codec(fmt)
    y = F.linear(x, w, b)                                        # through the kernel
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from fscale.kernels.lorc import LoRC, lorc_linear
from fscale.transforms._quantize.codec import Codec
from fscale.transforms._wrapper import is_metadata_query

_MATMULS = {"matmul", "__matmul__", "mm"}


class QuantizedWeight(torch.Tensor):
    """A linear weight held packed; ``F.linear`` on it runs the format's kernel.

    The tensor has the original weight's shape and dtype but no storage of that
    size. ``transposed=True`` marks a weight stored ``[in, out]`` (``Conv1D``):
    ``addmm(b, x, w)`` and ``x @ w`` are then the linear. ``.t()`` is free: a
    second wrapper around the same packed data with the flag flipped.
    """

    @staticmethod
    def fscale_report(params: dict) -> str:
        """What ``fs.explain`` prints for params holding such leaves (any leaf type with
        this hook gets a section, so explain never imports a transform)."""
        from fscale.transforms._quantize.report import quantize_report  # report imports this

        return quantize_report(params)

    @staticmethod
    def __new__(
        cls,
        packed: Any,
        codec: Codec,
        *,
        dtype: torch.dtype,
        lorc: LoRC | None = None,
        transposed: bool = False,
        name: str = "",
        shape: tuple[int, int] | None = None,
    ):
        # shape: the logical [out, in] weight; packed.shape may be larger (pad=True).
        N, K = shape if shape is not None else packed.shape
        logical = (K, N) if transposed else (N, K)
        device = _packed_device(packed)
        t = torch.Tensor._make_wrapper_subclass(cls, logical, dtype=dtype, device=device)
        t._packed, t._codec, t._lorc = packed, codec, lorc
        t._transposed, t._name, t._nk = transposed, name, (N, K)
        return t

    # -- what it holds ------------------------------------------------------------------

    @property
    def fmt(self) -> str:
        return self._codec.fmt

    @property
    def packed(self) -> Any:
        return self._packed

    @property
    def packed_nbytes(self) -> int:
        """Bytes it really holds: codes, scales and LoRC factors."""
        return self._packed.nbytes + (0 if self._lorc is None else self._lorc.nbytes)

    @property
    def exact_packed(self) -> Any:
        """The packed weight when it alone is this weight (no padding, no LoRC
        correction, not transposed): kernels that take packed weights directly (the
        FPx SwiGLU epilogue) may then use it. None otherwise."""
        plain = self._lorc is None and not self._transposed
        return self._packed if plain and tuple(self._packed.shape) == self._nk else None

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with, as a plain tensor of this shape and dtype."""
        N, K = self._nk
        w = self._codec.unpack(self._packed)[:N, :K]
        if self._lorc is not None:
            w = w + self._lorc.error()
        w = w.to(self.dtype)
        return w.t() if self._transposed else w

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias`` through the kernel, ``W`` the logical ``[out, in]`` weight."""
        (N, K), (Np, Kp) = self._nk, self._packed.shape
        x_in = F.pad(x, (0, Kp - K)) if Kp != K else x  # zero columns add nothing
        y = self._codec.linear(x_in, self._packed, bias if Np == N else None)
        if Np != N:
            y = y[..., :N]
            if bias is not None:
                y = y + bias.to(y.dtype)
        if self._lorc is not None:
            y = y + lorc_linear(x, self._lorc)
        return y

    def to_device(self, device: torch.device | str) -> QuantizedWeight:
        """The same packed weight on ``device`` (what ``.to(device)``/``.cuda()`` do)."""
        device = torch.device(device)
        return QuantizedWeight(
            self._packed.to(device),
            self._codec,
            dtype=self.dtype,
            lorc=None if self._lorc is None else self._lorc.to(device),
            transposed=self._transposed,
            name=self._name,
            shape=self._nk,
        )

    # torch.save / pickle / deepcopy keep the packed form (load with weights_only=False).
    def __reduce_ex__(self, protocol):
        return (_rebuild, (self._packed, self._codec, self.dtype, self._lorc, self._transposed,
                           self._name, self._nk))  # fmt: skip

    def __deepcopy__(self, memo):
        packed = copy.deepcopy(self._packed, memo)
        lorc = copy.deepcopy(self._lorc, memo)
        return _rebuild(
            packed, self._codec, self.dtype, lorc, self._transposed, self._name, self._nk
        )

    def _flipped(self) -> QuantizedWeight:
        return QuantizedWeight(
            self._packed,
            self._codec,
            dtype=self.dtype,
            lorc=self._lorc,
            transposed=not self._transposed,
            name=self._name,
            shape=self._nk,
        )

    # -- interception ---------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        if is_metadata_query(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        fast = _fast_path(func, name, owner, args, kwargs)
        if fast is not None:
            return fast()
        args, kwargs = _dequantized(args, kwargs)
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Ops that bypass __torch_function__ (e.g. under torch.compile or a mode)
        # still get the right values.
        args, kwargs = _dequantized(args, kwargs or {})
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        lorc = f", lorc_rank={self._lorc.rank}" if self._lorc is not None else ""
        t = ", transposed" if self._transposed else ""
        return (
            f"QuantizedWeight({self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}"
            f"{t}{lorc}, {self.packed_nbytes} bytes)"
        )


def _rebuild(packed, codec, dtype, lorc, transposed, name, shape) -> QuantizedWeight:
    return QuantizedWeight(
        packed, codec, dtype=dtype, lorc=lorc, transposed=transposed, name=name, shape=shape
    )


def _packed_device(packed: Any) -> torch.device:
    dev = getattr(packed, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for value in vars(packed).values() if hasattr(packed, "__dict__") else ():
        if isinstance(value, torch.Tensor):
            return value.device
    for field in getattr(packed, "__dataclass_fields__", {}):
        value = getattr(packed, field)
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _dequantized(args, kwargs):
    deq = QuantizedWeight.dequantize
    return (
        torch.utils._pytree.tree_map_only(QuantizedWeight, deq, args),
        torch.utils._pytree.tree_map_only(QuantizedWeight, deq, kwargs),
    )


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, QuantizedWeight)


def _fast_path(func, name, owner, args, kwargs):
    """A thunk running the kernel when ``func(*args)`` is a linear on a QuantizedWeight."""
    if func is F.linear:
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(w, QuantizedWeight) and not w._transposed and _plain(x):
            if b is None or _plain(b):
                return lambda: w.linear(x, b)
        return None
    if name in ("t", "transpose", "swapaxes", "swapdims") or (
        name == "__get__" and owner in ("T", "mT")
    ):
        w = args[0]
        if isinstance(w, QuantizedWeight) and (name in ("t", "__get__") or len(args) == 3):
            return w._flipped
        return None
    if name in ("to", "cuda", "cpu") and isinstance(args[0], QuantizedWeight):
        # A move keeps the packing; a dtype change (or anything else) dequantizes.
        w = args[0]
        if name == "to":
            try:
                device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            except (TypeError, RuntimeError):
                return None
            if (dtype is not None and dtype != w.dtype) or memory_format is not None:
                return None
        elif name == "cuda":
            index = args[1] if len(args) > 1 else kwargs.get("device")
            device = torch.device("cuda") if index is None else torch.device("cuda", index)
            if isinstance(index, (str, torch.device)):
                device = torch.device(index)
        else:
            device = torch.device("cpu")
        if device is None:
            return lambda: w
        return lambda: w.to_device(device)
    if name in _MATMULS and len(args) == 2 and not kwargs:
        x, w = args
        if isinstance(w, QuantizedWeight) and w._transposed and _plain(x) and x.dim() >= 1:
            return lambda: w.linear(x)
        return None
    if name == "addmm" and len(args) == 3:
        b, x, w = args
        if (
            isinstance(w, QuantizedWeight)
            and w._transposed
            and _plain(x)
            and _plain(b)
            and kwargs.get("beta", 1) == 1
            and kwargs.get("alpha", 1) == 1
            and b.dim() == 1
        ):
            return lambda: w.linear(x, b)
    return None
