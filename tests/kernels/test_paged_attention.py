"""The Triton paged-attention kernel against its torch reference, and the reference
against plain causal attention on the unpaged sequence (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fscale.hw import dispatch
from fscale.kernels import paged_attention as pa


def _case(q_lens, ctx_lens, *, H=4, KVH=2, D=16, bs=16, dtype=torch.float32, seed=0):
    """Random paged caches with shuffled block tables; returns kernel args + dense K/V."""
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    per_seq = [-(-L // bs) for L in seq_lens]
    num_blocks = sum(per_seq) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 unused
    kc = torch.randn(num_blocks, bs, KVH, D, generator=g, dtype=dtype)
    vc = torch.randn(num_blocks, bs, KVH, D, generator=g, dtype=dtype)
    bt = torch.zeros(B, max(per_seq), dtype=torch.int32)
    dense = []
    for b, n in enumerate(per_seq):
        ids = [perm.pop() for _ in range(n)]
        bt[b, :n] = torch.tensor(ids, dtype=torch.int32)
        dense.append(
            (kc[ids].reshape(-1, KVH, D)[: seq_lens[b]], vc[ids].reshape(-1, KVH, D)[: seq_lens[b]])
        )
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (q, kc, vc, bt, lens, qsl), dense


def test_reference_matches_dense_causal_attention():
    q_lens, ctx = [3, 1, 7], [5, 20, 0]
    args, dense = _case(q_lens, ctx)
    q = args[0]
    out = pa.paged_attention_reference(*args, scale=0.25, max_query_len=7)
    start = 0
    for (k, v), n, c in zip(dense, q_lens, ctx, strict=True):
        # Full causal attention over the whole sequence, keep its last n rows.
        L = n + c
        qq = torch.zeros(L, 4, 16)
        qq[c:] = q[start : start + n]
        ref = F.scaled_dot_product_attention(
            qq.transpose(0, 1),
            k.repeat_interleave(2, 1).transpose(0, 1),
            v.repeat_interleave(2, 1).transpose(0, 1),
            is_causal=True,
            scale=0.25,
        ).transpose(0, 1)[c:]
        torch.testing.assert_close(out[start : start + n], ref, atol=1e-5, rtol=1e-5)
        start += n


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if pa.triton is None:
        pytest.fail("triton is not installed")


@pytest.mark.parametrize(
    "q_lens,ctx,H,KVH",
    [
        ([1, 1, 1], [0, 17, 40], 4, 2),  # decode, partial last blocks
        ([5, 1, 18], [11, 30, 0], 4, 2),  # chunked prefill + decode in one batch
        ([2, 3], [16, 3], 4, 1),  # MQA, G = 4
        ([3], [7], 6, 2),  # G = 3: padded head group
    ],
)
def test_triton_matches_reference(interpret, q_lens, ctx, H, KVH):
    args, _ = _case(q_lens, ctx, H=H, KVH=KVH)
    kw = dict(scale=0.3, max_query_len=max(q_lens))
    ref = pa.paged_attention_reference(*args, **kw)
    out = pa.paged_attention_triton(*args, **kw)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_triton_head_dim_not_power_of_two(interpret):
    args, _ = _case([4, 1], [9, 21], D=24)
    kw = dict(scale=0.2, max_query_len=4)
    torch.testing.assert_close(
        pa.paged_attention_triton(*args, **kw),
        pa.paged_attention_reference(*args, **kw),
        atol=1e-4,
        rtol=1e-4,
    )


def test_registered_in_kernel_table():
    names = {r.name for r in dispatch.lowerings(pa.OP)}
    assert {"paged_attention_reference", "paged_attention_triton"} <= names
    assert (
        dispatch.resolve(pa.OP, torch.device("cpu"), torch.float32).name
        == "paged_attention_reference"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_reference_cuda_bf16():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
    args, _ = _case(
        [1] * 8 + [100, 37], [300] * 8 + [0, 64], H=32, KVH=8, D=128, dtype=torch.bfloat16
    )
    args = tuple(a.cuda() for a in args)
    kw = dict(scale=128**-0.5, max_query_len=100)
    torch.testing.assert_close(
        pa.paged_attention_triton(*args, **kw),
        pa.paged_attention_reference(*args, **kw),
        atol=2e-2,
        rtol=2e-2,
    )
    dec, _ = _case([1] * 4, [2000, 1, 129, 16], H=32, KVH=8, D=128, dtype=torch.bfloat16)
    dec = tuple(a.cuda() for a in dec)
    for splits in (1, 4, None):
        torch.testing.assert_close(
            pa.paged_attention_triton(*dec, scale=0.088, max_query_len=1, splits=splits),
            pa.paged_attention_reference(*dec, scale=0.088, max_query_len=1),
            atol=2e-2,
            rtol=2e-2,
        )


@pytest.mark.parametrize("splits", [1, 2, 4, None])
@pytest.mark.parametrize(
    "ctx,H,KVH,D,bs",
    [
        ([0, 17, 40], 4, 2, 16, 16),  # partial last tiles
        ([100, 3, 63, 64], 6, 2, 24, 16),  # G = 3, D not a power of two
        ([150, 9], 8, 1, 16, 32),  # MQA, pages of 32
    ],
)
def test_decode_kernel_matches_reference(interpret, ctx, H, KVH, D, bs, splits):
    """[Note: the decode kernel]: the last split of each (sequence, kv head) merges the
    partials; its arrival counters are back at 0 after every launch, so the next one
    (sharing them) gives the same bits."""
    from fscale.kernels._triton import arrival_counters

    args, _ = _case([1] * len(ctx), ctx, H=H, KVH=KVH, D=D, bs=bs)
    kw = dict(scale=0.3, max_query_len=1)
    out = pa.paged_attention_triton(*args, splits=splits, **kw)
    torch.testing.assert_close(out, pa.paged_attention_reference(*args, **kw), atol=1e-4, rtol=1e-4)
    assert not arrival_counters(torch.device("cpu"), len(ctx) * KVH).any()
    assert torch.equal(pa.paged_attention_triton(*args, splits=splits, **kw), out)
