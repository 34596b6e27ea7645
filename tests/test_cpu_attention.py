"""The CPU decode-step ESS attention (``safekern.ops.cpu.attention``) against the reference.

* the op vs ``ess_attention_ref`` (o and lse) over decode shapes: Lq 1..MAX_ROWS, head dims that
  are and are not multiples of 8, GQA 1..4 query heads per KV head, ESS mode with overlapping /
  empty / clipped [CLS] windows, padding rows, non-causal rows, key bias (per head or shared,
  with ``-inf`` entries), sequences with no keys, strided K/V (cache slices);
* hidden keys are never read (NaN there changes nothing); a non-finite visible logit or output
  raises the ``bad`` flag, and ``ess_attention`` then returns the reference's NaNs;
* a row's bits do not depend on the other rows (the token row with and without a [CLS] row)
  nor on the torch thread count;
* the public function takes the op for CPU fp32 calls with few rows, SDPA/reference otherwise.
"""
import pytest
import torch

from safekern import ess_attention
from safekern.ops.cpu import attention as cpu_attention
from safekern.reference.attention import ess_attention_ref, ess_visibility

pytestmark = pytest.mark.skipif(cpu_attention.unavailable_reason() is not None,
                                reason=f"cpu extension: {cpu_attention.unavailable_reason()}")

I32 = torch.int32


