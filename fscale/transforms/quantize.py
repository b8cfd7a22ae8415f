"""``quantize(params, fmt)``: low-bit linear weights that the unchanged ``apply`` runs on.

The transform maps a params dict to one with the same keys in which the
selected linear weights are :class:`QuantizedWeight` tensors: wrapper tensors
of the original shape and dtype that hold only the packed weight (codes and
scales, plus optional LoRC factors). Their ``__torch_function__`` sends
``F.linear(x, w, b)`` -- and ``x @ w.t()``, ``torch.addmm(b, x, w)`` for
weights stored ``[in, out]`` like Hugging Face's GPT-2 ``Conv1D`` -- to the
format's fused kernel from the dispatch table; any other op sees the
dequantized weight (correct, just not fast). So ``fs.functional``'s ``apply``
needs no change, for any ``nn.Module``::

    params, apply = fs.functional(model)
    qparams = quantize(params, "e3m2")                      # fp6 weight-only
    logits = apply(qparams, tokens)                         # through fpx_linear
    print(quantize_report(qparams))                         # bytes and kernel per layer

Formats (``FORMATS``):

==========  ================================================  ======================
fmt         weights / activations                             op in the kernel table
==========  ================================================  ======================
e3m2 e2m3   fp6 weights (per-channel scale), weight-only      fscale.kernels.fpx
e2m2 e3m1   fp5 weights, weight-only                          fscale.kernels.fpx
e2m1        fp4 weights, weight-only                          fscale.kernels.fpx
int8 int4   group-wise ints (group_size, symmetric or not)    int_linear
w8a8        int8 per-channel weights, int8 per-token acts     w8a8_linear
fp8         e4m3 per-channel weights, e4m3 per-token acts     fp8_linear
==========  ================================================  ======================

``fp6``, ``fp5`` and ``fp4`` are accepted as ``e3m2``, ``e2m2`` and ``e2m1``.

[Note: which weights are quantized by default]
Only the params dict is given, so the default selection is by name and shape:
a 2-D floating-point tensor whose name ends in ``.weight``, unless a component
of its module path names an embedding or an output head -- it contains
``emb``, is ``wte``/``wpe``, is ``head``/``heads``/``lm_head``/``embed_out`` or
ends in ``_head`` -- or it shares storage with such a tensor (a head tied to
the embedding). Embeddings are gathered, not multiplied, and the head is
the layer most sensitive to quantization (ZeroQuant keeps both in 16 bits).
Pass ``module=`` (the model, or ``apply``) to select exactly the weights of
``nn.Linear`` and ``Conv1D`` modules (still minus heads and tied embeddings),
and to pack ``Conv1D``'s ``[in, out]`` weights along the right axis; or pass
``select(name, tensor) -> bool`` to choose yourself.

Quantized weights are for inference: the fallback path is differentiable with
respect to the activations, the weights themselves are constants. ``.to(device)``
moves the packed data; ``torch.save``/``copy.deepcopy`` keep it packed (load with
``torch.load(..., weights_only=False)``); ``dequantize(params)`` gives plain tensors.

References:
    Xia et al., "FP6-LLM: Efficiently Serving Large Language Models Through
    FP6-Centric Algorithm-System Co-Design", 2024.
    Yao et al., "ZeroQuant" (2022) and "ZeroQuant-V2" (2023, LoRC).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fscale.hw import dispatch
from fscale.kernels import intq
from fscale.kernels.lorc import LoRC, lorc_factors, lorc_linear
from fscale.transforms._wrapper import is_metadata_query

FP_FORMATS = ("e3m2", "e2m3", "e2m2", "e3m1", "e2m1")
FORMATS = (*FP_FORMATS, "int8", "int4", "w8a8", "fp8")
ALIASES = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Codec:
    """How one format packs ``[N, K]`` weights and runs its linear."""

    fmt: str
    op: str  # the kernel-table op its linear resolves (for reports)
    pack: Callable[[torch.Tensor], Any]
    unpack: Callable[[Any], torch.Tensor]  # packed -> float32 [N, K]
    linear: Callable[..., torch.Tensor]  # (x, packed, bias) -> y
    multiples: tuple[int, int] = (1, 1)  # (N, K) must be multiples of these (pad=True pads)
    options: tuple = ()  # (name, value) pairs given to codec(), to rebuild it (pickling)

    def __reduce__(self):
        return (_codec_from, (self.fmt, self.options))

    def kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        try:
            return dispatch.resolve(self.op, device, dtype).name
        except (KeyError, LookupError):
            return "(none registered)"


def _fpx():
    try:
        from fscale.kernels import fpx
    except ImportError as e:  # pragma: no cover - fpx ships beside this file
        raise ImportError(f"the fp6/fp5/fp4 formats need fscale.kernels.fpx: {e}") from e
    return fpx


def codec(fmt: str, *, group_size: int = 128, symmetric: bool = True) -> Codec:
    """The :class:`Codec` of ``fmt`` (see the module doc for the formats)."""
    if not isinstance(fmt, str) or ALIASES.get(fmt, fmt) not in FORMATS:
        raise ValueError(
            f"quantize: unknown format {fmt!r}; valid formats are {list(FORMATS)} "
            f"(aliases {ALIASES})."
        )
    fmt = ALIASES.get(fmt, fmt)
    if fmt in FP_FORMATS:
        fpx = _fpx()
        return Codec(
            fmt,
            getattr(fpx, "OP", "fpx_linear"),
            lambda w: fpx.pack(w, fmt),
            fpx.unpack,
            fpx.fpx_linear,
            (fpx.layout(fmt)["n_multiple"], fpx.layout(fmt)["k_chunk"]),
        )
    if fmt in ("int8", "int4"):
        if group_size not in intq.GROUP_SIZES:
            raise ValueError(
                f"quantize({fmt!r}): group_size must be one of {intq.GROUP_SIZES}, "
                f"got {group_size!r}."
            )
        bits = int(fmt[3:])
        return Codec(
            fmt,
            intq.INT_OP,
            lambda w: intq.pack_int(w, bits=bits, group_size=group_size, symmetric=symmetric),
            intq.unpack_int,
            intq.int_linear,
            (1, group_size),
            (("group_size", group_size), ("symmetric", symmetric)),
        )
    if fmt == "w8a8":
        return Codec(fmt, intq.W8A8_OP, intq.pack_w8a8, intq.unpack_w8a8, intq.w8a8_linear)
    return Codec(fmt, intq.FP8_OP, intq.pack_fp8, intq.unpack_fp8, intq.fp8_linear)


def _codec_from(fmt: str, options: tuple) -> Codec:
    return codec(fmt, **dict(options))


# ----------------------------------------------------------------------------- the tensor


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


# ----------------------------------------------------------------------------- selection


_SKIP_PARTS = {"wte", "wpe", "head", "heads", "lm_head", "embed_out"}


def _skipped_by_name(name: str) -> bool:
    for part in name.lower().split(".")[:-1]:
        if "emb" in part or part in _SKIP_PARTS or part.endswith("_head"):
            return True
    return False


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _module_layout(module: nn.Module) -> tuple[set[str], set[str], set[int]]:
    """``(linear weight names, Conv1D weight names, embedding storage ptrs)``."""
    linear, conv1d, emb = set(), set(), set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear):
            linear.add(prefix + "weight")
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2
            linear.add(prefix + "weight")
            conv1d.add(prefix + "weight")
        elif isinstance(mod, nn.Embedding):
            emb.add(_ptr(mod.weight))
    return linear, conv1d, emb


def _selection(params, select, module) -> tuple[dict[str, bool], set[str]]:
    """``{name: chosen}`` and the names stored ``[in, out]``."""
    linear = conv1d = None
    emb_ptrs: set = set()
    if module is not None:
        module = getattr(module, "module", module)  # fs.functional's Apply carries it
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"quantize: module= takes the nn.Module (or the apply from fs.functional), "
                f"got {type(module).__name__}."
            )
        linear, conv1d, emb_ptrs = _module_layout(module)
    if select is not None and not callable(select):
        raise TypeError(
            f"quantize: select must be a callable select(name, tensor) -> bool, got {select!r}."
        )
    for name, t in params.items():
        if isinstance(t, torch.Tensor) and _skipped_by_name(name):
            emb_ptrs.add(_ptr(t))
    emb_ptrs.discard(None)
    chosen = {}
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or isinstance(t, QuantizedWeight):
            chosen[name] = False
        elif select is not None:
            chosen[name] = bool(select(name, t))
        else:
            chosen[name] = (
                t.dim() == 2
                and t.is_floating_point()
                and (name.endswith(".weight") if linear is None else name in linear)
                and not _skipped_by_name(name)
                and _ptr(t) not in emb_ptrs
            )
    return chosen, conv1d or set()


# ----------------------------------------------------------------------------- transform


def quantize(
    params: dict[str, torch.Tensor],
    fmt: str,
    *,
    select: Callable[[str, torch.Tensor], bool] | None = None,
    group_size: int = 128,
    symmetric: bool = True,
    lorc_rank: int = 0,
    module: nn.Module | Any | None = None,
    pad: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize the linear weights of a params dict (see the module doc).

    Args:
      params: ``{name: tensor}``, e.g. from ``fs.functional(model)``.
      fmt: one of ``FORMATS`` (or an alias ``fp6``/``fp5``/``fp4``).
      select: ``select(name, tensor) -> bool`` picks the weights (``[out, in]``
        2-D tensors used through ``F.linear``); default: see
        [Note: which weights are quantized by default].
      group_size: int8/int4 only: input features per scale (32, 64 or 128).
      symmetric: int8/int4 only: ``False`` adds a per-group minimum (asymmetric).
      lorc_rank: ``r > 0`` adds LoRC, rank-r fp16 factors of the quantization error.
      module: optional model (or ``apply``) to select exactly its ``nn.Linear`` /
        ``Conv1D`` weights and pack ``Conv1D``'s ``[in, out]`` weights correctly.
      pad: pad a weight whose shape the format's layout cannot take (fp5 packs K
        in chunks of 256, int4 g128 needs K % 128 == 0, ...) with zero rows and
        columns, and the activations with zero columns at run time, instead of
        raising. Costs the padding's bytes and a copy of ``x`` per call.

    Returns:
      A new dict with the same keys; selected weights are :class:`QuantizedWeight`.

    Example::

        qparams = quantize(params, "int4", group_size=128, lorc_rank=8)
        logits = apply(qparams, tokens)
    """
    c = codec(fmt, group_size=group_size, symmetric=symmetric)
    if not isinstance(params, dict):
        raise TypeError(
            f"quantize expects the params dict from fs.functional, got {type(params).__name__}."
        )
    if not isinstance(lorc_rank, int) or lorc_rank < 0:
        raise ValueError(f"quantize: lorc_rank must be an int >= 0, got {lorc_rank!r}.")
    chosen, conv1d = _selection(params, select, module)
    out: dict[str, torch.Tensor] = {}
    for name, t in params.items():
        if not chosen[name]:
            out[name] = t
            continue
        out[name] = _quantize_one(name, t, c, lorc_rank, transposed=name in conv1d, pad=pad)
    if not any(chosen.values()):
        warnings.warn(
            f"quantize({c.fmt!r}): no param was selected; pass select= or module=.", stacklevel=2
        )
    return out


