"""AdamW over host fp32 tensors in C: one pass, all intra-op threads, in place or into
other tensors.

[Note: AdamW on the host, in place or elsewhere]
``offload`` updates tens of GB of host state every step, bandwidth-bound: 28 bytes
per parameter (p, g, m, v read; p, m, v written). ``torch._fused_adamw_`` does that,
but only in place. An asynchronous save wants the step after it to leave the old
state untouched and write the new one into a second buffer ([Note: buffers a
snapshot keeps] in ``fscale/state.py``): with torch's kernel that is a copy first
(24 more bytes per parameter; 106 ms against 42 ms for 64M params on a 2-core VM).
This loop reads p, g, m, v and writes p', m', v' wherever it is told: in place, or
into other tensors with non-temporal stores (no read of the destination's old
lines): 44 ms in place, 47 ms elsewhere on that VM (``bench/offload.py --parts adam``).

The results must not depend on where they are written, nor on the thread count: a
step that writes elsewhere after a save must give the bits the in-place step would
have. Every element goes through the same IEEE single-precision operations in the
same order, in the AVX2 lanes and in the scalar loop alike ([Note: C loops on the
host] in ``_cbuild.py``: no contraction but the fused multiply-adds written):
torch's vector expression, ``p * (1 - lr wd)``, ``m = fma(c, g - m, base)`` (its
``lerp``), ``v = fma((1 - b2) g, g, v b2)`` (the compiler fused that one in torch's
AVX2 build: unfused, 0.25% of v differed by an ulp), ``p + (-step_size m) /
(sqrt(v) / sqrt(1 - b2^t) + eps)``, with the coefficients rounded to fp32 from their
double values as torch does. On a 2-core AMD EPYC VM this is torch's fused kernel
bit for bit; elsewhere (another build, AVX-512, its scalar tail) it may differ by an
ulp, which the tests allow. They check the in-place and out-of-place results bit
for bit against each other, across thread counts, odd lengths and alignments.

[Note: blocks handed out as threads come free]
The loop runs one thread per core, but it rarely has the cores to itself: an
asynchronous save's writer threads, the kernel's page-cache copies and flusher, the
CRC and the next group's grad copy all run beside it. With a static split each
thread owns 1/threads of the blocks and the loop ends with its slowest thread: one
thread sharing its core with a writer for the whole update slows the update by about
as much as that thread loses, though the other cores sit idle at the end. Handing
out the blocks eight at a time (131,072 elements, 3.5 MiB of traffic: an atomic
increment per few hundred us of work, and each thread still streams long runs;
fewer where a tensor has under 32 blocks a thread, so each thread gets four turns)
lets the threads that run take the blocks of the one that does not. Which thread
updates an element does not change its bits. ``bench/host_adam_contended.py`` times both
schedules beside a niced buffered writer and a copy loop.

Usage::

    if available():
        adamw_([p], [g], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.01, step=3, out=([p2], [m2], [v2]))   # or out=None: in place
"""

from __future__ import annotations

import ctypes
import math
import struct

import torch

from fscale.kernels._cbuild import F32, I32, I64, P, library

_ENV = "FSCALE_HOST_ADAMW_COMPILE"

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define BLOCK 16384
#define STREAM_MIN 65536

typedef struct { float decay, coeff, b2, c2, bc2s, eps, neg_ss; } coefs;

/* One element: the operations of each vector lane below, in the same order. */
static inline void one(const float *pi, const float *gi, const float *mi, const float *vi,
                       float *po, float *mo, float *vo, int64_t i, const coefs *k, int small) {
    float p = pi[i] * k->decay, g = gi[i], m = mi[i];
    float mn = fmaf(k->coeff, g - m, small ? m : g);
    float vn = fmaf(k->c2 * g, g, vi[i] * k->b2);
    float den = sqrtf(vn) / k->bc2s + k->eps;
    po[i] = p + (k->neg_ss * mn) / den;
    mo[i] = mn;
    vo[i] = vn;
}