def _case(B, Lq, Hq, Hkv, D, Lk, *, ess=True, windows=True, bias=None, causal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g)
    # K/V as slices of a longer cache (batch stride != Lk * Hkv * D), like the engine's.
    k = torch.randn(B, Lk + 5, Hkv, D, generator=g)[:, :Lk]
    v = torch.randn(B, Lk + 5, Hkv, D, generator=g)[:, :Lk]
    seqlens = torch.randint(0, Lk + 1, (B,), generator=g).to(I32)
    seqlens[0] = Lk
    pos = torch.stack([torch.randint(-1, max(int(s), 1), (Lq,), generator=g) for s in seqlens])
    pos[0, 0] = Lk - 1
    kw = dict(softmax_scale=D ** -0.5 * 1.3, causal=causal, q_pos=pos.to(I32), seqlens_k=seqlens)
    if ess:
        if Lq > 1:
            pos[:, 1] = 0                                         # a [CLS] row
        kw["q_pos"] = pos.to(I32)
        kw["response_start"] = torch.randint(0, Lk + 1, (B,), generator=g).to(I32)
        if windows:
            s = torch.randint(0, Lk + 1, (B, 3), generator=g)
            e = torch.minimum(s + torch.randint(0, 9, (B, 3), generator=g), torch.tensor(Lk))
            e[:, 2] = s[:, 2]                                      # an empty window
            kw["cls_windows"] = torch.stack([s, e], -1).to(I32)
    if bias is not None:
        kb = torch.randn(B, bias, Lk, generator=g)
        kb[0, 0, Lk // 2] = float("-inf")
        kw["key_bias"] = kb
    return q, k, v, kw


def _compare(q, k, v, kw):
    o, lse, bad = cpu_attention.decode_attention(q, k, v, **kw)
    ro, rl = ess_attention_ref(q, k, v, return_lse=True, **kw)
    assert not bad
    torch.testing.assert_close(o, ro, atol=2e-6, rtol=2e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    torch.testing.assert_close(lse, rl, atol=2e-6, rtol=2e-5)
    return o, lse


@pytest.mark.parametrize("Lq", [1, 2, 3, cpu_attention.MAX_ROWS])
@pytest.mark.parametrize("D", [16, 12, 64, 128])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_matches_reference(Lq, D, G):
    for seed, (ess, windows, bias) in enumerate([(False, False, None), (True, False, None),
                                                 (True, True, None), (True, True, 1),
                                                 (True, True, 2 * G)]):
        q, k, v, kw = _case(3, Lq, 2 * G, 2, D, 29, ess=ess, windows=windows, bias=bias,
                            seed=seed)
        _compare(q, k, v, kw)


def test_non_causal_and_all_padding():
    q, k, v, kw = _case(2, 2, 4, 2, 16, 17, causal=False)
    _compare(q, k, v, kw)
    kw["q_pos"] = torch.full_like(kw["q_pos"], -1)                # every row is padding
    o, lse = _compare(q, k, v, kw)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()


def test_long_context_and_batch():
    q, k, v, kw = _case(5, 2, 9, 3, 64, 700, bias=1)
    _compare(q, k, v, kw)


def test_hidden_keys_never_read():
    q, k, v, kw = _case(3, 2, 4, 2, 16, 31, bias=1)
    vis_o, vis_l = _compare(q, k, v, kw)
    vis = ess_visibility(kw["q_pos"], kw["seqlens_k"], 31, response_start=kw["response_start"],
                         cls_windows=kw["cls_windows"]).any(1)     # (B, Lk): seen by some row
    k2, v2, kb2 = k.clone(), v.clone(), kw["key_bias"].clone()
    k2[~vis] = float("nan")
    v2[~vis] = float("inf")
    kb2.transpose(1, 2)[~vis] = float("nan")
    o, lse, bad = cpu_attention.decode_attention(q, k2, v2, **{**kw, "key_bias": kb2})
    assert not bad
    assert torch.equal(o, vis_o) and torch.equal(lse, vis_l)


@pytest.mark.parametrize("where", ["q", "k", "v", "bias_nan", "bias_inf"])
def test_non_finite_visible_input_falls_back_to_reference(where):
    q, k, v, kw = _case(2, 2, 4, 2, 16, 23, bias=1)
    kb = kw["key_bias"]
    t = int(kw["q_pos"][0, 0])                                    # row 0 sees keys 1..t at least
    if where == "q":
        q[0, 0, 1, 3] = float("nan")
    elif where == "k":
        k[0, t, 0, 2] = float("nan")
    elif where == "v":
        v[0, t, 1, 5] = float("inf")
    elif where == "bias_nan":
        kb[0, 0, t] = float("nan")
    else:
        kb[0, 0, t] = float("inf")
    _, _, bad = cpu_attention.decode_attention(q, k, v, **kw)
    assert bad
    o, lse = ess_attention(q, k, v, return_lse=True, backend="torch", **kw)
    ro, rl = ess_attention_ref(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(o, ro, equal_nan=True)
    torch.testing.assert_close(lse, rl, equal_nan=True)


def test_all_keys_removed_by_bias_is_an_empty_row():
    q, k, v, kw = _case(2, 1, 4, 2, 16, 9, ess=False, bias=1)
    kw["key_bias"][1] = float("-inf")
    o, lse = _compare(q, k, v, kw)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all()


def test_row_bits_do_not_depend_on_other_rows_or_threads():
    """The token row of a decode step is the same bits with and without the [CLS] row."""
    q, k, v, kw = _case(4, 2, 8, 2, 16, 40, bias=1)
    pos = kw["q_pos"].clone()
    pos[:, 0] = kw["seqlens_k"] - 1
    kw["q_pos"] = pos
    o2, l2, _ = cpu_attention.decode_attention(q, k, v, **kw)
    o1, l1, _ = cpu_attention.decode_attention(q[:, :1].contiguous(), k, v,
                                               **{**kw, "q_pos": pos[:, :1].contiguous()})
    assert torch.equal(o1[:, 0], o2[:, 0]) and torch.equal(l1[..., 0], l2[..., 0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o_1t, _, _ = cpu_attention.decode_attention(q, k, v, **kw)
        torch.set_num_threads(2)
        o_2t, _, _ = cpu_attention.decode_attention(q, k, v, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(o_1t, o2) and torch.equal(o_2t, o2)


def test_public_function_routes_decode_calls_to_the_op(monkeypatch):
    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q, k, v, kw = _case(2, 2, 4, 2, 16, 19, bias=1)
    o = ess_attention(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(o, ess_attention_ref(q, k, v, **kw), atol=2e-6, rtol=2e-5)
    assert len(calls) == 1
    # Prefill-sized calls, fp64 and autograd calls do not take it.
    qp, kp, vp, kwp = _case(1, cpu_attention.MAX_ROWS + 1, 4, 2, 16, 19, ess=False)
    ess_attention(qp, kp, vp, backend="torch", **kwp)
    ess_attention(q.double(), k.double(), v.double(), backend="torch", **kw)
    ess_attention(q.clone().requires_grad_(), k, v, backend="torch", **kw)
    assert len(calls) == 1


def test_bad_arguments_raise_clear_errors():
    q, k, v, kw = _case(2, 2, 4, 2, 16, 19)
    with pytest.raises(RuntimeError, match="q_pos must be an int32"):
        cpu_attention.decode_attention(q, k, v, **{**kw, "q_pos": kw["q_pos"].long()})
    with pytest.raises(RuntimeError, match="float32"):
        cpu_attention.decode_attention(q.double(), k, v, **kw)
    with pytest.raises(RuntimeError, match="Hq % Hkv"):
        cpu_attention.decode_attention(q[:, :, :3], k, v, **kw)
    with pytest.raises(RuntimeError, match="requires response_start"):
        cpu_attention.decode_attention(q, k, v, **{**kw, "response_start": None})