@torch.no_grad()
def _quantize_one(
    name: str, t: torch.Tensor, c: Codec, lorc_rank: int, *, transposed: bool, pad: bool
):
    where = f"quantize({c.fmt!r}): param {name!r} of shape {tuple(t.shape)}"
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(
            f"{where}, dtype {t.dtype}: only 2-D floating-point linear weights can be "
            "quantized; leave it out with select=."
        )
    if torch.isnan(t).any():
        raise ValueError(f"{where} holds NaN weights; fix the checkpoint or leave it out.")
    w = t.detach().t() if transposed else t.detach()  # the [out, in] weight
    N, K = w.shape
    padded = w
    if pad:
        (mn, mk) = c.multiples
        padded = F.pad(w, (0, -K % mk, 0, -N % mn))
    try:
        packed = c.pack(padded.contiguous())
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{where} cannot be packed ({e}); or pass pad=True.") from e
    lorc = None
    if lorc_rank:
        lorc_dtype = torch.bfloat16 if t.dtype == torch.bfloat16 else torch.float16
        w_hat = c.unpack(packed)[:N, :K]
        lorc = lorc_factors(w, w_hat, lorc_rank, dtype=lorc_dtype)
    return QuantizedWeight(
        packed, c, dtype=t.dtype, lorc=lorc, transposed=transposed, name=name, shape=(N, K)
    )


