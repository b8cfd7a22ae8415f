"""What every Triton kernel module here shares: interpreter detection, lazy jit, SM
count, launch tuning by kernel time, and the arrival counters of one-kernel split-K.

``triton.jit`` decides between compiling and interpreting when it *wraps* a
function (triton 3.x reads ``TRITON_INTERPRET`` there, not at launch), so kernels
are wrapped lazily, once per mode: a test can then set the variable after the
module was imported by someone else.

Usage::

    _kernel = LazyJit(_my_kernel)       # at import; the raw function is plain Python
    kernel, interpret = _kernel()       # at launch
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton, or none: kernels then launch without PDL
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """Triton will interpret kernels on the CPU (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


class LazyJit:
    """``triton.jit(fn)``, made on first use in each mode (compiled or interpreted)."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted: dict[bool, object] = {}

    def __call__(self):
        interpret = interpreting()
        if interpret not in self._jitted:
            self._jitted[interpret] = triton.jit(self.fn)
        return self._jitted[interpret], interpret


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 stands in off CUDA, for the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


# [Note: programmatic dependent launch]
# A batch-1 decode step is ~300 kernels of a few microseconds each: between two of
# them the GPU drains one grid and ramps up the next, and a one-program kernel (a
# norm) leaves the other SMs idle. With programmatic dependent launch (sm_90+), a
# kernel launched with ``launch_pdl=True`` may start while the kernel before it on
# the stream still runs, once every program of that one has called
# ``gdc_launch_dependents()`` (or exited). The rules each PDL kernel here keeps:
#   - before ``gdc_wait()`` it reads only memory that no kernel of the step writes
#     (weights: the GEMV streams its first chunk there) and writes nothing;
#   - ``gdc_wait()`` returns once the previous kernel has finished and its writes are
#     visible; that one waited for its own predecessor before it let this one launch,
#     so everything earlier on the stream is finished too;
#   - it calls ``gdc_launch_dependents()`` right after the wait: at most one kernel
#     waits ahead, and only once this one's last wave is on the SMs.
# A kernel without the attribute (cuBLAS, torch ops) waits for its predecessor as
# usual, and a PDL kernel after one simply finds it finished. Graph capture keeps
# the attribute as a programmatic edge. ``FSCALE_PDL=0`` turns it off (A/B runs).


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)


def pdl(device: torch.device) -> bool:
    """Launch this device's kernels with programmatic dependent launch (see [Note:
    programmatic dependent launch]): CUDA sm_90+, compiled (not interpreted) Triton,
    and ``FSCALE_PDL`` not ``0``."""
    if device.type != "cuda" or gdc_wait is None or interpreting():
        return False
    return os.environ.get("FSCALE_PDL", "1") != "0" and _capability(device) >= (9, 0)


# (device, stream) -> int32 arrival counters, left zeroed by every launch.
COUNTERS: dict[tuple, torch.Tensor] = {}


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed counters for ``tiles`` output tiles of a one-kernel split-K launch (see
    [Note: split-K without extra kernels] in _fpx_triton_kernel.py).

    Every launch that counts on them sets them back to 0, so they are allocated (and
    zeroed) only when a launch needs more, and kernels launched one after another on
    a stream can share them; one buffer per stream keeps launches on different
    streams apart.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = COUNTERS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return buf


def split_workspace(mode: int, y: torch.Tensor, grid: tuple, shape: tuple | None = None) -> tuple:
    """(workspace, counters) for a launch of ``grid`` = (tiles..., parts along K) writing
    ``y`` [M, N]: for one-kernel split-K (``split_mode`` 2) an fp32 [parts, M, N]
    workspace (``shape`` for [M, N] where the partials outsize y) and the stream's
    arrival counters, otherwise ``y`` twice (not read)."""
    if mode != 2:
        return y, y
    ws = torch.empty(grid[2], *(shape or y.shape), dtype=torch.float32, device=y.device)
    return ws, arrival_counters(y.device, grid[0] * grid[1])


def bucket(m: int) -> int:
    """M rounded up to a power of two: the row counts that share a tuned launch."""
    return 1 << max(0, (m - 1).bit_length())


def kernel_time(fn) -> float:
    """Median ms of ``fn``'s kernels, replayed from a CUDA graph where it can be captured.

    Eager timing adds the host's launch time, which at small M exceeds the kernels'
    and would pick configurations by host cost; serving runs decoding from graphs,
    where only the kernels count.
    """
    from triton import testing

    fn()  # compile
    try:
        return testing.do_bench_cudagraph(fn, rep=25, return_mode="median")
    except Exception:  # not capturable here: time it eagerly
        return testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


# [Note: tuning on streamed weights]
# A serving step reads every weight once from HBM: the model is many times the L2, and
# the products between two uses of a weight evict it. Timed alone, a launch runs on
# one weight over and over, and a weight that fits the L2 (an 8B model's 4096 x 4096
# FP6 planes are 12.6 MB, an H200's L2 50 MB) is then read from the L2 at every repeat
# after the first: tuning ranks the launches by a bandwidth the step never sees, and
# picked launches 0.5-0.7 us slower per product than the best with the weights in
# HBM (bench/results/fpx_gluon_sweep-8b-decode-m1-nvidia-h200.json). So a launch that
# streams its weight is timed over a chain of copies of it that together read more
# than twice the L2, as the step would, and its time is the chain's over its length.

#: Bytes a timed chain of weight copies reads, as a multiple of the GPU's L2 size.
STREAM_L2_MULTIPLE = 2
#: The most copies in a chain: a weight under 1/16 of the L2 gets a shorter chain than
#: twice the L2 (a model of such weights may well live in the L2, and thousands of
#: captured launches per candidate would make tuning a tiny layer take seconds).
MAX_STREAM_COPIES = 32


def streamed_copies(w, nbytes: int, clone, device, l2_bytes: int | None = None) -> list:
    """``[w]`` plus as many ``clone(w)`` as make a chain of products read at least
    ``STREAM_L2_MULTIPLE`` times the L2 (``l2_bytes``, default that of ``device``, a
    CUDA device; others have none to stream past) when each is read once: what
    ``streamed_timer`` times a launch over. ``FSCALE_TUNE_STREAMED=0`` gives ``[w]``
    alone (tuning on one L2-resident weight, as before; for comparing the two in a
    benchmark). At most ``MAX_STREAM_COPIES``; where the device has no room for
    more, those that fit.

    Usage: ``ws = streamed_copies(p, p.nbytes, lambda w: w.clone(), x.device)``.
    """
    if os.environ.get("FSCALE_TUNE_STREAMED", "1") == "0":
        return [w]
    if l2_bytes is None:
        if torch.device(device).type != "cuda":
            return [w]
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    copies = [w]
    wanted = -(-STREAM_L2_MULTIPLE * l2_bytes // max(1, nbytes))
    for _ in range(min(wanted, MAX_STREAM_COPIES) - 1):
        try:
            copies.append(clone(w))
        except torch.OutOfMemoryError:  # a full device: time on the copies that fit
            break
    return copies


def streamed_timer(copies: int, timer=None):
    """A ``tune`` timer for a ``run(cfg)`` that launches once per weight of a chain of
    ``copies``: ``timer``'s (default ``kernel_time``) ms over ``copies``, one launch's
    share, so that the tuning log keeps times per launch."""
    return lambda fn: (timer or kernel_time)(fn) / copies


def tune_streamed(table: dict, log: dict, key: tuple, candidates, run, weight, what: str):
    """``tune`` for a product with a packed ``weight`` (``nbytes``, ``clone()``):
    ``candidates()`` lists the launches, ``run(w, cfg)`` launches one on weight ``w``,
    timed over ``streamed_copies`` of ``weight`` where every candidate streams it (none
    is ``{"dequant": True}``, which rebuilds it once and hands it to cuBLAS), else on
    ``weight`` alone. After the first call per key this is one dict lookup.

    Usage::

        cfg = tune_streamed(_TUNED, _TUNE_LOG, key, lambda: candidates(m),
                            lambda w, cfg: my_linear(x, w, config=cfg), p, "my_linear (...)")
    """
    if key in table:
        return table[key]
    candidates = candidates()
    streams = not any(cfg.get("dequant") for cfg in candidates)
    device = weight.device
    ws = (
        streamed_copies(weight, weight.nbytes, lambda w: w.clone(), device) if streams else [weight]
    )
    return tune(
        table, log, key, lambda: candidates, lambda cfg: [run(w, cfg) for w in ws], what,
        timer=streamed_timer(len(ws)),
    )  # fmt: skip


def eager_time(fn) -> float:
    """Median ms of ``fn`` called eagerly: the host's launch time counts where it exceeds
    the kernels' (what an uncaptured call, such as a serving prefill, costs)."""
    from triton import testing

    fn()  # compile
    return testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def tune(table: dict, log: dict, key: tuple, candidates, run, what: str, timer=None) -> dict:
    """The fastest of ``candidates()`` for ``key``, timed once (``run(cfg)`` launches one)
    and kept in ``table`` (every candidate's time in ``log``), as ``triton.autotune``
    would; a candidate that fails to compile or launch is skipped. ``what`` names the
    op and the fields of ``key`` for errors; ``timer`` (default ``kernel_time``, the
    kernels alone) measures a candidate. After the first call per key this is one
    dict lookup (it sits on every launch's path).

    Usage::

        cfg = tune(_TUNED, _TUNE_LOG, (fmt, n, k, bucket(m), dev), lambda: candidates(m),
                   lambda cfg: my_linear(x, p, config=cfg), "my_linear (fmt, N, K, M, device)")
    """
    if key not in table:
        what = f"{what} = {key}"
        candidates = candidates()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Timing launches inside a capture would record them into the graph.
            raise RuntimeError(
                f"{what}: the first call per shape and M bucket tunes its launch, which "
                "cannot happen during CUDA graph capture; make one eager call first."
            )
        times = []
        for cfg in candidates:
            fn = lambda cfg=cfg: run(cfg)  # noqa: E731 (the default names the candidate)
            try:
                times.append(((timer or kernel_time)(fn), cfg))
            except Exception:  # a candidate this GPU cannot compile or launch
                continue
        if not times:
            raise RuntimeError(
                f"{what}: no launch configuration of {candidates} ran; pass config= "
                "explicitly, or set FSCALE_KERNELS=reference."
            )
        table[key] = min(times, key=lambda t: t[0])[1]
        log[key] = times
    return table[key]


