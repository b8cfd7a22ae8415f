"""FPx weights to dense fp16/bf16 by the Triton kernel, and the large-M product
(dequantize + cuBLAS) built on it.

Usage::

    w = dequantize_triton(p, torch.bfloat16)            # == fpx.unpack(p).to(torch.bfloat16)
    y = dequantize_matmul(x2, p, bias, pieces=4)        # x2: [M, K] fp16/bf16, M large
"""

from __future__ import annotations

import torch

from fscale.kernels import fpx as _fpx
from fscale.kernels._fpx_triton_kernel import DTYPES, check_inputs, launch

_SIDE_STREAMS: dict = {}


def dequantize_into(p, wt: torch.Tensor, cols: tuple[int, int], dtype: torch.dtype) -> None:
    """Write W^T[:, 2*c_begin : 2*c_end] (plane columns ``cols``) into ``wt`` ([K, >= width])."""
    chunks = p.shape[1] // _fpx.layout(p.fmt)["k_chunk"]
    words = wt.view(torch.int32)  # [K, width/2]: two 16-bit weights per word
    launch(
        None, p, None, words, bm=16, bn=128, split=chunks, num_warps=4, num_stages=1,
        dequant=dtype, cols=cols,
    )  # fmt: skip


def check_dense_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(
            f"dequantize_triton: dtype {dtype} is not fp16 or bf16; dequantize with "
            "fpx.unpack(p).to(dtype) for other dtypes."
        )


def dequantize_triton(p, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (``unpack(p).to(dtype)``), by the kernel.

    Returned as the transposed view of a contiguous [K, N] tensor (the kernel writes
    W^T so that its stores coalesce; ``x @ w.t()`` then reads it as cuBLAS likes).
    """
    check_dense_dtype(dtype)
    check_inputs(torch.empty(0, dtype=dtype, device=p.device), p)
    n, k = p.shape
    wt = torch.empty(k, n, dtype=dtype, device=p.device)
    dequantize_into(p, wt, (0, n // 2), dtype)
    return wt.t()


def dequantize_matmul(x2: torch.Tensor, p, bias=None, *, pieces: int = 1) -> torch.Tensor:
    """``x2 @ W.t() (+ bias)`` by dequantizing W and calling cuBLAS, in ``pieces`` along N.

    [Note: pipelined dequantize + cuBLAS]
    At large M the product is compute-bound and cuBLAS is the fastest tensor-core
    code there is; dequantizing the whole weight first adds its memory time (read the
    planes, write 2 bytes per weight) in series. With
    ``pieces`` > 1 on CUDA the weight is dequantized a slice of output channels at a
    time on a side stream into two rotating [K, N/pieces] buffers, while the current
    stream multiplies the previous slice into its columns of y (cuBLAS writes a
    column slice of y in place through its leading dimension); the memory-bound
    dequantize then overlaps the compute-bound GEMM, and only two slices of dense
    weight exist at once instead of all of it. Ordering: the side stream starts
    after everything queued on the current stream (x, p ready), a buffer is
    rewritten only after the GEMM that read it (event), and every GEMM waits for its
    slice (event); the buffers are allocated and freed on the current stream, whose
    last use of them follows the side stream's last write, so no record_stream is
    needed.
    """
    n, k = p.shape
    dtype = x2.dtype
    check_dense_dtype(dtype)
    words = n // 2
    if pieces <= 1 or x2.device.type != "cuda":
        w = dequantize_triton(p, dtype)
        return torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
    # Slices of whole 64-word (128-channel) tiles, so each launch covers whole tiles.
    width = -(-words // pieces)
    width = -(-width // 64) * 64
    y = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
    bufs = [torch.empty(k, 2 * width, dtype=dtype, device=x2.device) for _ in range(2)]
    main = torch.cuda.current_stream(x2.device)
    side = _SIDE_STREAMS.get(x2.device)
    if side is None:  # not setdefault: that would build a Stream on every call
        side = _SIDE_STREAMS[x2.device] = torch.cuda.Stream(x2.device)
    side.wait_stream(main)
    consumed: list = [None, None]
    for j, c0 in enumerate(range(0, words, width)):
        c1 = min(c0 + width, words)
        buf = bufs[j % 2]
        with torch.cuda.stream(side):
            if consumed[j % 2] is not None:
                side.wait_event(consumed[j % 2])
            dequantize_into(p, buf, (c0, c1), dtype)
            ready = torch.cuda.Event()
            ready.record(side)
        main.wait_event(ready)
        w_slice, out = buf[:, : 2 * (c1 - c0)], y[:, 2 * c0 : 2 * c1]
        if bias is not None:
            torch.addmm(bias[2 * c0 : 2 * c1].to(dtype), x2, w_slice, out=out)
        else:
            torch.mm(x2, w_slice, out=out)
        consumed[j % 2] = torch.cuda.Event()
        consumed[j % 2].record(main)
    return y