def dequantize(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors again (each :class:`QuantizedWeight` dequantized)."""
    return {k: v.dequantize() if isinstance(v, QuantizedWeight) else v for k, v in params.items()}


# ----------------------------------------------------------------------------- report


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _launches_text(packed) -> str:
    """`` [M<=1: gluon split4 w4; ...]``: the launches tuned so far for this weight."""
    from fscale.kernels import _triton

    module = _TUNED_BY.get(type(packed).__name__)
    if module is None:
        return ""
    found = importlib.import_module(module).launches(packed)
    if not found:
        return ""
    parts = [f"M<={m}: {_triton.describe_launch(cfg)}" for m, cfg in sorted(found.items())]
    return "  [" + "; ".join(parts) + "]"


# Packed weight types whose kernels tune launches per M bucket, and where.
_TUNED_BY = {"PackedFPx": "fscale.kernels.fpx_triton", "PackedInt": "fscale.kernels.intq"}


def quantize_report(
    params: dict[str, torch.Tensor], *, activation_dtype: torch.dtype | None = None
) -> str:
    """Bytes before/after and the kernel each quantized layer resolves to, as text.

    ``activation_dtype`` (default: each weight's dtype) picks the kernel rule, as
    the activations' dtype does at run time.
    """
    rows = []
    before = after = 0
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            continue
        orig = t.numel() * t.element_size()
        before += orig
        if isinstance(t, QuantizedWeight):
            kernel = t._codec.kernel(t.device, activation_dtype or t.dtype)
            kernel += _launches_text(t.packed)
            now = t.packed_nbytes
            bits = 8 * now / t.numel()
            extra = f"+lorc{t._lorc.rank}" if t._lorc is not None else ""
            rows.append((name, "x".join(map(str, t.shape)), t.fmt + extra, orig, now, bits, kernel))
            after += now
        else:
            after += orig
    head = (
        f"{'param':<36} {'shape':>11} {'format':<10} {'before':>10} {'after':>10} "
        f"{'bits/w':>6}  kernel"
    )
    lines = ["quantized linear weights:", head]
    q_before = sum(r[3] for r in rows)
    q_after = sum(r[4] for r in rows)
    for name, shape, fmt, b, a, bits, kernel in rows:
        lines.append(
            f"{name:<36} {shape:>11} {fmt:<10} {_size(b):>10} {_size(a):>10} {bits:>6.2f}  {kernel}"
        )
    if not rows:
        lines.append("  (none)")
    else:
        lines.append(
            f"quantized layers: {len(rows)}, {_size(q_before)} -> {_size(q_after)} "
            f"({q_after / q_before:.3f}x)"
        )
    ratio = after / before if before else 1.0
    lines.append(f"all params: {_size(before)} -> {_size(after)} ({ratio:.3f}x)")
    return "\n".join(lines)
