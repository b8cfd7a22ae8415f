"""The quantized linears' rules in the kernel table (``fscale.kernels._lowerings``):
what is registered, which rule each GPU resolves, that importing any kernel module
registers them, and that the kernel modules import each other without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fscale.hw import dispatch
from fscale.kernels import fpx, fpx_gluon, fpx_triton, intq, intq_triton

KERNELS = Path(fpx.__file__).parent
REPO = KERNELS.parents[1]
HAS_TRITON = fpx_triton.triton is not None
HAS_GLUON = HAS_TRITON and fpx_gluon.gluon is not None
F16 = frozenset({torch.float16, torch.bfloat16})
F16_32 = frozenset({torch.float16, torch.bfloat16, torch.float32})
HAS_INT_MM, HAS_SCALED_MM = hasattr(torch, "_int_mm"), hasattr(torch, "_scaled_mm")

# name -> (op, device, min_capability, dtypes, priority, present)
EXPECTED = {
    "fpx_linear_reference": ("fpx_linear", "any", None, None, 0, True),
    "fpx_linear_triton": ("fpx_linear", "cuda", (8, 0), F16, 10, HAS_TRITON),
    "fpx_linear_gluon": ("fpx_linear", "cuda", (9, 0), F16, 20, HAS_GLUON),
    "int_linear_reference": ("int_linear", "any", None, None, 0, True),
    "int_linear_triton": ("int_linear", "cuda", (8, 0), F16_32, 10, HAS_TRITON),
    "w8a8_linear_reference": ("w8a8_linear", "any", None, None, 0, True),
    "w8a8_linear_int_mm": ("w8a8_linear", "cuda", None, None, 10, HAS_INT_MM),
    "fp8_linear_reference": ("fp8_linear", "any", None, None, 0, True),
    "fp8_linear_scaled_mm": ("fp8_linear", "cuda", (8, 9), F16_32, 10, HAS_SCALED_MM),
}
OPS = ("fpx_linear", "int_linear", "w8a8_linear", "fp8_linear")


def test_each_op_has_its_reference_and_gpu_rules():
    got = {
        r.name: (r.op, r.device, r.min_capability, r.dtypes, r.priority)
        for op in OPS
        for r in dispatch.lowerings(op)
    }
    want = {name: row[:5] for name, row in EXPECTED.items() if row[5]}
    assert got == want
    impls = {r.name: r.impl for op in OPS for r in dispatch.lowerings(op)}
    assert impls["fpx_linear_reference"] is fpx.fpx_linear_reference
    assert impls["int_linear_reference"] is intq.int_linear_reference
    if HAS_TRITON:
        assert impls["fpx_linear_triton"] is fpx_triton.fpx_linear_triton
        assert impls["int_linear_triton"] is intq_triton.int_linear_triton
    if HAS_GLUON:
        assert impls["fpx_linear_gluon"] is fpx_triton.fpx_linear_hopper


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "cap,dtype,fpx_rule,fp8_rule",
    [
        ((9, 0), torch.float16, "fpx_linear_gluon", "fp8_linear_scaled_mm"),
        ((9, 0), torch.bfloat16, "fpx_linear_gluon", "fp8_linear_scaled_mm"),
        ((9, 0), torch.float32, "fpx_linear_reference", "fp8_linear_scaled_mm"),
        ((10, 0), torch.float16, "fpx_linear_gluon", "fp8_linear_scaled_mm"),
        ((8, 9), torch.float16, "fpx_linear_triton", "fp8_linear_scaled_mm"),
        ((8, 6), torch.bfloat16, "fpx_linear_triton", "fp8_linear_reference"),
        ((8, 0), torch.float16, "fpx_linear_triton", "fp8_linear_reference"),
        ((7, 5), torch.float16, "fpx_linear_reference", "fp8_linear_reference"),
    ],
)
def test_each_gpu_resolves_its_rule(monkeypatch, cap, dtype, fpx_rule, fp8_rule):
    """What ``fs.explain`` and ``quantize_report`` name for a CUDA device of capability
    ``cap`` (compared as tuples: sm_86 < sm_89 < sm_90)."""
    if fpx_rule == "fpx_linear_gluon" and not HAS_GLUON:
        fpx_rule = "fpx_linear_triton"
    monkeypatch.setattr(dispatch, "capability", lambda device: cap)
    cuda = torch.device("cuda", 0)
    assert dispatch.resolve("fpx_linear", cuda, dtype).name == fpx_rule
    assert dispatch.resolve("fp8_linear", cuda, dtype).name == fp8_rule
    int_rule = "int_linear_triton" if cap >= (8, 0) else "int_linear_reference"
    assert dispatch.resolve("int_linear", cuda, dtype).name == int_rule
    assert dispatch.resolve("w8a8_linear", cuda, dtype).name == "w8a8_linear_int_mm"


@pytest.mark.parametrize("op", OPS)
def test_cpu_and_forced_reference_resolve_the_reference(monkeypatch, op):
    assert dispatch.resolve(op, torch.zeros(1, dtype=torch.float16)).name == f"{op}_reference"
    monkeypatch.setattr(dispatch, "capability", lambda device: (9, 0))
    monkeypatch.setenv("FSCALE_KERNELS", "reference")
    cuda = torch.device("cuda", 0)
    assert dispatch.resolve(op, cuda, torch.float16).name == f"{op}_reference"


def test_importing_one_kernel_module_registers_every_rule():
    """Without ``fscale/__init__`` (as bench/_source.py imports the kernels): importing
    ``fscale.kernels.fpx`` alone fills the table, the GPU rules included."""
    code = f"""