static void range(const float *pi, const float *gi, const float *mi, const float *vi,
                  float *po, float *mo, float *vo, int64_t lo, int64_t hi, const coefs *k,
                  int small, int stream) {
    int64_t i = lo;
#if defined(__AVX2__) && defined(__FMA__)
    if (stream)  /* non-temporal stores need 32-byte aligned destinations */
        for (; i < hi && ((uintptr_t)(po + i) & 31); i++)
            one(pi, gi, mi, vi, po, mo, vo, i, k, small);
    int nt = stream && !((uintptr_t)(mo + i) & 31) && !((uintptr_t)(vo + i) & 31);
    const __m256 D = _mm256_set1_ps(k->decay), C = _mm256_set1_ps(k->coeff),
                 B2 = _mm256_set1_ps(k->b2), C2 = _mm256_set1_ps(k->c2),
                 S = _mm256_set1_ps(k->bc2s), E = _mm256_set1_ps(k->eps),
                 NS = _mm256_set1_ps(k->neg_ss);
    for (; i + 8 <= hi; i += 8) {
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(pi + i), D);
        __m256 g = _mm256_loadu_ps(gi + i), m = _mm256_loadu_ps(mi + i);
        __m256 mn = _mm256_fmadd_ps(C, _mm256_sub_ps(g, m), small ? m : g);
        __m256 vn = _mm256_fmadd_ps(_mm256_mul_ps(C2, g), g,
                                    _mm256_mul_ps(_mm256_loadu_ps(vi + i), B2));
        __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vn), S), E);
        __m256 pn = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(NS, mn), den));
        if (nt) {
            _mm256_stream_ps(po + i, pn);
            _mm256_stream_ps(mo + i, mn);
            _mm256_stream_ps(vo + i, vn);
        } else {
            _mm256_storeu_ps(po + i, pn);
            _mm256_storeu_ps(mo + i, mn);
            _mm256_storeu_ps(vo + i, vn);
        }
    }
    if (nt) _mm_sfence();  /* streamed stores visible before this thread reports done */
#endif
    for (; i < hi; i++) one(pi, gi, mi, vi, po, mo, vo, i, k, small);
}

/* AdamW over n elements; po/mo/vo may be pi/mi/vi (in place). */
void adamw(const float *pi, const float *gi, const float *mi, const float *vi, float *po,
           float *mo, float *vo, int64_t n, float decay, float coeff, float b2, float c2,
           float bc2s, float eps, float neg_ss, int small, int threads) {
    coefs k = {decay, coeff, b2, c2, bc2s, eps, neg_ss};
    int stream = po != pi && n >= STREAM_MIN;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    /* [Note: blocks handed out as threads come free] */
    int64_t chunk = blocks / (4 * (int64_t)(threads > 0 ? threads : 1));
    chunk = chunk < 1 ? 1 : chunk > 8 ? 8 : chunk;
    #pragma omp parallel for schedule(dynamic, chunk) num_threads(threads) \
        if(blocks > 1 && threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        range(pi, gi, mi, vi, po, mo, vo, lo, hi, &k, small, stream);
    }
}
"""

_SIGS = {"adamw": (P, P, P, P, P, P, P, I64, *(F32,) * 7, I32, I32)}


def _loops() -> ctypes.CDLL | None:
    return library("host_adamw", _SOURCE, _SIGS, env=_ENV, flags=("-fopenmp",))


def available() -> bool:
    """Whether the C loop is built (``FSCALE_HOST_ADAMW_COMPILE=0`` turns it off)."""
    return _loops() is not None


def takes(*ts: torch.Tensor) -> bool:
    """The loop takes contiguous fp32 CPU tensors."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts
    )


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def coefficients(*, lr, beta1, beta2, eps, weight_decay, step) -> tuple:
    """The loop's fp32 coefficients, each rounded from the double torch computes."""
    step = float(_f32(float(step)))  # torch reads the step from an fp32 tensor
    bc1 = 1.0 - math.pow(beta1, step)
    bc2 = 1.0 - math.pow(beta2, step)
    w = _f32(1.0 - beta1)
    small = abs(w) < 0.5
    coeff = w if small else _f32(w - 1.0)  # exact in double, one rounding to fp32
    return (
        _f32(1.0 - lr * weight_decay),
        coeff,
        _f32(beta2),
        _f32(1.0 - beta2),
        _f32(math.sqrt(bc2)),
        _f32(eps),
        _f32(-(lr / bc1)),
    ), small


@torch.no_grad()
def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
           out=None) -> None:  # fmt: skip
    """AdamW on lists of contiguous fp32 CPU tensors (``takes``): in place, or with the
    new params and moments written into ``out = (params, exp_avgs, exp_avg_sqs)``
    (tensors of the same shapes; the inputs are then only read)."""
    lib = _loops()
    if lib is None:
        raise RuntimeError(
            "host_adamw: the C loop is not built (FSCALE_HOST_ADAMW_COMPILE=0 or no C "
            "compiler); check available() first."
        )
    k, small = coefficients(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step
    )
    outs = (params, exp_avgs, exp_avg_sqs) if out is None else out
    threads = torch.get_num_threads()
    for p, g, m, v, po, mo, vo in zip(params, grads, exp_avgs, exp_avg_sqs, *outs, strict=True):
        if not takes(p, g, m, v, po, mo, vo) or not (
            p.numel() == g.numel() == m.numel() == v.numel() == po.numel() == mo.numel()
            == vo.numel()
        ):  # fmt: skip
            raise ValueError(
                "host_adamw: needs contiguous fp32 CPU tensors of one size; got "
                f"{[(tuple(t.shape), t.dtype, t.device.type) for t in (p, g, m, v, po, mo, vo)]}."
            )
        ptrs = [t.data_ptr() for t in (p, g, m, v, po, mo, vo)]
        lib.adamw(*ptrs, p.numel(), *k, int(small), threads)
