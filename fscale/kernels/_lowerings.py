"""The kernel table's rules for the quantized linears, registered in one place.

Each op has its torch reference (``device="any"``) beside the rules for the GPUs that
run something faster; ``fscale.hw.dispatch.resolve`` picks the highest-priority rule
that fits x's device, capability and dtype, and ``fs.explain`` / ``quantize_report``
name it. The modules that define the implementations import no registration code:

    fpx.py            formats, packing, torch reference     (imports no kernel)
    fpx_gluon.py      Hopper kernel                         (imports fpx)
    fpx_triton.py     CUDA entry points, tuning             (imports fpx, fpx_gluon, _fpx_*)
    fpx_a8.py         FPx weights, e4m3 activations (W6A8)  (imports fpx, intq)
    intq.py           int8/int4, W8A8, FP8 formats, refs    (imports intq_triton)
    intq_triton.py    int8/int4 Triton lowering             (imports no fscale kernel module)
    _lowerings.py     this file: imports them all and registers

``fscale/kernels/__init__.py`` imports this module, so importing any
``fscale.kernels`` module (``from fscale.kernels import fpx``, as the quantize
transform and the benchmarks do) fills the table; nothing else needs to.

| op            | lowering                | device | capability | x dtypes          | priority |
|---------------|-------------------------|--------|------------|-------------------|----------|
| fpx_linear    | fpx_linear_reference    | any    |            | any               | 0        |
| fpx_linear    | fpx_linear_triton       | cuda   | >= (8, 0)  | fp16, bf16        | 10       |
| fpx_linear    | fpx_linear_gluon        | cuda   | >= (9, 0)  | fp16, bf16        | 20       |
| int_linear    | int_linear_reference    | any    |            | any               | 0        |
| int_linear    | int_linear_triton       | cuda   | >= (8, 0)  | fp16, bf16, fp32  | 10       |
| w8a8_linear   | w8a8_linear_reference   | any    |            | any               | 0        |
| w8a8_linear   | w8a8_linear_int_mm      | cuda   |            | any               | 10       |
| fp8_linear    | fp8_linear_reference    | any    |            | any               | 0        |
| fp8_linear    | fp8_linear_scaled_mm    | cuda   | >= (8, 9)  | fp16, bf16, fp32  | 10       |
| fpx_a8_linear | fpx_a8_linear_reference | any    |            | any               | 0        |
| fpx_a8_linear | fpx_a8_linear_scaled_mm | cuda   | >= (8, 9)  | fp16, bf16, fp32  | 10       |

The Triton and Gluon rules are registered only where this triton can build them, the
torch-op rules only where this torch has the op.
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels import fpx, fpx_a8, fpx_gluon, fpx_triton, intq, intq_triton

# ----------------------------------------------------------------------------- FPx

dispatch.register(fpx.OP, fpx.fpx_linear_reference, name="fpx_linear_reference")
if fpx_triton.triton is not None:
    dispatch.register(
        fpx.OP,
        fpx_triton.fpx_linear_triton,
        device="cuda",
        min_capability=(8, 0),
        dtypes=fpx_triton.DTYPES,
        priority=10,
        name="fpx_linear_triton",
    )
if fpx_triton.triton is not None and fpx_gluon.gluon is not None:
    # Above the Triton rule on sm_90: its tuning times the Gluon kernel's launches
    # beside the Triton kernel's (fpx_triton.fpx_linear_hopper), for the formats the
    # Gluon kernel takes; for the others it has only the Triton launches to time.
    dispatch.register(
        fpx.OP,
        fpx_triton.fpx_linear_hopper,
        device="cuda",
        min_capability=(9, 0),
        dtypes=fpx_triton.DTYPES,
        priority=20,
        name="fpx_linear_gluon",
    )

# ----------------------------------------------------------------------------- int8 / int4

dispatch.register(intq.INT_OP, intq.int_linear_reference, name="int_linear_reference")
if intq_triton.triton is not None:
    dispatch.register(
        intq.INT_OP,
        intq_triton.int_linear_triton,
        device="cuda",
        min_capability=(8, 0),
        dtypes=intq_triton.DTYPES,
        priority=10,
        name="int_linear_triton",
    )

# ----------------------------------------------------------------------------- W8A8, FP8

dispatch.register(intq.W8A8_OP, intq.w8a8_linear_reference, name="w8a8_linear_reference")
if hasattr(torch, "_int_mm"):
    # CUDA only: on a CPU torch._int_mm is slower than the reference's exact fp32
    # matmuls (README.md here).
    dispatch.register(
        intq.W8A8_OP, intq.w8a8_linear_int_mm, device="cuda", priority=10,
        name="w8a8_linear_int_mm",
    )  # fmt: skip

dispatch.register(intq.FP8_OP, intq.fp8_linear_reference, name="fp8_linear_reference")
if hasattr(torch, "_scaled_mm"):
    dispatch.register(
        intq.FP8_OP,
        intq.fp8_linear_scaled_mm,
        device="cuda",
        min_capability=(8, 9),  # tuples: sm_89 (Ada) has fp8 tensor cores, sm_86 does not
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        priority=10,
        name="fp8_linear_scaled_mm",
    )

dispatch.register(fpx_a8.OP, fpx_a8.fpx_a8_linear_reference, name="fpx_a8_linear_reference")
if fpx_a8.triton is not None and hasattr(torch, "_scaled_mm"):
    dispatch.register(
        fpx_a8.OP,
        fpx_a8.fpx_a8_linear_scaled_mm,
        device="cuda",
        min_capability=(8, 9),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        priority=10,
        name="fpx_a8_linear_scaled_mm",
    )