import sys, types
pkg = types.ModuleType("fscale")
pkg.__path__ = [{str(REPO / "fscale")!r}]
sys.modules["fscale"] = pkg
import fscale.kernels.fpx
from fscale.hw import dispatch
print(sorted(r.name for op in dispatch.known_ops() for r in dispatch.lowerings(op)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    names = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert {name for name, row in EXPECTED.items() if row[5]} <= names
    assert "fpx_linear_triton" in names or not HAS_TRITON


def _kernel_imports(path: Path) -> set[str]:
    """The ``fscale.kernels`` modules ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fscale.kernels":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("fscale.kernels."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fscale.kernels."):
                    found.add(alias.name.split(".")[2])
    return found


def test_kernel_modules_import_each_other_without_a_cycle():
    """fpx.py imports no kernel; only the package imports the registration module;
    the import graph of fscale/kernels/*.py has no cycle."""
    graph = {p.stem: _kernel_imports(p) for p in KERNELS.glob("*.py") if p.stem != "__init__"}
    assert graph["fpx"] == set()
    assert "fpx_triton" in graph["_lowerings"] and "fpx_gluon" in graph["_lowerings"]
    assert [m for m, deps in graph.items() if "_lowerings" in deps] == []
    assert _kernel_imports(KERNELS / "__init__.py") == {"_lowerings"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gluon_rule_times_gluon_launches_the_triton_rule_does_not(monkeypatch):
    """``_tune`` for the sm_90 rule (``gluon=True``) times ``fpx_gluon``'s launches
    first where the kernel can run, and keeps the fastest; the Triton rule's tuning
    never offers them. (Kernel times faked: Gluon launches 1 ms, the rest 2 ms.)"""
    import triton.testing

    timed: list[dict] = []

    def fake_bench(fn, **kwargs):
        cfg = fn.__defaults__[0]
        timed.append(cfg)
        fn()
        return 1.0 if cfg.get("gluon") else 2.0

    def fake_gluon(x2, p, bias=None, **cfg):
        return fpx.fpx_linear_reference(x2, p, bias)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_bench)
    monkeypatch.setattr(fpx_gluon, "available", lambda x, fmt: fmt in fpx_gluon.FORMATS)
    monkeypatch.setattr(fpx_gluon, "fpx_linear_gluon", fake_gluon)
    monkeypatch.setattr(fpx_triton, "_TUNED", {})
    x = torch.randn(2, 256)
    p = fpx.pack(torch.randn(64, 256), "e3m2")
    cfg = fpx_triton._tune(x, p, None, gluon=True)
    assert cfg == fpx_triton.gluon_configs(2)[0]  # the first of the fastest
    assert timed == fpx_triton.candidate_configs(2, gluon=True)
    timed.clear()
    p6 = fpx.pack(torch.randn(64, 256), "e2m3")  # a format the Gluon kernel cannot take
    assert "gluon" not in fpx_triton._tune(x, p6, None, gluon=True)
    assert timed == fpx_triton.candidate_configs(2)
    timed.clear()
    p5 = fpx.pack(torch.randn(32, 256), "e2m2")
    assert "gluon" not in fpx_triton._tune(x, p5, None)  # the Triton rule
    assert timed == fpx_triton.candidate_configs(2)


def test_each_entry_point_asks_for_its_candidates(monkeypatch):
    """``fpx_linear_hopper`` tunes with the Gluon candidates, ``fpx_linear_triton``
    without (the shared path's ``gluon`` flag)."""
    calls = []
    monkeypatch.setattr(fpx_triton, "_linear", lambda *args, gluon=False: calls.append(gluon))
    fpx_triton.fpx_linear_hopper(None, None)
    fpx_triton.fpx_linear_triton(None, None)
    assert calls == [True, False]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("fmt", ["e3m2", "e2m1"])
def test_gluon_rule_runs_the_triton_kernel_where_gluon_cannot(monkeypatch, fmt):
    """On CPU (the interpreter) the Gluon kernel cannot run: the sm_90 rule gives the
    Triton lowering's product, for a format Gluon takes and one it does not."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(2)
    p = fpx.pack(torch.randn(64, 256, generator=gen), fmt)
    x, bias = torch.randn(3, 256, generator=gen), torch.randn(64, generator=gen)
    got = fpx_triton.fpx_linear_hopper(x, p, bias)
    assert torch.equal(got, fpx_triton.fpx_linear_triton(x, p, bias))
    torch.testing.assert_close(got, fpx.fpx_linear_reference(x, p, bias), rtol=1e-5, atol=1e-4)
