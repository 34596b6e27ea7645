"""Triton head_sample vs the reference: exact greedy/forced tokens, identical ESS state traces,
statistical sampling (frequencies, supports of top-k/top-p/min-p), seeds, NaN handling.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); the interpreter pays per
launch and per op, so statistical draws are batched as many rows of one launch.
"""
import importlib
import math
import zlib
import os

import pytest
import torch

from safekern import EssConfig, EssState, SamplingParams, head_sample
from safekern.ops import dispatch
from safekern.ops.head_sample_triton import head_sample_triton
from safekern.reference import (escalate, filter_logits_ref, forced_tokens, head_sample_ref,
                                plan_step, probe_score_ref, safety_score_ref, update_state)
from safekern.spec import BENIGN, REFUSING, SCHEDULES, SUSPECT

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
REFUSAL = [5, 9, 2]
STATE_FIELDS = ("mode", "flags", "switch_step", "next_eval", "interval", "forced_idx",
                "trigger_step", "evaluating", "finished", "seq_len")


def need(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU case runs the kernels in the Triton interpreter")


def poisoned(B, device):
    return (torch.full((B,), -1, dtype=torch.int64, device=device),
            torch.full((B,), -7.0, dtype=torch.float32, device=device))


def run(h_tok, W, **kw):
    """The Triton backend writing into poisoned outputs (so unwritten entries fail)."""
    out = poisoned(h_tok.shape[0], h_tok.device)
    tok, p = head_sample_triton(h_tok, W, **kw, out=out)
    assert tok.data_ptr() == out[0].data_ptr() and p.data_ptr() == out[1].data_ptr()
    return tok, p


def separated_argmax(logits, gap=1e-3):
    top2 = logits.double().topk(2, dim=-1).values
    assert bool((top2[:, 0] - top2[:, 1] > gap).all()), "test data has a near-tie at the argmax"
    return logits.argmax(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V,Dm,dtype", [(111, 96, torch.float32), (5000, 64, torch.bfloat16),
                                        (32000, 64, torch.float32), (128256, 32, torch.float16)])
def test_greedy_is_exact(device, V, Dm, dtype):
    need(device)
    g = torch.Generator().manual_seed(V)
    B = 3
    big = torch.randn(B, 2 * Dm, generator=g).to(device, dtype)
    h = big[:, :Dm]                                     # strided rows, no copy
    W = (torch.randn(V, Dm, generator=g) / math.sqrt(Dm)).to(device, dtype)
    want = separated_argmax(h.float() @ W.float().t())
    tok, p = run(h, W)
    assert torch.equal(tok, want) and torch.isnan(p).all()
    ref_tok, _ = head_sample_ref(h, W)
    assert torch.equal(tok, ref_tok)


def safety_case(device, B=6, Dm=48, V=111, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, Dm, generator=g).to(device)
    W = torch.randn(V, Dm, generator=g).to(device)
    h_cls = torch.randn(B, Dm, generator=g).to(device)
    return h, W, h_cls, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["sigmoid-float", "sigmoid-tensor", "two-class"])
@pytest.mark.parametrize("policy", ["low", "medium", "high"])
def test_safety_score_and_forced_tokens_match_reference(device, head, policy):
    need(device)
    h, W, h_cls, g = safety_case(device)
    B, Dm = h_cls.shape
    if head == "two-class":
        sw = (torch.randn(2, Dm, generator=g) * 0.3).to(device)
        sb = torch.tensor([0.1, -0.2], device=device)
    else:
        sw = (torch.randn(Dm, generator=g) * 0.3).to(device)
        sb = 0.25 if head == "sigmoid-float" else torch.tensor(0.25, device=device)
    ess = EssConfig(policy=policy, tau=2, schedule="each")
    st = EssState.create([4] * B, [1] * B, [3] * B, REFUSAL, ess, device=device, refusal_skip=1)
    st.seq_len.copy_(torch.tensor([4, 6, 4, 5, 4, 4], dtype=torch.int32))  # n = 0 and n > 0
    st.evaluating.copy_(torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool))
    st.forced_idx[5] = 1                                # mid-prefix row, not evaluating
    st.mode[5] = 3
    ref = st.clone()
    tok, p = run(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=sb, state=st, ess=ess)
    want_tok, want_p = head_sample_ref(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=sb,
                                       state=ref, ess=ess)
    ev = ref.evaluating
    torch.testing.assert_close(p[ev], want_p[ev], rtol=1e-5, atol=1e-6)
    assert torch.isnan(p[~ev]).all()
    assert torch.equal(tok, want_tok)
    for f in STATE_FIELDS:
        assert torch.equal(getattr(st, f), getattr(ref, f)), f


