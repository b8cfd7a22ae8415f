"""LoRC: low-rank compensation of a quantization error, against the plain error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fscale.kernels import intq
from fscale.kernels.lorc import lorc_factors, lorc_linear


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_lorc_reduces_error():
    w, x = _rand(64, 128, seed=11), _rand(16, 128, seed=12)
    p = intq.pack_int(w, bits=4, group_size=128)
    w_hat = intq.unpack_int(p)
    errs = []
    for r in (1, 4, 16):
        c = lorc_factors(w, w_hat, r, dtype=torch.float32)
        assert c.us.shape == (64, r) and c.v.shape == (r, 128)
        errs.append(_rel(F.linear(x, w_hat) + lorc_linear(x, c), F.linear(x, w)))
    base = _rel(F.linear(x, w_hat), F.linear(x, w))
    assert base > errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lorc_factors(w, w_hat, 0)
