"""1-bit compression's CPU loops in C: signs and residual, unpacking, the server's mean,
and 1-bit Adam's per-element momentum and step, each one pass over memory.

[Note: the 1-bit CPU loops in C]
On a CPU the 1-bit exchange is a handful of elementwise passes per element (the
local momentum, the quotient into the worker error, the signs, the residual, the
unpacking, the product by the denominator, the step). Torch runs them one op at a
time (a pass over memory each); ``torch.compile`` fuses some but costs ~0.1 ms of
guards and wrappers per call and a compile per shape, so it could only take full
blocks of a fixed size. These loops are plain C ([Note: C loops on the host] in
``fscale/kernels/_cbuild.py``: built once per machine, called through ``ctypes``).

They compute the same bits as the torch ops they replace, by doing the same IEEE
single-precision operations on each element in the same order: built with
``-ffp-contract=off`` (no fused multiply-adds the source does not ask for) and
without ``-ffast-math``; where torch's kernel uses a fused multiply-add (``lerp``:
``fma(w, end - m, m)`` for ``|w| < 0.5``, else ``fma(w - 1, end - m, end)``), the C
calls ``fmaf``, exactly rounded on every machine. Each loop has its torch reference
(here or in ``fscale/kernels/onebit.py``), and tests/kernels/test_onebit_cpu.py
compares them bit for bit, with +-0, +-inf and NaN inputs and lengths that are not
multiples of a vector. ``FSCALE_ONEBIT_COMPILE=0`` turns the loops off, as a build
that fails does (with a warning): the callers then run the torch ops.

Usage::

    lib = loops()                          # None: use the torch ops
    if lib is not None and ok(y, scales):
        lib.pack_residual(ptr(y), ptr(scales), ptr(bits), rows, chunk)
"""

from __future__ import annotations

import ctypes

import torch

from fscale.kernels._cbuild import F32, I32, I64, P, library

_ENV = "FSCALE_ONEBIT_COMPILE"

# Element e of a packed vector (chunk elements a row) is bit e % 8 of byte e / 8: set
# for +scale, clear for -scale, scale = scales[e / chunk] (fscale/kernels/onebit.py).
_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE 1024

/* out[i] = +-scale of element e + i of the packed vector, i < n; where(bit, s, -s). */
static void expand(const uint8_t *bits, const float *scales, int64_t chunk, int64_t e,
                   int64_t n, float *restrict out) {
    int64_t i = 0, row = e / chunk, row_end = (row + 1) * chunk - e;
    for (; i < n; row++, row_end += chunk) {
        int64_t end = row_end < n ? row_end : n;
        float s = scales[row], ns = -s;
        for (; i < end && ((e + i) & 7); i++) {
            int64_t y = e + i;
            out[i] = ((bits[y >> 3] >> (y & 7)) & 1) ? s : ns;
        }
#ifdef __AVX2__
        /* A byte's 8 bits as lane masks, a blend of -s and s: the same values. */
        const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 vs = _mm256_set1_ps(s), vns = _mm256_set1_ps(ns);
        for (; i + 8 <= end; i += 8) {
            __m256i b = _mm256_set1_epi32(bits[(e + i) >> 3]);
            __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(b, lanes), lanes);
            _mm256_storeu_ps(out + i, _mm256_blendv_ps(vns, vs, _mm256_castsi256_ps(on)));
        }
#else
        for (; i + 8 <= end; i += 8) {
            uint8_t b = bits[(e + i) >> 3];
            for (int k = 0; k < 8; k++) out[i + k] = ((b >> k) & 1) ? s : ns;
        }
#endif
        for (; i < end; i++) {
            int64_t y = e + i;
            out[i] = ((bits[y >> 3] >> (y & 7)) & 1) ? s : ns;
        }
    }
}

/* y (rows, chunk): bits of y >= 0, then y -= (bit ? s : -s) (pack_residual_reference). */
void pack_residual(float *restrict y, const float *restrict scales, uint8_t *restrict bits,
                   int64_t rows, int64_t chunk) {
    for (int64_t r = 0; r < rows; r++) {
        float s = scales[r], ns = -s;
        float *yr = y + r * chunk;
        uint8_t *br = bits + r * (chunk / 8);
        int64_t j = 0;
#ifdef __AVX2__
        /* x >= 0 as an ordered compare (false for NaN, true for -0.0), its lane bits
           LSB first by movemask; x - (s or -s) by a blend: the same values. */
        const __m256 vs = _mm256_set1_ps(s), vns = _mm256_set1_ps(ns);
        const __m256 zero = _mm256_setzero_ps();
        for (; j < chunk / 8; j++) {
            __m256 x = _mm256_loadu_ps(yr + 8 * j);
            __m256 on = _mm256_cmp_ps(x, zero, _CMP_GE_OQ);
            br[j] = (uint8_t)_mm256_movemask_ps(on);
            _mm256_storeu_ps(yr + 8 * j, _mm256_sub_ps(x, _mm256_blendv_ps(vns, vs, on)));
        }
#endif
        for (; j < chunk / 8; j++) {
            uint8_t b = 0;
            for (int k = 0; k < 8; k++) {
                float x = yr[8 * j + k];
                int on = x >= 0.0f;
                b |= (uint8_t)(on << k);
                yr[8 * j + k] = x - (on ? s : ns);
            }
            br[j] = b;
        }
    }
}

/* out (rows * chunk) = +-scale (unpack_reference for finite scales). */
void unpack(const uint8_t *bits, const float *scales, float *restrict out, int64_t rows,
            int64_t chunk) {
    expand(bits, scales, chunk, 0, rows * chunk, out);
}

