"""The Triton ESS attention kernels against the float64 reference (docs/DESIGN.md §3, §7).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest); the ``cuda`` parameter runs
the very same cases on a GPU. Outputs are poisoned with NaN before each launch and keys past
``seqlens_k`` are NaN, so an unwritten output or a read past the valid keys fails the test.
Tolerance: no worse than 2x the error of the reference evaluated in the input dtype.
"""
import pytest
import torch

from safekern import ess_attention
from safekern.ops import dispatch
from safekern.ops.attention_triton import _attention_triton
from safekern.reference import default_q_pos, ess_attention_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def i32(x, device="cpu"):
    return torch.tensor(x, dtype=torch.int32, device=device)


def make_qkv(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype)
               for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    return q, k, v


def poison_tail(x, seqlens_k):
    """A copy of ``x (B, Lk, H, D)`` with NaN at keys ``j >= seqlens_k[b]``."""
    x = x.clone()
    for b, n in enumerate(seqlens_k.tolist()):
        x[b, n:] = float("nan")
    return x


def run_triton(q, k, v, *, path="auto", num_splits=None, **kw):
    """The Triton backend writing into NaN-poisoned output buffers."""
    B, Lq, Hq, D = q.shape
    out = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse_out = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32, device=q.device)
    o, lse = _attention_triton(q, k, v, return_lse=True, out=out, lse_out=lse_out, path=path,
                               num_splits=num_splits, **kw)
    assert o.data_ptr() == out.data_ptr() and lse.data_ptr() == lse_out.data_ptr()
    return o, lse


def check(q, k, v, *, path="auto", num_splits=None, **kw):
    """Kernel vs the float64 reference, within 2x the error of the reference in q.dtype."""
    seqlens_k = kw.get("seqlens_k")
    kk, vv = (k, v) if seqlens_k is None else (poison_tail(k, seqlens_k), poison_tail(v, seqlens_k))
    o, lse = run_triton(q, kk, vv, path=path, num_splits=num_splits, **kw)
    gold, gold_lse = ess_attention_ref(q.double(), k.double(), v.double(), return_lse=True, **kw)
    low, low_lse = ess_attention_ref(q, k, v, return_lse=True, compute_dtype=q.dtype, **kw)
    eps = torch.finfo(q.dtype).eps
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    err = (o.double() - gold).abs().max().item()
    err_ref = (low.double() - gold).abs().max().item()
    assert err <= 2 * err_ref + eps, f"out error {err:.3g} > 2 x reference error {err_ref:.3g}"
    empty = torch.isneginf(gold_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (o.transpose(1, 2)[empty] == 0).all()
    fin = ~empty
    err_lse = (lse[fin].double() - gold_lse[fin].double()).abs().max().item() if fin.any() else 0
    err_lse_ref = (low_lse[fin].double() - gold_lse[fin].double()).abs().max().item() \
        if fin.any() else 0
    assert err_lse <= 2 * err_lse_ref + 4 * torch.finfo(torch.float32).eps * 10, \
        f"lse error {err_lse:.3g} > 2 x reference error {err_lse_ref:.3g}"
    return o


def ess_inputs(B, Lq, Lk, Hq, device, ess, bias_heads, seed):
    """Right-padded lengths, windows (normal, empty, past seqlens_k, overlapping), key bias."""
    seqlens_k = i32([Lk, Lk - 13, Lk - 40][:B], device)
    kw = dict(seqlens_k=seqlens_k)
    if ess:
        kw["response_start"] = i32([20, 5, Lk + 10][:B], device)
        kw["cls_windows"] = i32([[[2, 9], [30, 50]], [[7, 7], [Lk - 20, Lk]],
                                 [[50, 40], [0, Lk]]][:B], device)
    if bias_heads:
        g = torch.Generator().manual_seed(seed)
        kw["key_bias"] = torch.randn(B, bias_heads, Lk, generator=g).to(device)
    return kw


# name: (B, Lq, Lk, Hq, Hkv, D)
PREFILL = {
    "mha_97_d64": (2, 97, 97, 4, 4, 64),
    "gqa4_97_d80": (2, 97, 97, 8, 2, 80),
    "mqa_97_d96": (3, 97, 97, 4, 1, 96),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PREFILL))
