"""The reference ESS attention against SDPA with a dense mask built here, independently."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from safekern import ess_attention
from safekern.reference import default_q_pos, ess_attention_ref


def dense_mask(q_pos, seqlens_k, Lk, causal, response_start, cls_windows):
    """Element-by-element transcription of docs/DESIGN.md §3 (deliberately loop-based)."""
    B, Lq = q_pos.shape
    m = torch.zeros(B, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for r in range(Lq):
            i = int(q_pos[b, r])
            for j in range(int(seqlens_k[b])):
                if i < 0:
                    continue
                if response_start is not None and i == 0:
                    ok = j == 0
                    if cls_windows is not None:
                        ok = ok or any(int(s) <= j < int(e) for s, e in cls_windows[b].tolist())
                else:
                    ok = (j <= i) if causal else True
                    if response_start is not None and j == 0 and i < int(response_start[b]):
                        ok = False
                m[b, r, j] = ok
    return m


def sdpa_oracle(q, k, v, mask, key_bias=None, scale=None):
    B, Lq, Hq, D = q.shape
    G = Hq // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(G, dim=2).transpose(1, 2)
    bias = torch.zeros(B, Hq, Lq, k.shape[1], dtype=q.dtype)
    if key_bias is not None:
        bias = bias + key_bias.to(q.dtype)[:, :, None, :]
    bias = bias.masked_fill(~mask[:, None], float("-inf"))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale)
    o = torch.nan_to_num(o.transpose(1, 2), nan=0.0)
    return torch.where(mask.any(-1)[:, :, None, None], o, torch.zeros_like(o))


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


CASES = {
    # name: (B, Lq, Lk, Hq, Hkv, D)
    "mha_97": (2, 97, 97, 4, 4, 64),
    "gqa4_97": (2, 97, 97, 8, 2, 64),
    "mqa_97": (2, 97, 97, 4, 1, 64),
    "decode_rows": (3, 2, 97, 8, 2, 64),
    "odd_dim": (2, 33, 61, 6, 3, 59),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ess", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_sdpa(name, ess, with_bias):
    B, Lq, Lk, Hq, Hkv, D = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{ess}-{with_bias}".encode()))
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    seqlens_k = i32([Lk, Lk - 13, Lk - 40][:B])
    if Lq == Lk:  # right-padded prefill: row i at position i, padding beyond the length
        i = torch.arange(Lq, dtype=torch.int32)[None].expand(B, Lq)
        q_pos = torch.where(i < seqlens_k[:, None], i, torch.full_like(i, -1))
    elif Lq == 2:  # fused decode step: the token row at t-1 and a [CLS] row (or padding)
        q_pos = torch.stack([seqlens_k - 1, i32([0, -1, 0][:B])], 1)
    else:  # chunked prefill, bottom-right aligned, with a [CLS] row riding in the chunk
        q_pos = default_q_pos(seqlens_k, Lq)
        q_pos[:, 3] = 0
    rs = i32([20, 5, Lk + 10][:B]) if ess else None
    # windows: normal, empty (start >= end), past seqlens_k, overlapping
    wins = i32([[[2, 9], [30, 50]], [[7, 7], [Lk - 20, Lk]], [[50, 40], [0, Lk]]][:B]) if ess \
        else None
    bias = torch.randn(B, 1 if name == "mha_97" else Hq, Lk, generator=g) if with_bias else None
    scale = 0.11 if name == "odd_dim" else None

    mask = dense_mask(q_pos, seqlens_k, Lk, True, rs, wins)
    if Lq == Lk:
        assert mask[:, 0].sum() > 0 and (~mask.any(-1)).any()  # the case exercises both kinds
    want = sdpa_oracle(q, k, v, mask, bias, scale)
    got, lse = ess_attention_ref(q, k, v, softmax_scale=scale, q_pos=q_pos, seqlens_k=seqlens_k,
                                 response_start=rs, cls_windows=wins, key_bias=bias,
                                 return_lse=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    empty = ~mask.any(-1)                                                   # (B, Lq)
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all()
    assert (got[empty] == 0).all()
    # the public entry point (torch backend) is the same computation
    pub = ess_attention(q, k, v, softmax_scale=scale, q_pos=q_pos, seqlens_k=seqlens_k,
                        response_start=rs, cls_windows=wins, key_bias=bias, backend="torch")
    torch.testing.assert_close(pub, want, atol=1e-12, rtol=1e-10)


def test_lse_matches_logsumexp():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 2, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 9, 1, 16, generator=g, dtype=torch.float64)
    _, lse = ess_attention_ref(q, k, k, return_lse=True)
    s = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) * 16 ** -0.5
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())


def test_default_q_pos_is_bottom_right():
    torch.testing.assert_close(default_q_pos(i32([5, 2]), 3), i32([[2, 3, 4], [-1, 0, 1]]))


def test_non_causal_and_strided_bhsd_views():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 32, generator=g, dtype=torch.float64).transpose(1, 2)  # (B,S,H,D)
    k = torch.randn(2, 2, 11, 32, generator=g, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    mask = dense_mask(default_q_pos(i32([11, 11]), 11), i32([11, 11]), 11, False, None, None)
    torch.testing.assert_close(ess_attention(q, k, k, causal=False),
                               sdpa_oracle(q, k, k, mask), atol=1e-12, rtol=1e-10)


def test_reference_supports_autograd():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    rs = i32([3])
    assert torch.autograd.gradcheck(
        lambda q, k, v: ess_attention(q, k, v, response_start=rs, backend="torch"), (q, k, v))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_backend_fp32_fast_path_matches_reference(name, with_bias):
    """fp32 inference calls of backend='torch' take SDPA over the visibility mask."""
    B, Lq, Lk, Hq, Hkv, D = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(f"fast-{name}-{with_bias}".encode()))
    q, k, v = (torch.randn(B, L, H, D, generator=g)
               for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    seqlens_k = i32([Lk, Lk - 13, Lk - 40][:B])
    q_pos = default_q_pos(seqlens_k, Lq)
    q_pos[:, 0] = 0                                        # a [CLS] row
    q_pos[0, -1] = -1                                      # a padding row
    meta = dict(q_pos=q_pos, seqlens_k=seqlens_k, response_start=i32([20, 5, Lk + 10][:B]),
                cls_windows=i32([[[2, 9], [30, 50]], [[7, 7], [Lk - 20, Lk]],
                                 [[50, 40], [0, Lk]]][:B]),
                key_bias=torch.randn(B, Hq, Lk, generator=g) if with_bias else None)
    got = ess_attention(q, k, v, backend="torch", **meta)
    want = ess_attention_ref(q.double(), k.double(), v.double(),
                             **{**meta, "key_bias": meta["key_bias"]})
    in_dtype = ess_attention_ref(q, k, v, **meta)           # the reference's own fp32 error
    err, ref_err = (got.double() - want).abs().max(), (in_dtype.double() - want).abs().max()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)
    assert (got[0, -1] == 0).all() and torch.isfinite(got).all()