@pytest.mark.parametrize("device", DEVICES)
def test_refusal_starts_on_a_new_line_only_mid_response(device):
    """A trigger with response tokens (n > 0) forces every refusal id (the newline first); one
    on an empty response starts after the refusal_skip newline ids. Same on the kernel."""
    need(device)
    h, W, h_cls, _ = safety_case(device, B=4)
    B, Dm = h_cls.shape
    ess = EssConfig(policy="high", threshold=0.0)         # every first evaluation triggers
    st = EssState.create([4] * B, [1] * B, [3] * B, REFUSAL, ess, device=device, refusal_skip=1)
    st.seq_len.copy_(torch.tensor([4, 5, 4, 9], dtype=torch.int32))
    st.evaluating.fill_(True)
    ref = st.clone()
    sw = torch.zeros(Dm, device=device)
    outs, finished = [], []
    for _ in range(3):
        outs.append(run(h, W, h_cls=h_cls, safety_weight=sw, state=st, ess=ess)[0].tolist())
        want, _ = head_sample_ref(h, W, h_cls=h_cls, safety_weight=sw, state=ref, ess=ess)
        assert outs[-1] == want.tolist() and torch.equal(st.finished, ref.finished)
        finished.append(st.finished.tolist())
        st.evaluating.fill_(False)
        ref.evaluating.fill_(False)
    rows = list(zip(*outs))
    assert rows[1] == rows[3] == tuple(REFUSAL)                 # mid-response: "\n" + refusal
    assert rows[0][:2] == rows[2][:2] == tuple(REFUSAL[1:])     # empty response: no newline
    assert finished[1:] == [[True, False, True, False], [True] * 4]  # high: ends after it


