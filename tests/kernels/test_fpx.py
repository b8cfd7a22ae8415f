"""FPx formats, bit-plane packing and the torch reference ``fpx_linear``.

encode/decode are checked on every code of every format and, for random float32
inputs, against a brute-force nearest search over the format's value table. The
Triton lowering is tested in test_fpx_triton.py, the Gluon one in test_fpx_gluon.py,
their registration in test_lowerings.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.kernels import fpx

FMTS = list(fpx.FORMATS)

# ---------------------------------------------------------------- encode / decode


def _value_table(fmt: str) -> list[float]:
    """Every code's value from the definition, written independently of fpx.py."""
    e_bits, m_bits = fpx.FORMATS[fmt]
    b = 2 ** (e_bits - 1) - 1
    out = []
    for code in range(2 ** (1 + e_bits + m_bits)):
        s = -1.0 if code >> (e_bits + m_bits) else 1.0
        e = (code >> m_bits) & (2**e_bits - 1)
        m = code & (2**m_bits - 1)
        mag = (m / 2**m_bits) * 2.0 ** (1 - b) if e == 0 else (1 + m / 2**m_bits) * 2.0 ** (e - b)
        out.append(math.copysign(mag, s))
    return out


def _nearest_code(x: float, fmt: str) -> int:
    """Brute force: the code of the nearest value, ties to the even code, sign kept."""
    e_bits, m_bits = fpx.FORMATS[fmt]
    table = _value_table(fmt)
    n_mag = 2 ** (e_bits + m_bits)
    a = min(abs(x), table[n_mag - 1])
    best = min(range(n_mag), key=lambda c: (abs(table[c] - a), c % 2))
    return best | ((n_mag) if math.copysign(1.0, x) < 0 else 0)


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_matches_definition_on_every_code(fmt):
    n = fpx.nbits(fmt)
    codes = torch.arange(2**n, dtype=torch.uint8)
    got = fpx.decode(codes, fmt)
    assert got.dtype == torch.float32
    assert got.tolist() == _value_table(fmt)
    assert fpx.max_finite(fmt) == max(_value_table(fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_inverts_decode_on_every_code(fmt):
    """Exact, -0 included: the sign of a zero is kept (code 0 and 2**(E+M) both survive)."""
    codes = torch.arange(2 ** fpx.nbits(fmt), dtype=torch.uint8)
    assert torch.equal(fpx.encode(fpx.decode(codes, fmt), fmt), codes)


def test_known_maxima_and_e3m2_values():
    assert fpx.max_finite("e3m2") == 28.0
    assert fpx.max_finite("e2m3") == 7.5
    assert fpx.max_finite("e2m2") == 7.0
    assert fpx.max_finite("e3m1") == 24.0
    assert fpx.max_finite("e2m1") == 6.0
    # e3m2: smallest subnormal 2**-2 * 2**(1-3) = 1/16; 1.0 is exponent 3, mantissa 0.
    codes = torch.tensor([1, 0b001100, 0b101100], dtype=torch.uint8)
    assert fpx.decode(codes, "e3m2").tolist() == [0.0625, 1.0, -1.0]


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_ties_go_to_even(fmt):
    table = _value_table(fmt)
    n_mag = 2 ** (sum(fpx.FORMATS[fmt]))
    mids = torch.tensor([(table[c] + table[c + 1]) / 2 for c in range(n_mag - 1)])
    got = fpx.encode(mids, fmt)
    want = torch.tensor([c if c % 2 == 0 else c + 1 for c in range(n_mag - 1)], dtype=torch.uint8)
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FMTS),
    xs=st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=40),
    scale=st.sampled_from([1.0, 0.01, 4.0, 100.0]),
)
def test_encode_is_nearest_ties_even_saturating(fmt, xs, scale):
    x = (torch.tensor(xs, dtype=torch.float32) * scale).nan_to_num(nan=0.0)
    got = fpx.encode(x, fmt).tolist()
    want = [_nearest_code(v, fmt) for v in x.tolist()]
    assert got == want
    dec = fpx.decode(torch.tensor(got, dtype=torch.uint8), fmt)
    assert dec.abs().max().item() <= fpx.max_finite(fmt)


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_saturates(fmt):
    top = fpx.max_finite(fmt)
    x = torch.tensor([top * 1.01, top * 3, 1e30, float("inf"), -1e30, float("-inf")])
    assert fpx.decode(fpx.encode(x, fmt), fmt).tolist() == [top] * 4 + [-top] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_encode_other_float_dtypes(dtype):
    x = torch.linspace(-30, 30, 257, dtype=torch.float64).to(dtype)
    want = torch.tensor([_nearest_code(v, "e3m2") for v in x.double().tolist()], dtype=torch.uint8)
    assert torch.equal(fpx.encode(x, "e3m2"), want)


