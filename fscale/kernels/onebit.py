"""1-bit compression: signs packed 8 per byte with one fp32 scale per chunk, and back.

Registered in the kernel table as ops ``"onebit_pack"`` and ``"onebit_unpack"``: the
torch references run everywhere, the Triton kernels on CUDA. Signatures::

    pack(x: (rows, chunk) float) -> (bits: (rows, chunk // 8) uint8, scales: (rows,) fp32)
    unpack(bits, scales, dtype=torch.float32) -> (rows, chunk) of +-scale

Element ``8 j + k`` of a row is bit ``k`` (LSB first) of byte ``j``; a set bit means
``x >= 0`` (+scale), a clear bit ``x < 0`` (-scale). ``chunk`` must be a multiple of 8.

[Note: the scale is mean |x|]
Each row ("chunk") gets ``scale = mean(|x|)``, the least-squares optimum for
``x ~ scale * sign(x)``: then ``||x - C(x)||^2 = ||x||^2 - n * scale^2 <= ||x||^2``, so
the error-feedback residual never exceeds what went in. DeepSpeed's 1-bit Adam uses
``||x||_2 / sqrt(n)`` instead (it preserves the norm; the residual can reach about
``2 ||x||^2``); with error feedback both converge, this one has the tighter bound
that tests/transforms/test_onebit.py checks.

Usage::

    bits, scales = onebit_pack(x.view(-1, 2048))
    approx = onebit_unpack(bits, scales)          # resolves Triton on CUDA, torch on CPU
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from fscale.hw import dispatch
from fscale.kernels import onebit_cpu
from fscale.kernels._triton import LazyJit

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

PACK = "onebit_pack"
UNPACK = "onebit_unpack"

# [Note: packing 8 signs with one multiply]
# The 8 sign bytes (0 or 1) of a byte's elements, read as one little-endian int64
# ``w = sum_k b_k 2^(8k)``, times ``_GATHER = sum_j 2^(7j + 7)`` put ``b_k`` at bit
# ``56 + k`` (the terms with ``j = 7 - k``); every other term lands on bits 7..55 on a
# bit of its own (no carries) or above bit 63 (wrapped away), so ``(w * _GATHER) >> 56``
# is the packed byte, LSB first. Three int64 ops on 1/8 of the elements replace a
# widened (.., 8) weighted sum over a size-8 axis (21M signs, one CPU thread: 12 ms
# against 43 ms). The product wraps past 2^63 as torch's int64 arithmetic does on
# every backend; tests/kernels/test_onebit_kernels.py checks it against the
# weighted sum. Unpacking is a gather from a 256-row table of the 8 signs as +-1.0.
_GATHER = 0x0102040810204080
_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
_LITTLE = sys.byteorder == "little"
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 8 or not x.is_floating_point():
        raise ValueError(
            f"onebit_pack: x must be a 2-D float tensor (rows, chunk) with chunk a multiple "
            f"of 8, got shape {tuple(x.shape)} dtype {x.dtype}; pad the vector first."
        )


def _sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) fp32: row ``b`` holds +-1.0 for bits 0..7 of ``b``."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        b = torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)
        table = ((b & 1) * 2 - 1).to(torch.float32).to(device)
        _SIGN_TABLES[device] = table
    return table


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def pack_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``onebit_pack`` (see the module doc)."""
    _check(x)
    rows, chunk = x.shape
    scales = x.float().abs().mean(dim=1)
    on = (x >= 0).reshape(rows, chunk).view(torch.uint8)  # bool -> uint8 is a view
    if _LITTLE:  # [Note: packing 8 signs with one multiply]
        words = on.view(torch.int64)
        return ((words * _GATHER) >> 56).to(torch.uint8), scales
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=x.device)
    return (on.view(rows, chunk // 8, 8) * weights).sum(dim=2, dtype=torch.uint8), scales


@torch.no_grad()
def unpack_reference(
    bits: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Torch reference of ``onebit_unpack``: +-1.0 from the sign table, times the scale
    (one exact multiply per element)."""
    rows, nbytes = bits.shape
    index = bits.reshape(-1).to(torch.int32)
    signs = torch.index_select(_sign_table(bits.device), 0, index).view(rows, nbytes * 8)
    return signs.mul_(scales.float().view(rows, 1)).to(dtype)


dispatch.register(PACK, pack_reference, name="onebit_pack_reference")
dispatch.register(UNPACK, unpack_reference, name="onebit_unpack_reference")


# ----------------------------------------------------------------------------- CPU residual

# [Note: signs and residual in one CPU loop]
# The compressor needs, per row, the packed signs of ``y`` and the error feedback
# ``y - C(y)``, ``C(y) = +-scale`` by the same signs (the scale known first: mean |y|,
# rounded to its 8-bit code). With the torch ops that is ``y >= 0`` (a bool pass, the
# slowest elementwise op on a CPU), the packing, the sign-table gather, the product by
# the scale and the subtraction: five passes. ``torch.compile`` (inductor's C++) fuses
# them into one loop over the block: the same bits (a comparison, shifts and ors, one
# rounded subtraction of +-scale per element, no reassociation), checked against
# ``pack_residual_reference`` in tests/kernels/test_onebit_kernels.py. Measured on the
# 2-core box, one thread, 2^18-element blocks of 32-element rows: 0.46 ms a block
# against 1.37 ms for the torch ops (21M elements: 37 ms against 110 ms). It is compiled
# once per process and block shape (~10 s; cached on disk by inductor across
# processes), so the caller uses it only on the full blocks of a long vector; the rest,
# and every device but the CPU, run the reference. ``FSCALE_ONEBIT_COMPILE=0`` turns
# it off; a compile that fails turns it off with a warning.
_COMPILED: dict = {}
_COMPILE_ENV = "FSCALE_ONEBIT_COMPILE"


def _pack_residual_loop(y: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    v = y.view(y.shape[0], -1, 8)
    bits = (v[..., 0] >= 0).to(torch.uint8)
    for k in range(1, 8):
        bits = bits | ((v[..., k] >= 0).to(torch.uint8) << k)
    s = scales.view(-1, 1)
    y.copy_(y - torch.where(y >= 0, s, -s))
    return bits


@torch.no_grad()
def pack_residual_reference(y: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The packed signs of ``y`` (rows, chunk) fp32, then ``y -= C(y)`` in place with
    ``C`` = +-``scales`` by those signs; returns the bits (``pack_reference``'s)."""
    bits, _ = pack_reference(y)
    y.sub_(unpack_reference(bits, scales))
    return bits


def _compiled(name: str, fn):
    """``fn`` compiled once per process (None when ``FSCALE_ONEBIT_COMPILE=0`` or after a
    failed compile)."""
    got = _COMPILED.get(name)
    if got is None:
        if os.environ.get(_COMPILE_ENV, "1") == "0":
            return None
        got = _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return got or None


def _run_compiled(name: str, fn, reference, *args):
    compiled = _compiled(name, fn)
    if compiled is None:
        return reference(*args)
    try:
        return compiled(*args)
    except Exception as e:  # no compiler on the box, an inductor bug: the torch ops
        warnings.warn(
            f"onebit: the compiled CPU loop failed ({e}); using the torch ops.", stacklevel=3
        )
        _COMPILED[name] = False
        return reference(*args)


def _cpu_contiguous(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in ts)


@torch.no_grad()
def pack_residual_(y: torch.Tensor, scales: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """``pack_residual_reference``; with ``fused`` on a CPU, by the compiled loop
    ([Note: signs and residual in one CPU loop])."""
    if y.dtype != torch.float32 or not _cpu_contiguous(y):
        return pack_residual_reference(y, scales)
    lib = onebit_cpu.loops()  # [Note: the 1-bit CPU loops in C]: any size
    if lib is not None and y.dim() == 2 and y.shape[1] % 8 == 0 and onebit_cpu.ok(scales):
        if scales.dtype == torch.float32 and scales.numel() == y.shape[0]:
            rows, chunk = y.shape
            bits = torch.empty((rows, chunk // 8), dtype=torch.uint8)
            lib.pack_residual(y.data_ptr(), scales.data_ptr(), bits.data_ptr(), rows, chunk)
            return bits
    if not fused:
        return pack_residual_reference(y, scales)
    return _run_compiled("pack_residual", _pack_residual_loop, pack_residual_reference, y, scales)


# [Note: unpacking in one CPU loop]
# ``unpack_reference`` gathers +-1.0 rows from the sign table (an int32 index per byte,
# an (n, 8) gather) and multiplies by the scale: two passes and a temporary, ~0.3 ms
# per 2^18 elements on one thread. The compiled loop shifts each bit out of its byte
# and selects +scale or -scale: the same values (+-1.0 x s is exactly +-s, signed
# zeros included; a NaN scale gives a NaN either way), in one pass, ~0.2 ms. Used, as
# the compiled pack, on full blocks of long vectors only (``fused``).
def _unpack_loop(bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    b = bits.to(torch.int32).unsqueeze(-1)
    on = ((b >> torch.arange(8, dtype=torch.int32, device=bits.device)) & 1) != 0
    s = scales.view(-1, 1, 1)
    return torch.where(on, s, -s).view(bits.shape[0], -1)


@torch.no_grad()
def unpack_(bits: torch.Tensor, scales: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """``unpack_reference`` (fp32); with ``fused`` on a CPU, by the compiled loop
    ([Note: unpacking in one CPU loop])."""
    if not _cpu_contiguous(bits, scales) or scales.dtype != torch.float32:
        return unpack_reference(bits, scales)
    lib = onebit_cpu.loops()  # [Note: the 1-bit CPU loops in C]: any size
    if lib is not None and bits.dtype == torch.uint8 and bits.dim() == 2:
        rows, nbytes = bits.shape
        if scales.numel() == rows:
            out = torch.empty((rows, nbytes * 8), dtype=torch.float32)
            lib.unpack(bits.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, nbytes * 8)
            return out
    if not fused:
        return unpack_reference(bits, scales)
    return _run_compiled("unpack", _unpack_loop, unpack_reference, bits, scales)


# [Note: the server's mean in one CPU loop]
# The server unpacks the N pieces it received (N model-sized / N blocks of +-scale),
# sums them in rank order, divides by N, adds the mean into its error and takes the
# absolute values for the next scales: with the torch ops, an unpack per piece, four
# passes and two fresh temporaries per block. The compiled loop reads the bits and
# the error once and writes the error and ``|z|``, with the same operations on each
# element in the same order (IEEE single ops: inductor builds with
# ``-ffp-contract=off``, no unsafe math, and keeps the ``+ 0.0`` that turns a sum of
# ``-0.0`` into torch's ``+0.0``), so the same bits, checked against
# ``server_mean_reference`` in tests/kernels/test_onebit_kernels.py. Measured on the
# 2-core box, one thread, 2^18-element blocks of two pieces: ~0.5 ms a block against
# ~1.3 ms. Compiled and used as the pack loop is: full blocks of long vectors only.


def _server_mean_loop(bits: torch.Tensor, scales: torch.Tensor, z: torch.Tensor, mag) -> None:
    # Shapes kept as (.., bytes, 8), as in _unpack_loop: inductor vectorises the 8.
    world, rows, nbytes = bits.shape
    b = bits.to(torch.int32).unsqueeze(-1)
    on = ((b >> torch.arange(8, dtype=torch.int32, device=bits.device)) & 1) != 0
    s = scales.view(world, rows, 1, 1)
    pieces = torch.where(on, s, -s)  # (world, rows, nbytes, 8)
    total = pieces[0] + pieces[1] if world > 1 else pieces[0] + 0.0
    for r in range(2, world):
        total = total + pieces[r]
    out = z.view(rows, nbytes, 8) + (total + 0.0) / world
    z.view(rows, nbytes, 8).copy_(out)
    mag.view(rows, nbytes, 8).copy_(out.abs())


@torch.no_grad()
def server_mean_reference(bits, scales, z, mag) -> None:
    """``z += mean`` of the ``world`` unpacked pieces ``bits`` (world, rows, chunk // 8)
    by ``scales`` (world, rows), summed in rank order from +0.0 (``torch.mean``'s
    bits), and ``|z|`` into ``mag``; ``z``, ``mag`` (rows, chunk) fp32."""
    world, rows, nbytes = bits.shape
    pieces = unpack_reference(bits.reshape(world * rows, nbytes), scales.reshape(-1))
    pieces = pieces.view(world, rows, nbytes * 8)
    total = pieces[0] + pieces[1] if world > 1 else pieces[0] + 0.0
    for r in range(2, world):
        total.add_(pieces[r])
    z.add_(total.add_(0.0).div_(world))
    torch.abs(z, out=mag)


@torch.no_grad()
def server_mean_(bits, scales, z, mag, *, fused: bool = False) -> None:
    """``server_mean_reference``; with ``fused`` on a CPU, by one compiled loop
    ([Note: the server's mean in one CPU loop])."""
    # bits and scales may be strided: the server's are (world, rows) slices of a block.
    ok = _cpu_contiguous(z, mag) and bits.device.type == scales.device.type == "cpu"
    if not ok or scales.dtype != torch.float32 or z.dtype != torch.float32:
        return server_mean_reference(bits, scales, z, mag)
    lib = onebit_cpu.loops()  # [Note: the 1-bit CPU loops in C]: any size
    world, rows, nbytes = bits.shape
    if (
        lib is not None
        and bits.dtype == torch.uint8
        and mag.dtype == torch.float32
        and z.numel() == mag.numel() == rows * nbytes * 8
        and scales.shape == (world, rows)
        and bits.stride()[1:] == (nbytes, 1)  # each piece's rows contiguous
        and scales.stride(1) == 1
    ):
        lib.server_mean(
            bits.data_ptr(), bits.stride(0), scales.data_ptr(), scales.stride(0), world,
            z.data_ptr(), mag.data_ptr(), rows, nbytes * 8,
        )  # fmt: skip
        return None
    if not fused:
        return server_mean_reference(bits, scales, z, mag)
    _run_compiled("server_mean", _server_mean_loop, server_mean_reference, bits, scales, z, mag)


# ----------------------------------------------------------------------------- Triton


def _pack_kernel(x_ptr, bits_ptr, scale_ptr, CHUNK: tl.constexpr, BYTES: tl.constexpr):
    # One program per row: pass 1 sums |x| for the scale, pass 2 packs 8 signs a byte
    # (a [BYTES, 8] tile, reduced along the 8 with power-of-two weights).
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * CHUNK
    cols = tl.arange(0, 8)
    acc = tl.zeros([BYTES, 8], dtype=tl.float32)
    for start in range(0, CHUNK // 8, BYTES):
        b = start + tl.arange(0, BYTES)
        offs = b[:, None] * 8 + cols[None, :]
        mask = b[:, None] < CHUNK // 8
        acc += tl.abs(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(scale_ptr + row, tl.sum(tl.sum(acc, axis=1), axis=0) / CHUNK)
    weights = (1 << cols).to(tl.int32)
    for start in range(0, CHUNK // 8, BYTES):
        b = start + tl.arange(0, BYTES)
        offs = b[:, None] * 8 + cols[None, :]
        mask = b[:, None] < CHUNK // 8
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        byte = tl.sum(tl.where(x >= 0, weights[None, :], 0), axis=1)
        tl.store(bits_ptr + row * (CHUNK // 8) + b, byte.to(tl.uint8), mask=b < CHUNK // 8)


def _unpack_kernel(bits_ptr, scale_ptr, out_ptr, CHUNK: tl.constexpr, BYTES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    cols = tl.arange(0, 8)
    for start in range(0, CHUNK // 8, BYTES):
        b = start + tl.arange(0, BYTES)
        byte = tl.load(bits_ptr + row * (CHUNK // 8) + b, mask=b < CHUNK // 8, other=0)
        on = (byte.to(tl.int32)[:, None] >> cols[None, :]) & 1
        val = tl.where(on == 1, scale, -scale)
        offs = b[:, None] * 8 + cols[None, :]
        tl.store(
            out_ptr + row * CHUNK + offs,
            val.to(out_ptr.dtype.element_ty),
            mask=b[:, None] < CHUNK // 8,
        )


_pack_jit = LazyJit(_pack_kernel)
_unpack_jit = LazyJit(_unpack_kernel)


def _bytes_block(chunk: int) -> int:
    return min(256, triton.next_power_of_2(max(chunk // 8, 1)))


@torch.no_grad()
def pack_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``onebit_pack``: one program per row (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(x)
    x = x.contiguous()
    rows, chunk = x.shape
    bits = torch.empty((rows, chunk // 8), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        kernel, _ = _pack_jit()
        kernel[(rows,)](x, bits, scales, CHUNK=chunk, BYTES=_bytes_block(chunk))
    return bits, scales


@torch.no_grad()
def unpack_triton(
    bits: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton ``onebit_unpack``."""
    bits, scales = bits.contiguous(), scales.float().contiguous()
    rows, nbytes = bits.shape
    out = torch.empty((rows, nbytes * 8), dtype=dtype, device=bits.device)
    if rows:
        kernel, _ = _unpack_jit()
        kernel[(rows,)](bits, scales, out, CHUNK=nbytes * 8, BYTES=_bytes_block(nbytes * 8))
    return out


if triton is not None:
    dispatch.register(PACK, pack_triton, device="cuda", priority=10, name="onebit_pack_triton")
    dispatch.register(
        UNPACK, unpack_triton, device="cuda", priority=10, name="onebit_unpack_triton"
    )


# ----------------------------------------------------------------------------- entry points


def onebit_pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs of ``x`` (rows, chunk) packed 8 per byte + mean |x| per row (kernel table)."""
    return dispatch.resolve(PACK, x).impl(x)


def onebit_unpack(
    bits: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale * sign`` per element, (rows, 8 * bytes), from ``onebit_pack``'s output."""
    return dispatch.resolve(UNPACK, bits, dtype).impl(bits, scales, dtype)