def trace_configs():
    for schedule in SCHEDULES:
        for policy in ("low", "medium", "high"):
            yield EssConfig(schedule=schedule, policy=policy, period=3, anneal_start=1,
                            anneal_growth=1.7, anneal_stop=25, first_at=1, threshold=0.3 if
                            policy == "low" else 0.5, tau=2 if schedule == "each" else 3)
    # floor(2930 * 2.3) is 6738 in float64 but 6739 in float32: the interval grows in float64
    yield EssConfig(schedule="annealing", anneal_start=2930, anneal_growth=2.3,
                    anneal_stop=10000)
    yield EssConfig(schedule="cascade", cascade_net=True, anneal_growth=1.7, anneal_stop=25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ess", list(trace_configs()), ids=lambda e: f"{e.label}-{e.policy}")
def test_state_trace_matches_controller(device, ess):
    """Random verdicts near the threshold, many steps: after every step each state field,
    the token and p_unsafe equal the reference controller fed the kernel's own scores."""
    need(device)
    steps, B, Dm, V = 30, 12, 16, 37
    g = torch.Generator().manual_seed(zlib.crc32((ess.label + ess.policy).encode()))
    W = torch.randn(V, Dm, generator=g).to(device)
    sw = torch.zeros(Dm)
    sw[0] = 1.0                                          # score logit = h_cls[:, 0] + bias
    sw, bias = sw.to(device), -0.05
    P = torch.randint(3, 9, (B,), generator=g)
    st = EssState.create(P, torch.ones(B, dtype=torch.long), P - 1, REFUSAL, ess, device=device,
                         refusal_skip=1)
    ref = st.clone()
    logit_thr = math.log(ess.threshold / (1 - ess.threshold)) - bias
    pw = (torch.randn(Dm, generator=g) * 0.5).to(device)
    seen, escalated = set(), False
    for step in range(steps):
        for s in (st, ref):
            s.seq_len.copy_(P.to(device, torch.int32) + step)
            plan_step(s, ess)
        h = torch.randn(B, Dm, generator=g).to(device)
        h_cls = torch.randn(B, Dm, generator=g)
        h_cls[:, 0] = logit_thr - 0.4 + torch.randn(B, generator=g) * 0.6
        h_cls[0, 0] = logit_thr                          # p rounds to the threshold itself
        h_cls = h_cls.to(device)
        # the cascade's probe on the token rows, scores spread around its threshold
        q = torch.full((B,), -3.0, device=device)
        probe = {} if ess.schedule != "cascade" else dict(
            probe_weight=pw, probe_bias=torch.tensor(-0.1, device=device), probe_threshold=0.6,
            probe_out=q)
        tok, p = run(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=bias, state=st, ess=ess,
                     **probe)
        ev = ref.evaluating.clone()
        want_p = safety_score_ref(h_cls, sw, bias)
        torch.testing.assert_close(p[ev], want_p[ev], rtol=1e-5, atol=1e-6)
        assert torch.isnan(p[~ev]).all()
        update_state(ref, ess, p)
        if probe:
            torch.testing.assert_close(q, probe_score_ref(h, pw, -0.1), rtol=1e-5, atol=1e-6)
            before = ref.next_eval.clone()
            escalate(ref, ess, q, 0.6)                   # fed the kernel's own probe scores
            escalated |= bool((ref.next_eval < before).any())
        forced, ftok = forced_tokens(ref, ess)
        want_tok = torch.where(forced, ftok, separated_argmax(h @ W.t(), gap=1e-4))
        assert torch.equal(tok, want_tok), step
        for f in STATE_FIELDS:
            assert torch.equal(getattr(st, f), getattr(ref, f)), (step, f)
        seen.update(ref.mode.tolist())
    re_evaluates = ess.schedule != "first" and ess.anneal_start < steps
    want_modes = {BENIGN, SUSPECT, REFUSING} if re_evaluates else {BENIGN, REFUSING}
    assert want_modes <= seen, seen                      # every transition path was exercised
    assert escalated or ess.schedule != "cascade"        # the probe brought an evaluation


# ---- statistical sampling: one launch, row groups with per-row parameters ---------------

GROUPS = [  # (temperature, top_k, top_p, min_p)
    (0.7, 0, 1.0, 0.0),
    (1.0, 7, 1.0, 0.0),
    (1.0, 0, 0.6, 0.0),
    (1.3, 0, 1.0, 0.2),
    (0.8, 20, 0.9, 0.05),
    (0.0, 5, 0.5, 0.1),    # greedy: filters ignored
    (1.0, 1, 1.0, 0.0),    # top-1 is greedy too
]


def sampling_batch(n, V, Dm, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(1, Dm, generator=g)
    W = torch.randn(V, Dm, generator=g) * (2.5 / math.sqrt(Dm))
    B = n * len(GROUPS)
    cols = list(zip(*GROUPS))
    sp = SamplingParams(
        temperature=torch.tensor(cols[0]).repeat_interleave(n).to(device),
        top_k=torch.tensor(cols[1]).repeat_interleave(n).to(device),
        top_p=torch.tensor(cols[2]).repeat_interleave(n).to(device),
        min_p=torch.tensor(cols[3]).repeat_interleave(n).to(device), seed=seed)
    return h1.expand(B, Dm).contiguous().to(device), W.to(device), sp


def expected_probs(logits, group):
    """float64 reference distribution of one group, and the margin of its kept set."""
    T, k, p, mp = group
    x = filter_logits_ref(logits[None].double(), SamplingParams(
        temperature=T, top_k=k, top_p=p, min_p=mp))[0]
    if T == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).double()
    return torch.softmax(x, -1)


def check_margins(logits, group):
    """No kept-set boundary within rounding of a threshold (else fp32 vs fp64 may differ)."""
    T, k, p, mp = group
    if T == 0:
        return
    z = (logits.double() / T).sort(descending=True).values
    if 0 < k < z.numel():
        assert z[k - 1] - z[k] > 1e-4
    pr = torch.softmax(z[:k] if 0 < k < z.numel() else z, -1)
    if p < 1:
        assert ((pr.cumsum(0) - pr - p).abs() > 1e-4).all()
    if mp > 0:
        assert ((pr / pr[0] - mp).abs() > 1e-4).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V,n", [(111, 1000), (5000, 64)])
def test_sampling_statistics_and_supports(device, V, n):
    need(device)
    Dm = 32
    h, W, sp = sampling_batch(n, V, Dm, device)
    logits = (h[0].float() @ W.float().t()).cpu()
    tok, p = run(h, W, sampling=sp)
    assert torch.isnan(p).all() and bool(((tok >= 0) & (tok < V)).all())
    tok = tok.cpu().view(len(GROUPS), n)
    for gi, group in enumerate(GROUPS):
        check_margins(logits, group)
        want = expected_probs(logits, group)
        drawn = torch.bincount(tok[gi], minlength=V).double()
        assert (drawn[want == 0] == 0).all(), f"group {group}: token outside the kept set"
        if V == 111:                                     # enough draws for frequencies
            f = drawn / n
            tol = 5 * torch.sqrt(want * (1 - want) / n) + 2e-3
            assert ((f - want).abs() <= tol).all(), (group, (f - want).abs().max())


def test_gpu_block_shapes_in_the_interpreter(monkeypatch):
    """The GPU launch configuration (128-wide vocab tiles, one row per finalize program) run
    by the interpreter: greedy, forced tokens, scores without a state, and filter supports."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the GPU runs these shapes in the cuda cases")
    hs = importlib.import_module("safekern.ops.head_sample_triton")
    monkeypatch.setattr(hs, "_triton_blocks", lambda B, V, gpu: (16, 128, 64, 1))
    h, W, h_cls, g = safety_case("cpu", B=5, V=300)
    sw = torch.randn(h.shape[1], generator=g) * 0.2
    tok, p = run(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=0.1)   # no state: all rows
    torch.testing.assert_close(p, safety_score_ref(h_cls, sw, 0.1), rtol=1e-5, atol=1e-6)
    assert torch.equal(tok, separated_argmax(h @ W.t()))
    ess = EssConfig(policy="high", tau=1)
    st = EssState.create([4] * 5, [1] * 5, [3] * 5, REFUSAL, ess)
    st.evaluating.copy_(torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool))
    ref = st.clone()
    tok, p = run(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=0.1, state=st, ess=ess)
    want_tok, want_p = head_sample_ref(h, W, h_cls=h_cls, safety_weight=sw, safety_bias=0.1,
                                       state=ref, ess=ess)
    assert torch.equal(tok, want_tok) and torch.equal(torch.isnan(p), torch.isnan(want_p))
    for f in STATE_FIELDS:
        assert torch.equal(getattr(st, f), getattr(ref, f)), f
    n = 12
    hb, Wb, sp = sampling_batch(n, 300, 32, "cpu", seed=4)
    logits = hb[0] @ Wb.t()
    tok = run(hb, Wb, sampling=sp)[0].view(len(GROUPS), n)
    for gi, group in enumerate(GROUPS):
        check_margins(logits, group)
        want = expected_probs(logits, group)
        assert (want[tok[gi]] > 0).all(), group


@pytest.mark.parametrize("device", DEVICES)
def test_seeds_generator_and_rng_state(device):
    need(device)
    h, W, _ = sampling_batch(8, 111, 32, device)
    B = h.shape[0]
    sp = lambda s: SamplingParams(temperature=1.0, top_p=0.95, seed=s)  # noqa: E731
    a, b, c = run(h, W, sampling=sp(1))[0], run(h, W, sampling=sp(1))[0], run(h, W, sampling=sp(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = SamplingParams(temperature=1.0)
    gen = lambda: torch.Generator(device=device).manual_seed(11)  # noqa: E731
    g1 = gen()
    x, y = run(h, W, sampling=plain, generator=g1)[0], run(h, W, sampling=plain, generator=g1)[0]
    assert torch.equal(x, run(h, W, sampling=plain, generator=gen())[0])
    assert not torch.equal(x, y)                         # the generator advanced
    rs = torch.tensor([3, 0], dtype=torch.int64, device=device)
    u = run(h, W, sampling=plain, rng_state=rs)[0]
    assert torch.equal(u, run(h, W, sampling=plain, rng_state=rs.clone())[0])
    rs[1] += B * 111
    assert not torch.equal(u, run(h, W, sampling=plain, rng_state=rs)[0])
    # the public op forwards rng_state to either backend
    head_sample(h, W, sampling=plain, rng_state=rs, backend="torch")


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs(device, monkeypatch):
    need(device)
    h, W, h_cls, g = safety_case(device)
    sw = torch.randn(h.shape[1], generator=g).to(device)
    ess = EssConfig()
    st = EssState.create([4] * 6, [1] * 6, [3] * 6, REFUSAL, ess, device=device)
    st.evaluating.fill_(True)
    bad = h.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="h_tok"):
        head_sample(bad, W, backend="triton")
    bad_cls = h_cls.clone()
    bad_cls[2, 0] = float("inf")
    with pytest.raises(ValueError, match="h_cls"):
        head_sample(h, W, h_cls=bad_cls, safety_weight=sw, state=st, ess=ess, backend="triton")
    # Unchecked: tokens stay in range, a NaN score is a benign verdict exactly as in the reference.
    monkeypatch.setenv("SAFEKERN_SKIP_VALUE_CHECKS", "1")
    bad_cls[2, 0] = float("nan")
    ref = st.clone()
    tok, p = head_sample(bad, W, h_cls=bad_cls, safety_weight=sw, state=st, ess=ess,
                         backend="triton")
    update_state(ref, ess, p)
    forced_tokens(ref, ess)
    assert bool(((tok >= 0) & (tok < W.shape[0])).all()) and math.isnan(p[2])
    for f in STATE_FIELDS:
        assert torch.equal(getattr(st, f), getattr(ref, f)), f


def test_dispatch_and_float64():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the interpreter registration")
    ok = dispatch.available("head_sample", device=torch.device("cpu"), dtype=torch.float32)
    assert ok["triton"] is None and ok["torch"] is None
    h, W = torch.randn(2, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        head_sample(h, W, backend="triton")


# The GPU code path (not the interpreter) compiled for sm_90 through ptxas, which needs no GPU:
# catches typing and lowering errors a CPU-only CI would otherwise never see.
_AOT = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
hs = importlib.import_module("safekern.ops.head_sample_triton")

def build(fn, types, constexprs):
    sig = {n: "constexpr" if n in constexprs else types.get(n, "*fp32" if n.endswith("_ptr")
           else "i32") for n in fn.arg_names}
    cst = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert "ld.local" not in k.asm["ptx"], "register spills"

rng = dict(seed_ptr="*i64", seed_val="i64", offset_val="i64", topk_ptr="*i64", topk_val="i64",
           temp_val="fp32", topp_val="fp32", minp_val="fp32", part_idx_ptr="*i32")
for dt, per_row, block_b in (("bf16", True, 16), ("fp16", False, 64)):
    build(hs._lm_head_partial_kernel, dict(rng, h_ptr="*" + dt, w_ptr="*" + dt),
          dict(TEMP_PER_ROW=per_row, TOPK_PER_ROW=per_row, TOPP_PER_ROW=per_row,
               MINP_PER_ROW=per_row, SEED_FROM_PTR=per_row, NOISE=True, FILTERS=per_row,
               DOT_FP32=False, LOGPROBS=per_row, STORE_LOGITS=per_row, BLOCK_B=block_b,
               BLOCK_V=128, BLOCK_K=64))
state = {n: "*i32" for n in ("seq_len_ptr", "prompt_len_ptr", "mode_ptr", "flags_ptr",
         "switch_ptr", "next_eval_ptr", "interval_ptr", "forced_ptr", "trigger_ptr")}
state.update(evaluating_ptr="*i1", finished_ptr="*i1", refusal_ptr="*i64", threshold="fp32",
             growth_bits="i64", tok_ptr="*i64", hcls_ptr="*bf16", sw_ptr="*bf16", sb_val="fp32",
             h_ptr="*bf16", w_ptr="*bf16", nonfinite_ptr="*i32")
for sched, policy, two, filters in ((3, 2, True, True), (2, 1, False, False)):
    build(hs._finalize_kernel, dict(rng, **state),
          dict(TEMP_PER_ROW=True, TOPK_PER_ROW=False, TOPP_PER_ROW=True, MINP_PER_ROW=False,
               SEED_FROM_PTR=True, FILTERS=filters, HAS_SAFETY=True, TWO_CLASS=two,
               BIAS_MODE=2 if two else 0, HAS_STATE=True, SCHEDULE=sched, POLICY=policy,
               LOGPROBS=filters, BLOCK_R=1, BLOCK_T=1024, BLOCK_D=1024, BLOCK_F=512))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    try:
        import triton
    except ImportError:
        pytest.skip("triton is not installed")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