def test_nan_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        fpx.encode(torch.tensor([1.0, float("nan")]), "e3m2")
    with pytest.raises(ValueError, match="NaN"):
        fpx.pack(torch.full((2, 128), float("nan")), "e3m2")


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match="e3m2.*e2m1|known formats"):
        fpx.encode(torch.ones(3), "e4m3")
    with pytest.raises(ValueError, match="known formats"):
        fpx.pack(torch.ones(2, 128), "fp6")
    with pytest.raises(ValueError, match="known formats"):
        fpx.decode(torch.zeros(3, dtype=torch.uint8), "int4")


# ---------------------------------------------------------------- pack / unpack


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(FMTS),
    n_pairs=st.integers(1, 9),
    k_chunks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_pack_codes_round_trip(fmt, n_pairs, k_chunks, seed):
    n, k = 2 * n_pairs, k_chunks * fpx.layout(fmt)["k_chunk"]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** fpx.nbits(fmt), (n, k), generator=gen).to(torch.uint8)
    p = fpx.pack_codes(codes, fmt, torch.ones(n))
    assert torch.equal(fpx.unpack_codes(p), codes)
    lo_bits = fpx.nbits(fmt) - 4
    assert p.hi.dtype == torch.int32 and p.hi.shape == (k // 4, n // 2)
    if lo_bits:
        assert p.lo.shape == (k * lo_bits // 16, n // 2)
    else:
        assert p.lo is None
    # bits: nbits per weight in planes, 4 bytes per fp32 scale.
    assert p.nbytes == n * k * fpx.nbits(fmt) // 8 + 4 * n


@settings(max_examples=15, deadline=None)
@given(fmt=st.sampled_from(FMTS), n_pairs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_is_encode_times_scale(fmt, n_pairs, seed):
    n, k = 2 * n_pairs, 2 * fpx.layout(fmt)["k_chunk"]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 10
    w[0] = 0.0  # an all-zero row: scale 1, codes 0
    p = fpx.pack(w, fmt)
    scales = w.abs().amax(1) / fpx.max_finite(fmt)
    scales[0] = 1.0
    assert torch.equal(p.scales, scales)
    codes = fpx.encode(w / scales[:, None], fmt)
    assert torch.equal(fpx.unpack_codes(p), codes)
    assert torch.equal(fpx.unpack(p), fpx.decode(codes, fmt) * scales[:, None])
    # Each row's absmax is exactly representable: it maps to +-max_finite.
    assert torch.allclose(fpx.unpack(p).abs().amax(1)[1:], w.abs().amax(1)[1:])
    # The pack is idempotent on its own output.
    p2 = fpx.pack(fpx.unpack(p), fmt)
    assert torch.equal(fpx.unpack_codes(p2), fpx.unpack_codes(p))


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    r %= 32
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF if r else x


@pytest.mark.parametrize("fmt", FMTS)
def test_byte_words_from_planes_hold_each_codes_image(fmt):
    """The kernel's rebuild contract, done in torch: one rotate and mask per plane gives,
    for every (b, q, r, c), a word whose byte j = v + 2h is the image of code (k, n)."""
    lay, pl = fpx.layout(fmt), fpx.planes(fmt)
    nq, kc = lay["nq"], lay["k_chunk"]
    n, k = 6, 2 * kc
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2 ** fpx.nbits(fmt), (n, k), generator=gen)
    p = fpx.pack_codes(codes.to(torch.uint8), fmt, torch.ones(n))
    hi = p.hi.to(torch.int64) & 0xFFFFFFFF
    lo = (p.lo.to(torch.int64) & 0xFFFFFFFF) if p.lo is not None else torch.zeros_like(hi)
    image = fpx.image(codes, fmt)
    for b in range(k // kc):
        for q in range(nq):
            for r in range(16):
                h_word = hi[(b * nq // 2 + q // 2) * 16 + r]
                l_word = lo[b * 16 + r] if p.lo is not None else 0
                word = (_rotl32(h_word, pl["hi_rot"][q % 2]) & pl["hi_mask"] * 0x01010101) | (
                    _rotl32(l_word, pl["lo_rot"][q]) & pl["lo_mask"] * 0x01010101
                )
                for v in range(2):
                    kk = b * kc + 16 * (2 * q + v) + r
                    for h in range(2):
                        got = (word >> (8 * (v + 2 * h))) & 0xFF
                        assert torch.equal(got, image[h::2, kk]), (b, q, r, v, h)
    assert torch.equal(fpx.from_image(image, fmt), codes)


@pytest.mark.parametrize("fmt", FMTS)
def test_byte_image_is_the_high_byte_of_the_scaled_fp16(fmt):
    """Byte formats: fp16 bits (image << 8) = value * 2**(bias - 15), subnormals included."""
    codes = torch.arange(2 ** fpx.nbits(fmt))
    t = fpx.image(codes, fmt)
    assert int(t.max()) < 256
    if not fpx.planes(fmt)["byte"]:
        assert torch.equal(t, codes << (8 - fpx.nbits(fmt)))  # the code at the byte's top
        return
    half = (t << 8).to(torch.int16).view(torch.float16).float()
    want = fpx.decode(codes.to(torch.uint8), fmt) * 2.0 ** (fpx.bias(fmt) - 15)
    assert torch.equal(half, want)


@pytest.mark.parametrize("fmt", FMTS)
def test_pack_rejects_shapes_the_layout_cannot_take(fmt):
    kc = fpx.layout(fmt)["k_chunk"]
    with pytest.raises(ValueError, match=f"multiple of {kc}"):
        fpx.pack(torch.randn(4, kc + 16), fmt)
    with pytest.raises(ValueError, match="multiple of 2"):
        fpx.pack(torch.randn(3, kc), fmt)
    with pytest.raises(ValueError, match="2-D"):
        fpx.pack(torch.randn(4, kc, 2), fmt)


# ---------------------------------------------------------------- fpx_linear


def test_reference_linear_is_dequantized_matmul():
    torch.manual_seed(0)
    w, x, b = torch.randn(6, 256), torch.randn(2, 3, 256), torch.randn(6)
    p = fpx.pack(w, "e3m2")
    y = fpx.fpx_linear(x, p, b)  # CPU: the reference
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, x @ fpx.unpack(p).t() + b)
    with pytest.raises(ValueError, match="in_features K=256"):
        fpx.fpx_linear(torch.randn(2, 128), p)


@pytest.mark.parametrize("fmt", FMTS)
def test_pack_with_the_whole_rows_absmax_gives_the_slice_of_the_whole(fmt):
    """``pack(slice, absmax=whole rows')`` dequantizes to exactly that slice of the whole
    weight's packing (tensor-parallel K slices); a too-small absmax raises."""
    torch.manual_seed(0)
    k_chunk = fpx.layout(fmt)["k_chunk"]
    w = torch.randn(8, 4 * k_chunk)
    w[3, 3 * k_chunk + 1] = 40.0  # the absmax of row 3 lies in the last slice only
    whole = fpx.unpack(fpx.pack(w, fmt))
    absmax = w.abs().amax(dim=1)
    for lo in range(0, w.shape[1], 2 * k_chunk):
        part = fpx.unpack(fpx.pack(w[:, lo : lo + 2 * k_chunk], fmt, absmax=absmax))
        assert torch.equal(part, whole[:, lo : lo + 2 * k_chunk])
    alone = fpx.unpack(fpx.pack(w[:, : 2 * k_chunk], fmt))  # its own scale: other values
    assert not torch.equal(alone, whole[:, : 2 * k_chunk])
    with pytest.raises(ValueError, match="at least that row's own absmax"):
        fpx.pack(w, fmt, absmax=absmax / 2)
    with pytest.raises(ValueError, match="one value per row"):
        fpx.pack(w, fmt, absmax=absmax[:4])
