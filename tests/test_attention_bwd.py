"""The Triton ESS attention backward against autograd through the float64 reference (§3, §7).

On CPU the kernels run under TRITON_INTERPRET=1 (conftest). Every case poisons what the
backward must never read: K/V past ``seqlens_k``, and q / dO of padding rows (``q_pos = -1``)
are NaN for the kernel (the reference gets clean copies). Tolerance per gradient: no worse than
2x the error of the reference evaluated in the input dtype (for fp16/bf16 inputs: half-precision
matmuls, float32 softmax, as transformers' eager attention), plus a small floor.

The training-shape sweep runs a covering subset in CI; SAFEKERN_FULL_SWEEP=1 runs its full cross
product (192 cases, ~40 minutes on 2 busy cores).
"""
import itertools
import os

import pytest
import torch

from safekern import ess_attention
from safekern.ops import dispatch
from safekern.reference import default_q_pos, ess_attention_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def i32(x, device="cpu"):
    return torch.tensor(x, dtype=torch.int32, device=device)


def make_inputs(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype)
               for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    do = torch.randn(B, Lq, Hq, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def resolved_q_pos(kw, B, Lq, Lk, device):
    if kw.get("q_pos") is not None:
        return kw["q_pos"]
    seqlens = kw.get("seqlens_k")
    if seqlens is None:
        seqlens = torch.full((B,), Lk, dtype=torch.int32, device=device)
    return default_q_pos(seqlens, Lq)


def poisoned(q, k, v, do, kw):
    """Copies with NaN where the backward must not read: keys >= seqlens_k, padding rows."""
    q, k, v, do = q.clone(), k.clone(), v.clone(), do.clone()
    if kw.get("seqlens_k") is not None:
        for b, n in enumerate(kw["seqlens_k"].tolist()):
            k[b, n:], v[b, n:] = float("nan"), float("nan")
    pad = resolved_q_pos(kw, q.shape[0], q.shape[1], k.shape[1], q.device) < 0
    q[pad], do[pad] = float("nan"), float("nan")
    return q, k, v, do, pad


def ref_grads(q, k, v, do, kw, key_bias, dtype, dlse=None):
    """Gradients of the reference computed in ``dtype`` (float64 = the gold standard; fp16/bf16:
    matmuls in ``dtype``, softmax in float32)."""
    compute = None if dtype == torch.float64 else dtype
    softmax = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    kb = None
    if key_bias is not None:
        kb = key_bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
        kb.requires_grad_(key_bias.requires_grad)
    o, lse = ess_attention_ref(*leaves, key_bias=kb, return_lse=True, compute_dtype=compute,
                               softmax_dtype=softmax, **kw)
    loss = (o.double() * do.double()).sum()
    if dlse is not None:
        fin = torch.isfinite(lse)
        loss = loss + (torch.where(fin, lse.double(), 0.0) * dlse.double()).sum()
    wrt = leaves + ([kb] if kb is not None and kb.requires_grad else [])
    return [g.double() for g in torch.autograd.grad(loss, wrt)]


def check_grads(q, k, v, do, *, key_bias=None, bias_grad=False, with_lse=False, seed=0,
                floor=None, **kw):
    """Kernel gradients (through ``ess_attention(backend="triton")``) vs the reference.

    ``floor``: absolute slack on top of 2x the reference error; default ``4 eps`` relative to
    the largest gradient."""
    dtype = q.dtype
    qp, kp, vp, dop, pad = poisoned(q, k, v, do, kw)
    leaves = [x.requires_grad_() for x in (qp, kp, vp)]
    kb = None
    if key_bias is not None:
        kb = key_bias.clone().requires_grad_(bias_grad)
    wrt = leaves + ([kb] if bias_grad else [])
    outs = ess_attention(*leaves, key_bias=kb, return_lse=with_lse, backend="triton", **kw)
    dlse = None
    if with_lse:
        o, lse = outs
        g = torch.Generator().manual_seed(seed)
        # rows that see nothing (lse = -inf) get no lse gradient: it is not differentiable there
        dlse = torch.where(torch.isfinite(lse.detach()),
                           torch.randn(lse.shape, generator=g).to(lse.device), 0.0)
        got = torch.autograd.grad((o, lse), wrt, (dop, dlse))
    else:
        got = torch.autograd.grad(outs, wrt, dop)
    kb_ref = None if key_bias is None else key_bias.clone().requires_grad_(bias_grad)
    gold = ref_grads(q, k, v, do, kw, kb_ref, torch.float64, dlse)
    low = ref_grads(q, k, v, do, kw, kb_ref, dtype, dlse)
    names = ["dq", "dk", "dv", "dkey_bias"]
    eps = torch.finfo(dtype).eps
    for name, a, gd, lo in zip(names, got, gold, low):
        assert a.shape == gd.shape and a.dtype == (torch.float32 if name == "dkey_bias" else dtype)
        assert not torch.isnan(a).any(), f"{name} has NaN (a poisoned value leaked)"
        err = (a.double() - gd).abs().max().item()
        err_ref = (lo - gd).abs().max().item()
        slack = 4 * eps * max(1.0, gd.abs().max().item()) if floor is None else floor
        assert err <= 2 * err_ref + slack, \
            f"{name} error {err:.3g} > 2 x reference error {err_ref:.3g} + {slack:.2g}"
    assert (got[0][pad] == 0).all(), "dq of padding rows must be exactly 0"
    return got


def ess_kw(B, L, device, phase):
    """Right-padded rows, positions with padding rows (-1) and the phase masks of the training collator."""
    seqlens = i32([L, L - 13, L - 40][:B], device)
    i = torch.arange(L, dtype=torch.int32, device=device)[None].expand(B, L)
    kw = dict(seqlens_k=seqlens, q_pos=torch.where(i < seqlens[:, None], i, torch.full_like(i, -1)))
    if phase == "alignment":  # [CLS] over the query span (+ an empty / an overlapping window)
        kw["response_start"] = i32([20, 33, 9][:B], device)
        kw["cls_windows"] = i32([[[2, 9], [30, 50]], [[7, 7], [L - 30, L]],
                                 [[50, 40], [0, L]]][:B], device)
    elif phase == "pretraining":  # nobody sees [CLS], [CLS] sees every token
        kw["response_start"] = torch.full((B,), L, dtype=torch.int32, device=device)
        kw["cls_windows"] = torch.stack([torch.ones_like(seqlens), seqlens], -1)[:, None, :]
    return kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("phase", ["plain", "pretraining", "alignment"])
def test_gqa_right_padded_phases(device, phase):
    """seqlen 97, GQA 4:1, padding rows and keys, per-head key bias with its gradient."""
    B, L, Hq, Hkv, D = 2, 97, 8, 2, 64
    q, k, v, do = make_inputs(B, L, L, Hq, Hkv, D, torch.float32, device, seed=len(phase))
    kw = ess_kw(B, L, device, phase)
    kb = torch.randn(B, Hq, L, device=device) if phase == "alignment" else None
    check_grads(q, k, v, do, key_bias=kb, bias_grad=kb is not None, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_broadcast_bias(device, dtype):
    B, L, Hq, Hkv, D = 3, 61, 4, 1, 64
    q, k, v, do = make_inputs(B, L, L, Hq, Hkv, D, dtype, device, seed=3)
    kw = ess_kw(B, L, device, "alignment")
    check_grads(q, k, v, do, key_bias=torch.randn(B, 1, L, device=device), bias_grad=True, **kw)


FULL_SWEEP = os.environ.get("SAFEKERN_FULL_SWEEP", "0") == "1"
# (L, (Hq, Hkv), D, dtype, key bias, [CLS] windows)
SWEEP = list(itertools.product((61, 97, 128, 255), ((4, 1), (8, 2), (2, 2)), (64, 128),
                               (torch.bfloat16, torch.float16), (True, False), (True, False)))
# CI: every value of every axis, issue 26's case first; the last one failed dkey_bias (3.3x)
# while dk/dv took delta from the rounded O
SWEEP_CI = [(97, (4, 1), 64, torch.bfloat16, True, True),
            (61, (8, 2), 128, torch.float16, False, True),
            (128, (2, 2), 64, torch.float16, True, False),
            (255, (2, 2), 64, torch.bfloat16, False, True),
            (97, (4, 1), 128, torch.bfloat16, True, True)]


def sweep_params():
    skip = pytest.mark.skip(reason="set SAFEKERN_FULL_SWEEP=1 to run every combination")
    return [pytest.param(*case, marks=() if FULL_SWEEP or case in SWEEP_CI else skip,
                         id="-".join(map(str, (case[0], f"{case[1][0]}:{case[1][1]}", case[2],
                                               str(case[3])[6:], "bias" * case[4] or "nobias",
                                               "cls" * case[5] or "nocls"))))
            for case in SWEEP]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, heads, D, dtype, bias, cls", sweep_params())
def test_training_shapes_sweep(device, L, heads, D, dtype, bias, cls):
    """Issue 26: a training batch (B=2, right-padded: seqlens L and L - 14, padding rows
    q_pos = -1; response_start = seqlens // 2 and one [CLS] window [3, response_start - 2);
    a broadcast (B, 1, L) key bias with its gradient) under the 2x rule with a tight floor:
    a quarter of the dtype's eps, absolute, where 4 eps relative would hide a 2.4x dq error."""
    Hq, Hkv = heads
    q, k, v, do = make_inputs(2, L, L, Hq, Hkv, D, dtype, device, seed=L + Hq + D)
    seqlens = i32([L, L - 14], device)
    i = torch.arange(L, dtype=torch.int32, device=device)[None].expand(2, L)
    kw = dict(seqlens_k=seqlens, q_pos=torch.where(i < seqlens[:, None], i, -1))
    if cls:
        rs = seqlens // 2
        kw["response_start"] = rs
        kw["cls_windows"] = torch.stack([torch.full_like(rs, 3), rs - 2], -1)[:, None, :]
    g = torch.Generator().manual_seed(L * D)
    kb = torch.randn(2, 1, L, generator=g).to(device) if bias else None
    check_grads(q, k, v, do, key_bias=kb, bias_grad=bias, floor=torch.finfo(dtype).eps / 4,
                **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [128, 80])
def test_head_dims_non_causal_and_lse_grad(device, D):
    """Head dims 128 and 80 (a padded tile), MHA, non-causal ESS, a differentiated lse."""
    B, L, H = 2, 37, 2
    q, k, v, do = make_inputs(B, L, L, H, H, D, torch.float32, device, seed=D)
    kw = dict(causal=False, seqlens_k=i32([37, 25], device), q_pos=torch.arange(
        L, dtype=torch.int32, device=device)[None].repeat(B, 1),
        response_start=i32([9, 3], device), cls_windows=i32([[[20, 37]], [[0, 5]]], device))
    check_grads(q, k, v, do, with_lse=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_with_cls_row_and_decode_rows(device):
    """Lq < Lk with a [CLS] row inside the chunk (bottom-right rows), and a decode step
    (token row + [CLS] row / padding row) whose forward ran the split-KV kernel."""
    B, Lq, Lk, Hq, Hkv, D = 2, 24, 70, 4, 2, 64
    q, k, v, do = make_inputs(B, Lq, Lk, Hq, Hkv, D, torch.float32, device, seed=5)
    kw = dict(seqlens_k=i32([70, 51], device), response_start=i32([12, 6], device),
              cls_windows=i32([[[1, 10], [60, 70]], [[40, 51], [3, 3]]], device))
    q_pos = default_q_pos(kw["seqlens_k"], Lq)
    q_pos[:, 3] = 0
    q_pos[1, 5] = -1
    check_grads(q, k, v, do, q_pos=q_pos, key_bias=torch.randn(B, Hq, Lk, device=device),
                bias_grad=True, **kw)
    q_pos = torch.stack([kw["seqlens_k"] - 1, i32([0, -1], device)], 1)
    check_grads(q[:, :2], k, v, do[:, :2], q_pos=q_pos, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_nothing_get_zero_gradients(device):
    """A sequence without valid keys and a [CLS] row whose windows are all empty or past
    seqlens_k (it sees key 0 only): gradients are finite, zero where nothing is seen."""
    B, L, H, D = 2, 33, 2, 64
    q, k, v, do = make_inputs(B, L, L, H, H, D, torch.float32, device, seed=9)
    kw = dict(seqlens_k=i32([20, 0], device), q_pos=torch.arange(
        L, dtype=torch.int32, device=device)[None].repeat(B, 1),
        response_start=i32([4, 4], device), cls_windows=i32([[[5, 5], [25, 33]], [[0, 9]] * 2],
                                                             device))
    dq, dk, dv = check_grads(q, k, v, do, **kw)
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[0, 20:] == 0).all() and (dv[0, 20:] == 0).all()


def test_dispatch_accepts_grad_and_auto_picks_reference_on_cpu():
    q = torch.randn(1, 4, 2, 32, requires_grad=True)
    k = v = torch.randn(1, 4, 2, 32)
    assert ess_attention(q, k, v, backend="triton").requires_grad
    ctx = dict(device=q.device, dtype=q.dtype, head_dim=32, seqlen_q=4, seqlen_k=4,
               requires_grad=True)
    assert dispatch.choose("ess_attention", "triton", **ctx)[0] == "triton"
    assert dispatch.choose("ess_attention", "auto", **ctx)[0] == "torch"


def test_torch_compile_traces_without_graph_break():
    """The training path is a custom op: fullgraph compilation of forward + backward works."""
    q, k, v, do = make_inputs(1, 19, 19, 4, 2, 32, torch.float32, "cpu", seed=12)
    rs, wins = i32([5]), i32([[[1, 4]]])

    def loss(q, k, v):
        o = ess_attention(q, k, v, response_start=rs, cls_windows=wins, backend="triton")
        return (o * do).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


_COMPILE_BWD_FOR_SM90 = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
import safekern.ops._attention_bwd as A

def build(fn, warps, stages, dtype, **consts):
    ptrs = dict(LSE="*fp32", DELTA="*fp32", PDP="*fp32", DKB="*fp32", KB="*fp32", QPOS="*i32",
                SEQLENS="*i32", RSTART="*i32", CW="*i32")
    sig = {n: "constexpr" if n in consts else ptrs.get(
        n, f"*{dtype}" if n in ("Q", "K", "V", "DO", "DQ", "DK", "DV") else
        ("fp32" if n in ("qk_scale", "sm_scale") else "i32")) for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))

import torch
for D, dtype, tdt in ((128, "bf16", torch.bfloat16), (64, "fp16", torch.float16),
                      (128, "fp32", torch.float32)):
    (m1, n1), (m2, n2), warps, stages = A._bwd_config(D, tdt, torch.device("cuda"))
    common = dict(HAS_QPOS=True, HAS_SEQLENS=True, CAUSAL=True, IS_ESS=True, HAS_BIAS=True,
                  HEAD_DIM=D, BLOCK_D=D, DOT_PREC="ieee" if dtype == "fp32" else "tf32",
                  INTERP_BF16=False)
    dkdv = build(A._ess_attn_bwd_dkdv, warps, stages, dtype, BIAS_GRAD=True, BLOCK_M=m1,
                 BLOCK_N=n1, **common)
    dq = build(A._ess_attn_bwd_dq, warps, stages, dtype, BLOCK_M=m2, BLOCK_N=n2, **common)
    if dtype != "fp32":  # fp32 takes full-precision (ieee) dots, not tensor cores
        assert "mma" in dkdv.asm["ptx"] and "mma" in dq.asm["ptx"], "dots missed tensor cores"
    print(D, dtype, dkdv.metadata.shared, dq.metadata.shared)
print("ok")
"""


def test_backward_kernels_compile_for_h100():
    """ptxas (sm_90) on the backward kernels at their GPU tile sizes: types across branches
    and shared memory, which the interpreter forgives, on a machine without a GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    res = subprocess.run([sys.executable, "-c", _COMPILE_BWD_FOR_SM90], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stderr[-3000:]


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) outputs vs real ones (shapes, strides), autograd registration and
    AOT dispatch of the two custom ops, on strided (B, H, S, D) views."""
    from safekern.ops.attention_triton import _ess_attention_bwd_op, _ess_attention_fwd_op

    g = torch.Generator().manual_seed(14)
    q = torch.randn(1, 4, 19, 32, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 19, 32, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 2, 19, 32, generator=g).transpose(1, 2).requires_grad_()
    kb = torch.randn(1, 1, 19, generator=g).requires_grad_()
    meta = (None, i32([17]), i32([5]), i32([[[1, 4]]]), kb)
    torch.library.opcheck(_ess_attention_fwd_op, (q, k, v, *meta, 0.2, True))
    o, lse = _ess_attention_fwd_op(q, k, v, *meta, 0.2, True)
    do = torch.randn(1, 19, 4, 32, generator=g)
    torch.library.opcheck(_ess_attention_bwd_op, (do, q.detach(), k.detach(), v.detach(),
                                                  o.detach(), lse.detach(), torch.zeros_like(lse),
                                                  *meta[:4], kb.detach(), 0.2, True, True))