/* The server's mean (server_mean_reference): world pieces of rows * chunk elements,
   piece r's bits at bits + r * bits_stride bytes, its scales at scales + r * s_stride;
   z += (sum in rank order + 0) / world, mag = |z|. */
void server_mean(const uint8_t *bits, int64_t bits_stride, const float *scales,
                 int64_t s_stride, int64_t world, float *restrict z, float *restrict mag,
                 int64_t rows, int64_t chunk) {
    float total[TILE], piece[TILE];
    int64_t n = rows * chunk;
    float w = (float)world;
    for (int64_t e = 0; e < n; e += TILE) {
        int64_t k = n - e < TILE ? n - e : TILE;
        expand(bits, scales, chunk, e, k, total);
        if (world == 1) {
            for (int64_t i = 0; i < k; i++) total[i] = total[i] + 0.0f;
        }
        for (int64_t r = 1; r < world; r++) {
            expand(bits + r * bits_stride, scales + r * s_stride, chunk, e, k, piece);
            for (int64_t i = 0; i < k; i++) total[i] = total[i] + piece[i];
        }
        for (int64_t i = 0; i < k; i++) {
            float v = z[e + i] + (total[i] + 0.0f) / w;
            z[e + i] = v;
            mag[e + i] = fabsf(v);
        }
    }
}

/* 1-bit Adam's worker side per element: m = lerp(m, g, w) (torch's formula, fmaf),
   then y += m / d (addcdiv_ with value 1). */
void lerp_addcdiv(float *restrict m, const float *restrict g, const float *restrict d,
                  float *restrict y, int64_t n, float w) {
    if (fabsf(w) < 0.5f) {
        for (int64_t i = 0; i < n; i++) {
            float mi = fmaf(w, g[i] - m[i], m[i]);
            m[i] = mi;
            y[i] = y[i] + mi / d[i];
        }
    } else {
        float w1 = w - 1.0f;
        for (int64_t i = 0; i < n; i++) {
            float gi = g[i], mi = fmaf(w1, gi - m[i], gi);
            m[i] = mi;
            y[i] = y[i] + mi / d[i];
        }
    }
}

/* 1-bit Adam's step per element of the decoded mean (elements e .. e + n of the packed
   vector): v = +-scale, 0 at the dead positions (sorted, relative to e); m = v * d;
   p = p * shrink (if decay); p -= (m / d) * step. */
void decode_step(const uint8_t *bits, const float *scales, int64_t chunk, int64_t e,
                 int64_t n, const float *restrict d, float *restrict m, float *restrict p,
                 float step, float shrink, int decay, const int64_t *dead, int64_t ndead) {
    float v[TILE];
    int64_t di = 0;
    for (int64_t a = 0; a < n; a += TILE) {
        int64_t k = n - a < TILE ? n - a : TILE;
        expand(bits, scales, chunk, e + a, k, v);
        while (di < ndead && dead[di] < a + k) {
            v[dead[di] - a] = 0.0f;
            di++;
        }
        const float *da = d + a;
        float *ma = m + a, *pa = p + a;
        if (decay) {
            for (int64_t i = 0; i < k; i++) pa[i] = pa[i] * shrink;
        }
        for (int64_t i = 0; i < k; i++) {
            float mi = v[i] * da[i];
            ma[i] = mi;
            pa[i] = pa[i] - (mi / da[i]) * step;
        }
    }
}
"""

_SIGS = {
    "pack_residual": (P, P, P, I64, I64),
    "unpack": (P, P, P, I64, I64),
    "server_mean": (P, I64, P, I64, I64, P, P, I64, I64),
    "lerp_addcdiv": (P, P, P, P, I64, F32),
    "decode_step": (P, P, I64, I64, I64, P, P, P, F32, F32, I32, P, I64),
}


def loops() -> ctypes.CDLL | None:
    """The built C loops, or None (``FSCALE_ONEBIT_COMPILE=0``, or the build failed)."""
    return library("onebit", _SOURCE, _SIGS, env=_ENV)


def ok(*ts: torch.Tensor) -> bool:
    """The loops take contiguous CPU tensors (fp32 floats)."""
    return all(
        t.device.type == "cpu"
        and t.is_contiguous()
        and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in ts
    )


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def lerp_addcdiv_reference(m, g, d, y, w: float) -> None:
    """``m.lerp_(g, w)``, then ``y.addcdiv_(m, d)`` (all fp32, same shape)."""
    m.lerp_(g, w)
    y.addcdiv_(m, d)


@torch.no_grad()
def lerp_addcdiv_(m, g, d, y, w: float) -> None:
    """``lerp_addcdiv_reference`` by the C loop when it can run (flat fp32 CPU tensors)."""
    lib = loops()
    if lib is None or not ok(m, g, d, y) or not m.numel() == g.numel() == d.numel() == y.numel():
        return lerp_addcdiv_reference(m, g, d, y, w)
    lib.lerp_addcdiv(ptr(m), ptr(g), ptr(d), ptr(y), m.numel(), w)


@torch.no_grad()
def decode_step_reference(vals, d, m, p, *, step: float, shrink: float | None, dead=None):
    """1-bit Adam's step on decoded values ``vals`` (flat fp32, changed): zero at
    ``dead`` (flat positions), ``m = vals * d``, ``p *= shrink`` (when given), ``p -=
    (m / d) * step``."""
    if dead is not None and dead.numel():
        vals.index_fill_(0, dead, 0.0)
    if shrink is not None:
        p.mul_(shrink)
    mm = torch.mul(vals, d, out=m)
    p.sub_(torch.div(mm, d).mul_(step).to(p.dtype))