@pytest.mark.parametrize("mode", ["plain", "ess", "ess_bias"])
def test_right_padded_prefill(device, name, mode):
    B, Lq, Lk, Hq, Hkv, D = PREFILL[name]
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, D, torch.float32, device, seed=len(name) + len(mode))
    bias_heads = (Hq if name == "gqa4_97_d80" else 1) if mode == "ess_bias" else 0
    kw = ess_inputs(B, Lq, Lk, Hq, device, mode != "plain", bias_heads, seed=1)
    i = torch.arange(Lq, dtype=torch.int32, device=device)[None].expand(B, Lq)
    kw["q_pos"] = torch.where(i < kw["seqlens_k"][:, None], i, torch.full_like(i, -1))
    check(q, k, v, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_precision(device, dtype):
    B, Lq, Lk, Hq, Hkv, D = 2, 97, 97, 8, 2, 64
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed=3)
    kw = ess_inputs(B, Lq, Lk, Hq, device, True, Hq, seed=4)
    i = torch.arange(Lq, dtype=torch.int32, device=device)[None].expand(B, Lq)
    kw["q_pos"] = torch.where(i < kw["seqlens_k"][:, None], i, torch.full_like(i, -1))
    check(q, k, v, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ess", [False, True])
def test_chunked_prefill_with_cls_row(device, ess):
    B, Lq, Lk, Hq, Hkv, D = 3, 40, 97, 8, 2, 64
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, D, torch.float32, device, seed=5)
    kw = ess_inputs(B, Lq, Lk, Hq, device, ess, 1, seed=6)
    q_pos = default_q_pos(kw["seqlens_k"], Lq)
    q_pos[:, 3] = 0  # a [CLS] row riding in the chunk (a normal row at position 0 without ESS)
    q_pos[1, 5] = -1
    check(q, k, v, q_pos=q_pos, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_default_q_pos_bottom_right(device):
    q, k, v = make_qkv(2, 33, 61, 4, 2, 64, torch.float32, device, seed=7)
    check(q, k, v, seqlens_k=i32([61, 20], device))  # sequence 1 has padding rows (-1)
    check(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,num_splits", [("decode", 1), ("decode", 3), ("decode", None),
                                             ("prefill", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows(device, path, num_splits, dtype):
    """Fused decode step: the token row at t-1 plus a [CLS] row at 0 (or padding -1)."""
    B, Lq, Lk, Hq, Hkv, D = 3, 2, 97, 8, 2, 64
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed=8)
    kw = ess_inputs(B, Lq, Lk, Hq, device, True, Hq, seed=9)
    q_pos = torch.stack([kw["seqlens_k"] - 1, i32([0, -1, 0], device)], 1)
    check(q, k, v, q_pos=q_pos, path=path, num_splits=num_splits, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Hkv", [1, 4])
def test_single_decode_row_plain(device, Hkv):
    q, k, v = make_qkv(2, 1, 150, 4, Hkv, 64, torch.float32, device, seed=10)
    for path in ("decode", "prefill"):
        check(q, k, v, seqlens_k=i32([150, 77], device), path=path,
              key_bias=torch.randn(2, 1, 150, device=device))
        check(q, k, v, path=path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 128, 256])
def test_head_dims(device, D):
    q, k, v = make_qkv(1, 21, 21, 2, 1, D, torch.float32, device, seed=D)
    check(q, k, v, response_start=i32([4], device), cls_windows=i32([[[1, 6]]], device),
          q_pos=torch.arange(21, dtype=torch.int32, device=device)[None])


@pytest.mark.parametrize("device", DEVICES)
def test_tiles_the_mask_empties_are_never_read(device):
    """Key tiles past the causal range of every normal row, and tiles between the [CLS] row's
    windows, are skipped: K/V there are NaN (a tile read even fully masked gives 0 * NaN)."""
    from safekern.ops.attention_triton import _prefill_config

    D = 64
    BN = _prefill_config(D, torch.float32, torch.device(device))[1]
    Lk = 4 * BN + 5
    q, k, v = make_qkv(2, BN + 8, Lk, 4, 2, D, torch.float32, device, seed=13)
    rs = i32([3, 3], device)
    rows = torch.arange(BN + 8, dtype=torch.int32, device=device)[None].repeat(2, 1)
    # prompt chunk at positions 0..BN+7 ([CLS] row 0 with a window inside the chunk)
    kw = dict(q_pos=rows, response_start=rs, cls_windows=i32([[[1, 5]], [[2, BN]]], device),
              key_bias=torch.randn(2, 4, Lk, device=device))
    want = ess_attention_ref(q, k, v, **kw)
    kn, vn = k.clone(), v.clone()
    kn[:, 2 * BN:], vn[:, 2 * BN:] = float("nan"), float("nan")
    got, _ = run_triton(q, kn, vn, path="prefill", **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # a lone [CLS] row whose two windows leave a gap of whole tiles
    kw = dict(q_pos=torch.zeros(2, 1, dtype=torch.int32, device=device), response_start=rs,
              cls_windows=i32([[[1, 5], [3 * BN, 4 * BN]], [[3 * BN + 1, Lk], [2, 3]]], device))
    want = ess_attention_ref(q[:, :1], k, v, **kw)
    kn, vn = k.clone(), v.clone()
    kn[:, BN:3 * BN], vn[:, BN:3 * BN] = float("nan"), float("nan")
    got, _ = run_triton(q[:, :1], kn, vn, path="prefill", **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_bhsd_views_and_non_causal(device):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 37, 64, generator=g).to(device).transpose(1, 2)  # (B, S, H, D) view
    k = torch.randn(2, 2, 37, 64, generator=g).to(device).transpose(1, 2)
    v = torch.randn(2, 2, 37, 64, generator=g).to(device).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, seqlens_k=i32([37, 30], device))
    check(q, k, v, causal=False, seqlens_k=i32([37, 30], device), softmax_scale=0.07)
    check(q[:, :2], k, v, path="decode", seqlens_k=i32([37, 30], device))
    # non-causal ESS, and a sequence with no valid key at all (every row outputs 0)
    ess = dict(response_start=i32([9, 3], device), cls_windows=i32([[[20, 37]], [[0, 5]]], device))
    q_pos = torch.arange(37, dtype=torch.int32, device=device)[None].repeat(2, 1)
    check(q, k, v, causal=False, q_pos=q_pos, seqlens_k=i32([37, 0], device), **ess)
    check(q[:, :2], k, v, causal=False, q_pos=q_pos[:, :2].flip(1), seqlens_k=i32([30, 0], device),
          path="decode", **ess)


@pytest.mark.parametrize("device", DEVICES)
def test_public_entry_point(device):
    q, k, v = make_qkv(2, 19, 19, 4, 2, 64, torch.float32, device, seed=12)
    rs, wins = i32([5, 3], device), i32([[[1, 4]], [[2, 19]]], device)
    got = ess_attention(q, k, v, response_start=rs, cls_windows=wins, backend="triton")
    want = ess_attention_ref(q, k, v, response_start=rs, cls_windows=wins)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    auto = dispatch.choose("ess_attention", "auto", device=q.device, dtype=q.dtype, head_dim=64,
                           seqlen_q=19, seqlen_k=19, requires_grad=False)[0]
    assert auto == ("triton" if q.device.type == "cuda" else "torch")


def test_triton_refuses_fp64():
    qd = torch.randn(1, 4, 2, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ess_attention(qd, qd, qd, backend="triton")


_COMPILE_FOR_SM90 = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
import safekern.ops.attention_triton as A

PTRS = dict(LSE="*fp32", QPOS="*i32", SEQLENS="*i32", RSTART="*i32", CW="*i32", KB="*fp32",
            OPART="*fp32", LPART="*fp32", Q="*bf16", K="*bf16", V="*bf16", O="*bf16")

def build(fn, warps, stages, **consts):
    sig = {n: "constexpr" if n in consts else PTRS.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))

common = dict(HAS_QPOS=True, HAS_SEQLENS=True, CAUSAL=True, IS_ESS=True, HAS_BIAS=True,
              HEAD_DIM=128, BLOCK_D=128,
              DOT_PREC="tf32", INTERP_BF16=False)
fwd = build(A._ess_attn_fwd, 8, 3, STORE_LSE=True, BLOCK_M=128, BLOCK_N=64, **common)
dec = build(A._ess_attn_decode_split, 4, 3, BLOCK_M=16, BLOCK_N=64, **common)
build(A._ess_attn_decode_combine, 4, 1, STORE_LSE=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16)
assert "mma" in fwd.asm["ptx"] and "mma" in dec.asm["ptx"], "dots did not lower to tensor cores"
print("ok", fwd.metadata.shared, dec.metadata.shared)
"""


def test_kernels_compile_for_h100():
    """Compile (ptxas, sm_90) the kernels the GPU would run: catches what the interpreter
    forgives (types across branches, shared memory) on a machine without a GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]
