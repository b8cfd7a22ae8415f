"""Shared by the tensor wrappers that stand in for params inside ``apply``.

ZeRO-3's ``LazyParam`` and quantize's ``QuantizedWeight`` have a param's shape and
dtype but not its data: ``__torch_function__`` answers metadata queries from the
wrapper itself (no gather, no dequantize) and routes every real op elsewhere.

Usage::

    if is_metadata_query(func):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
"""

from __future__ import annotations

_ATTRIBUTES = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "requires_grad",
        "is_cuda",
        "layout",
        "is_leaf",
        "grad_fn",
        "names",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "is_nested",
    }
)
_METHODS = frozenset(
    {
        "size",
        "dim",
        "numel",
        "is_floating_point",
        "element_size",
        "nelement",
        "stride",
        "is_contiguous",
        "__len__",
    }
)


def is_metadata_query(func) -> bool:
    """``func`` reads only shape/dtype/device-like metadata (an attribute getter or method)."""
    name = getattr(func, "__name__", "")
    owner = getattr(getattr(func, "__self__", None), "__name__", "")
    return (name == "__get__" and owner in _ATTRIBUTES) or name in _METHODS