def split_mode(bm: int, programs_along_k: int) -> int:
    """How a launch's programs along K combine: 0 none (one per tile), 1 fp32 atomic
    adds into a zeroed y then a cast, 2 the last program of a tile sums the partials.

    Mode 2 saves the zero and cast kernels ([Note: split-K without extra kernels]), which
    pays for 16-row tiles; with 32-row tiles its tail (one program per tile reading
    every partial) costs more than it saves, so those keep mode 1 (measurements:
    README.md, "Split-K in one kernel").
    """
    if programs_along_k <= 1:
        return 0
    return 2 if bm <= 16 else 1


def tuned_launches(table: dict, prefix: tuple) -> dict[int, dict]:
    """{M bucket: launch} chosen so far for the keys of ``table`` (a ``tune`` table)
    that start with ``prefix`` (a weight's fields, before the M bucket and device)."""
    n = len(prefix)
    return {key[n]: cfg for key, cfg in table.items() if key[:n] == prefix}


def describe_launch(cfg: dict) -> str:
    """A short name for a tuned launch: which kernel, and its main parameters."""
    if cfg.get("dequant"):
        return f"dequantize+cuBLAS/{cfg.get('pieces', 1)}"
    if cfg.get("gluon"):
        return f"gluon split{cfg.get('split', 1)} w{cfg.get('warps', 4)}"
    tile = "x".join(str(cfg[k]) for k in ("bm", "bn") if k in cfg) or "default"
    return f"triton {tile}" + (f" w{cfg['num_warps']}" if "num_warps" in cfg else "")
