"""The csrc/ kernels and launchers run on CPU threads (tests/cuda_emulator.cpp) vs the reference.

No GPU: g++ compiles the very .cu sources with a minimal emulation of blocks, __syncthreads
and warp shuffles. This checks indexing, strides, tiling, masking, the online softmax, the
split-KV combine, the LM-head/argmax reductions and the fused state update; it cannot see
races, memory-model or performance problems (tests/test_cuda_backend.py and compute-sanitizer
on a GPU do). Outputs are poisoned with NaN before each launch.

Emulated threads are slow (a context switch per thread per barrier), so CI runs one case per
code path; SAFEKERN_EMULATE_ALL=1 runs every dtype/shape combination (several minutes).
"""
import math
import os

import pytest
import torch

from cuda_tools import DTYPE_CODE, assert_step_matches, build_emulator, emu_head_sample_raw
from safekern.reference import ess_attention_ref, plan_step
from safekern.reference.attention import default_q_pos
from safekern.reference.sampling import head_sample_ref, probe_score_ref, safety_score_ref
from safekern.spec import POLICIES, SCHEDULES, EssConfig, EssState

DTYPE_ID = dict(ids=lambda d: str(d).replace("torch.", ""))
NAN = float("nan")
ALL = os.environ.get("SAFEKERN_EMULATE_ALL", "0") == "1"


def full_only(*params):
    """Parameters beyond the first one run only with SAFEKERN_EMULATE_ALL=1."""
    skip = pytest.mark.skip(reason="set SAFEKERN_EMULATE_ALL=1 to emulate every combination")
    return [p if i == 0 or ALL else pytest.param(*(p if isinstance(p, tuple) else (p,)),
                                                  marks=skip)
            for i, p in enumerate(params)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emu"))


def _p(t):
    return None if t is None else t.data_ptr()


def emu_attention(lib, q, k, v, *, q_pos=None, seqlens_k=None, response_start=None,
                  cls_windows=None, key_bias=None, causal=True, num_splits=1):
    """What bindings.cpp does, over host tensors: returns (o, lse)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if seqlens_k is None:
        seqlens_k = torch.full((B,), Lk, dtype=torch.int32)
    if q_pos is None:
        q_pos = default_q_pos(seqlens_k, Lq)
    o = torch.full_like(q, NAN)
    lse = torch.full((B, Hq, Lq), NAN)
    o_part = torch.full((num_splits, B, Lq, Hq, D), NAN)
    lse_part = torch.full((num_splits, B, Hq, Lq), NAN)
    kb = key_bias
    bias_strides = [0, 0, 0] if kb is None else \
        [kb.stride(0), 0 if kb.shape[1] == 1 else kb.stride(1), kb.stride(2)]
    strides = torch.tensor([s for t in (q, k, v, o) for s in t.stride()[:3]] + bias_strides,
                           dtype=torch.int64)
    W = 0 if cls_windows is None else cls_windows.shape[1]
    sizes = torch.tensor([B, Lq, Lk, Hq, Hkv, D, W], dtype=torch.int32)
    rc = lib.emu_ess_decode_attention(
        _p(q), _p(k), _p(v), _p(o), _p(lse), _p(q_pos.contiguous()), _p(seqlens_k),
        _p(response_start), _p(cls_windows), _p(kb), _p(o_part), _p(lse_part), _p(strides),
        _p(sizes), int(causal), D ** -0.5, num_splits, DTYPE_CODE[q.dtype])
    assert rc == 0, f"launcher returned cudaError {rc}"
    return o, lse


def assert_attention_close(o, lse, q, k, v, **kw):
    want, want_lse = ess_attention_ref(q.double(), k.double(), v.double(), return_lse=True, **kw)
    same = ess_attention_ref(q, k, v, compute_dtype=q.dtype, **kw)
    ref_err = (same.double() - want).abs().max().item()
    atol = 2 * ref_err + (1e-5 if q.dtype == torch.float32 else 1e-3)
    assert not torch.isnan(o).any(), "NaN in o: an element was not written"
    err = (o.double() - want).abs().max().item()
    assert err <= atol, f"max error {err:.3g} > {atol:.3g}"
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
    assert (lse[fin].double() - want_lse[fin]).abs().max() <= 1e-3


def decode_case(B, Lk, Hq, Hkv, D, dtype, seed, Lq=2, bias_heads=1, bhsd=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    if bhsd:
        k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
        v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    seqlens = torch.randint(1, Lk + 1, (B,), generator=g, dtype=torch.int32)
    seqlens[0] = Lk
    P = torch.minimum(seqlens, torch.randint(1, max(2, Lk // 2), (B,), generator=g,
                                             dtype=torch.int32))
    q_pos = torch.stack([seqlens - 1, torch.where(torch.arange(B) % 3 == 2, -1, 0).int()], 1)
    windows = torch.stack([torch.stack([torch.clamp(P, max=1), torch.clamp(P, max=3)], -1),
                           torch.stack([torch.maximum(P, seqlens - 10), seqlens], -1)], 1)
    kw = dict(q_pos=q_pos[:, :Lq].contiguous(), seqlens_k=seqlens, response_start=P,
              cls_windows=windows.int().contiguous())
    if bias_heads:
        kw["key_bias"] = torch.randn(B, bias_heads, Lk, generator=g)
    return q, k, v, kw


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], **DTYPE_ID)
@pytest.mark.parametrize("Hq, Hkv, D", [(8, 2, 64), (4, 1, 128), (3, 3, 32)])
@pytest.mark.parametrize("Lk, num_splits", [(97, 1), (300, 3)])
def test_decode_step(emu, dtype, Hq, Hkv, D, Lk, num_splits):
    q, k, v, kw = decode_case(3, Lk, Hq, Hkv, D, dtype, seed=Lk + D,
                              bias_heads=Hq if Hq == Hkv else 1)
    o, lse = emu_attention(emu, q, k, v, num_splits=num_splits, **kw)
    assert_attention_close(o, lse, q, k, v, **kw)


def test_strided_cache_many_splits_and_plain_rows(emu):
    q, k, v, kw = decode_case(2, 200, 8, 2, 64, torch.bfloat16, seed=5, bias_heads=8, bhsd=True)
    o, lse = emu_attention(emu, q, k, v, num_splits=7, **kw)
    assert_attention_close(o, lse, q, k, v, **kw)
    seqlens = torch.tensor([3, 200], dtype=torch.int32)  # Lq=5: rows before 0 are padding
    q5 = torch.randn(2, 5, 8, 64).to(torch.bfloat16)
    o, lse = emu_attention(emu, q5, k, v, seqlens_k=seqlens, num_splits=2)
    assert_attention_close(o, lse, q5, k, v, seqlens_k=seqlens)


def test_rows_at_zero_last_and_empty(emu):
    q, k, v, _ = decode_case(2, 64, 4, 2, 64, torch.float32, seed=7)
    q_pos = torch.tensor([[0, 63], [0, -1]], dtype=torch.int32)
    seqlens = torch.tensor([64, 40], dtype=torch.int32)
    for ess in (dict(response_start=torch.tensor([70, 5], dtype=torch.int32),
                     cls_windows=torch.tensor([[[5, 5], [10, 20]], [[0, 0], [30, 64]]],
                                              dtype=torch.int32)),
                dict(response_start=torch.tensor([3, 3], dtype=torch.int32)), {}):
        kw = dict(q_pos=q_pos, seqlens_k=seqlens, **ess)
        o, lse = emu_attention(emu, q, k, v, num_splits=2, **kw)
        assert_attention_close(o, lse, q, k, v, **kw)
        assert torch.equal(o[1, 1], torch.zeros_like(o[1, 1]))
    o, lse = emu_attention(emu, q, k, v, q_pos=torch.tensor([[-1, -1], [-1, 5]], dtype=torch.int32),
                           seqlens_k=torch.tensor([0, 6], dtype=torch.int32))
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_hidden_keys_never_leak_and_one_nan_rule(emu, num_splits):
    """tests/test_hostile_inputs.py's outcome classes on the CUDA kernels: NaN/inf at keys a
    row cannot see change nothing; what a row sees propagates NaN (the element for v, the row
    for a logit); a row whose visible logits are all -inf outputs 0."""
    from safekern.reference.attention import ess_visibility
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    g = torch.Generator().manual_seed(11)
    B, Lk, Hq, Hkv, D = 2, 64, 4, 2, 64
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((2, Hq), (Lk, Hkv), (Lk, Hkv)))
    kw = dict(q_pos=i32([[63, 0], [40, 0]]), seqlens_k=i32([64, 41]), response_start=i32([10, 10]),
              cls_windows=i32([[[2, 5]], [[20, 30]]]))
    clean = ess_attention_ref(q.double(), k.double(), v.double(), **kw)
    vis = ess_visibility(kw["q_pos"], kw["seqlens_k"], Lk, response_start=kw["response_start"],
                         cls_windows=kw["cls_windows"])                  # (B, Lq, Lk)
    pq, pk, pv = q.clone(), k.clone(), v.clone()
    pv[:, 7, 0, 3] = NAN          # token rows see key 7, the [CLS] rows do not
    pk[:, 50, 1] = NAN            # batch 0's token row sees key 50; beyond batch 1's seqlens
    pv[1, 41:] = float("inf")     # beyond batch 1's seqlens
    pq[1, 1, 0] = NAN             # batch 1's [CLS] row, head 0
    want = clean.clone()
    want[:, :, 0:2, 3] = want[:, :, 0:2, 3].masked_fill(vis[:, :, 7, None], NAN)
    want[:, :, 2:4] = want[:, :, 2:4].masked_fill(vis[:, :, 50, None, None], NAN)
    want[1, 1, 0] = NAN
    o, lse = emu_attention(emu, pq, pk, pv, num_splits=num_splits, **kw)
    assert torch.equal(o.isnan(), want.isnan())
    torch.testing.assert_close(o.double(), want, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.equal(lse.isnan(), want.isnan().all(-1).permute(0, 2, 1))
    kb = torch.full((B, 1, Lk), float("-inf"))
    o, lse = emu_attention(emu, q, k, v, num_splits=num_splits, key_bias=kb, **kw)
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


def test_num_splits_heuristic(emu):
    n = emu.sk_decode_attention_num_splits
    assert n(1, 32, 8, 2, 32768, 132) > 1                  # batch 1, long context: split
    assert n(64, 32, 8, 2, 32768, 132) == 1                # enough CTAs already
    assert n(1, 32, 8, 2, 300, 132) == 2                   # >= 256 keys per split
    assert n(1, 32, 8, 1, 10**6, 132) <= 64


# --------------------------------------------------------------------------- head_sample

def emu_head_sample(lib, h, w, *, h_cls=None, sw=None, sb=None, temperature=0.0, seed=0,
                    state=None, ess=None, logprobs=False, nonfinite=None, probe=None):
    """The emulated launcher; with ``logprobs`` returns the emitted tokens' logprobs too.
    ``nonfinite``: a (B,) int32 tensor the kernel ORs its NaN/inf flags into (None: NULL, off).
    ``probe``: the cascade's ``(weight (Dm,), bias (1,), threshold, out (B,))`` or None."""
    B = h.shape[0]
    temp = temperature if isinstance(temperature, torch.Tensor) else torch.full((B,), temperature)
    names = ("prompt_len", "seq_len", "mode", "flags", "switch_step", "next_eval", "interval",
             "forced_idx", "trigger_step", "evaluating", "finished", "refusal_ids")
    fields = [] if state is None else [getattr(state, n) for n in names]
    schedule = 0 if not ess else 5 if ess.cascade_net else SCHEDULES.index(ess.schedule)
    cfg = (ess.threshold, ess.tau, POLICIES.index(ess.policy), schedule,
           ess.period, ess.anneal_stop, ess.anneal_growth) if ess else (0.5, 1, 0, 0, 1, 0, 1.0)
    tokens, p_unsafe, lp = emu_head_sample_raw(
        lib, h, w, h_cls, sw, sb, temp.float().contiguous(),
        torch.tensor([seed], dtype=torch.int64), fields,
        state.refusal_skip if state is not None else 0, cfg, logprobs, nonfinite,
        *(probe or ()))
    return (tokens, p_unsafe, lp) if logprobs else (tokens, p_unsafe)


def assert_greedy(tokens, h, w):
    logits = h.double() @ w.double().t()
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1)
    assert torch.equal(tokens[clear], logits.argmax(-1)[clear])
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)
    assert (top2[:, 0] - chosen <= 1e-2 * top2[:, 0].abs().clamp(min=1)).all()


@pytest.mark.parametrize("dtype", full_only(torch.bfloat16, torch.float32, torch.float16),
                         **DTYPE_ID)
@pytest.mark.parametrize("B, Dm, V", [(9, 64, 111), (3, 100, 600)])  # vec16 / scalar loads
def test_greedy_tokens_and_safety_scores(emu, dtype, B, Dm, V):
    g = torch.Generator().manual_seed(B)
    h = torch.randn(B, Dm, generator=g).to(dtype)
    w = (torch.randn(V, Dm, generator=g) / math.sqrt(Dm)).to(dtype)
    h_cls = torch.randn(B, Dm, generator=g).to(dtype)
    sw = torch.randn(Dm, generator=g)
    tokens, p = emu_head_sample(emu, h, w, h_cls=h_cls, sw=sw, sb=torch.tensor([0.25]))
    assert_greedy(tokens, h, w)
    torch.testing.assert_close(p, safety_score_ref(h_cls, sw, 0.25), atol=1e-6, rtol=1e-5)
    tokens, p = emu_head_sample(emu, h, w)
    assert torch.isnan(p).all()


@pytest.mark.parametrize("policy, schedule", full_only(("high", "annealing"), ("medium", "each"),
                                                        ("low", "periodic")))
def test_fused_state_update_matches_reference(emu, policy, schedule):
    B, Dm, V = 9, 32, 300
    ess = EssConfig(policy=policy, schedule=schedule, tau=2, period=3, anneal_stop=20)
    g = torch.Generator().manual_seed(len(policy + schedule))
    P = torch.randint(4, 10, (B,), generator=g)
    ours = EssState.create(P.tolist(), [1] * B, (P - 1).tolist(), [7, 8, 9], ess, refusal_skip=1)
    ref = ours.clone()
    w = torch.randn(V, Dm, generator=g) / math.sqrt(Dm)
    sw = torch.randn(Dm, generator=g)
    rate = torch.rand(B, generator=g)
    for step in range(12):
        for s in (ours, ref):
            s.seq_len.copy_((P + step).int())
            plan_step(s, ess)
        z = torch.where(torch.rand(B, generator=g) < rate, 1.0, -1.0) * \
            (0.5 + torch.rand(B, generator=g))
        h_cls = z[:, None] * sw / sw.dot(sw)      # logits far from the 0.5 threshold
        h = 10 * w[torch.randint(0, V, (B,), generator=g)]  # one clear greedy token per row
        t_ours, p_ours = emu_head_sample(emu, h, w, h_cls=h_cls, sw=sw, state=ours, ess=ess)
        t_ref, p_ref = head_sample_ref(h, w, h_cls=h_cls, safety_weight=sw, state=ref, ess=ess)
        assert_step_matches(ours, ref, t_ours, t_ref, p_ours, p_ref, step, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("net", [False, True])
def test_cascade_probe_and_escalation_match_reference(emu, net):
    """The cascade: the probe score on the token rows equals probe_score_ref, and the state
    after update_state + escalate equals the reference step by step (with annealing's net)."""
    B, Dm, V = 7, 48, 300
    ess = EssConfig(schedule="cascade", cascade_net=net, tau=2, anneal_stop=20)
    g = torch.Generator().manual_seed(5 + net)
    P = torch.randint(4, 10, (B,), generator=g)
    ours = EssState.create(P.tolist(), [1] * B, (P - 1).tolist(), [7, 8, 9], ess, refusal_skip=1)
    ref = ours.clone()
    w = torch.randn(V, Dm, generator=g) / math.sqrt(Dm)
    sw, pw = torch.randn(Dm, generator=g), torch.randn(Dm, generator=g)
    escalated = 0
    for step in range(14):
        for s in (ours, ref):
            s.seq_len.copy_((P + step).int())
            plan_step(s, ess)
        z = torch.where(torch.rand(B, generator=g) < 0.15, 1.0, -1.0) * \
            (0.5 + torch.rand(B, generator=g))
        h_cls = z[:, None] * sw / sw.dot(sw)      # logits far from the 0.5 threshold
        h = 10 * w[torch.randint(0, V, (B,), generator=g)]  # one clear greedy token per row
        # probe logits far from the threshold's (0 here): flags on about half the rows
        zq = torch.where(torch.rand(B, generator=g) < 0.5, 1.0, -1.0) * \
            (0.5 + torch.rand(B, generator=g))
        h = h - (h @ pw / pw.dot(pw))[:, None] * pw + zq[:, None] * pw / pw.dot(pw)
        q = torch.full((B,), NAN)
        before = ref.next_eval.clone()
        t_ours, p_ours = emu_head_sample(emu, h, w, h_cls=h_cls, sw=sw, state=ours, ess=ess,
                                         probe=(pw, torch.tensor([0.0]), 0.5, q))
        t_ref, p_ref = head_sample_ref(h, w, h_cls=h_cls, safety_weight=sw, state=ref, ess=ess,
                                       probe_weight=pw, probe_bias=0.0, probe_threshold=0.5)
        assert_step_matches(ours, ref, t_ours, t_ref, p_ours, p_ref, step, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(q, probe_score_ref(h, pw, 0.0), atol=1e-6, rtol=1e-5)
        escalated += int(((ref.next_eval < before) & ~ref.evaluating).sum())
    assert escalated > 0


def test_temperature_sampling_across_vocab_tiles(emu):
    """Gumbel-max over 2 vocab tiles draws from softmax(logits / T); greedy rows stay argmax."""
    Dm, V, B, calls, temp = 16, 300, 8, 400 if ALL else 30, 0.5
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, Dm, generator=g)
    h = (w[[5, 150, 299]].sum(0) / 3).expand(B, Dm).contiguous()  # mass spread over the tiles
    temps = torch.full((B,), temp)
    temps[::4] = 0.0
    counts = torch.zeros(V)
    for seed in range(calls):
        tokens, _ = emu_head_sample(emu, h, w, temperature=temps, seed=seed)
        assert (tokens[::4] == (h[0] @ w.t()).argmax()).all()
        counts += torch.bincount(tokens[temps > 0], minlength=V).float()
    probs = torch.softmax(h[0].double() @ w.double().t() / temp, 0)
    n = counts.sum()
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 2e-3
    assert ((counts.double() / n - probs).abs() <= bound).all()
    again, _ = emu_head_sample(emu, h, w, temperature=temps, seed=3)
    assert torch.equal(again, emu_head_sample(emu, h, w, temperature=temps, seed=3)[0])


@pytest.mark.parametrize("dtype", full_only(torch.float32, torch.bfloat16), **DTYPE_ID)
def test_token_logprobs_match_log_softmax_after_temperature(emu, dtype):
    """logprob = log_softmax(logits / T)[token] (raw logits for greedy rows), over 3 vocab tiles,
    for sampled and for forced refusal tokens (rows 0 and 1 trigger at the first evaluation)."""
    B, Dm, V = 5, 64, 700
    g = torch.Generator().manual_seed(11)
    h = torch.randn(B, Dm, generator=g).to(dtype)
    w = (torch.randn(V, Dm, generator=g) / 4).to(dtype)
    temps = torch.tensor([0.0, 0.7, 0.0, 1.5, 0.3])
    ess = EssConfig(threshold=0.5)
    state = EssState.create([4] * B, [1] * B, [3] * B, [7, 8, 9], ess, refusal_skip=1)
    state.seq_len.copy_(torch.tensor([4, 6, 4, 4, 4], dtype=torch.int32))
    plan_step(state, ess)
    sw = torch.zeros(Dm)
    sw[0] = 1.0
    h_cls = torch.zeros(B, Dm).to(dtype)
    h_cls[:2, 0] = 5.0                                   # p_unsafe ~ 0.99: rows 0, 1 trigger
    tokens, _, lp = emu_head_sample(emu, h, w, h_cls=h_cls, sw=sw, temperature=temps, seed=2,
                                    state=state, ess=ess, logprobs=True)
    assert tokens[:2].tolist() == [8, 7]                 # newline id only mid-response (row 1)
    logits = h.double() @ w.double().t()
    ref = torch.log_softmax(logits / torch.where(temps > 0, temps, 1.0).double()[:, None], -1)
    want = ref.gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", full_only(torch.float32, torch.bfloat16), **DTYPE_ID)
def test_non_finite_logits_and_scores_set_the_flag(emu, dtype):
    """What the Python wrapper raises on (tests/test_hostile_inputs.py): the kernel ORs bit 1
    into a row whose logits hold NaN/inf and bit 2 into a row that scores a NaN p_unsafe; finite
    inputs, and NaN in the [CLS] state of a row that does not evaluate, leave 0. Flagged rows'
    tokens stay in [0, V) (an all-NaN row has no candidate: token 0), and flags accumulate."""
    B, Dm, V = 6, 64, 600                                # 3 vocab tiles
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, Dm, generator=g).to(dtype)
    w = (torch.randn(V, Dm, generator=g) / math.sqrt(Dm)).to(dtype)
    h_cls = torch.randn(B, Dm, generator=g).to(dtype)
    sw = torch.randn(Dm, generator=g)
    ess = EssConfig(policy="low")                        # flags force no refusal token
    state = EssState.create([4] * B, [1] * B, [3] * B, [7, 8], ess)
    state.evaluating.copy_(torch.tensor([True, True, True, True, False, True]))
    temps = torch.tensor([0.0, 0.0, 0.8, 0.0, 0.0, 0.8])
    run = lambda h, h_cls, sw, flags, **kw: emu_head_sample(  # noqa: E731
        emu, h, w, h_cls=h_cls, sw=sw, temperature=temps, seed=1, state=state.clone(), ess=ess,
        nonfinite=flags, **kw)
    flags = torch.zeros(B, dtype=torch.int32)
    tokens, p = run(h, h_cls, sw, flags)
    assert flags.tolist() == [0] * B and not p[state.evaluating].isnan().any()
    assert_greedy(tokens[temps == 0], h[temps == 0], w)

    bad_h, bad_cls = h.clone(), h_cls.clone()
    bad_h[1] = NAN                                       # every logit NaN: no candidate
    bad_h[2, 5] = float("inf")                           # +-inf / NaN logits, a sampled row
    bad_cls[3, 0] = NAN                                  # NaN score of an evaluating row
    bad_cls[4] = NAN                                     # not evaluating: never read
    flags = torch.zeros(B, dtype=torch.int32)
    tokens, p, _ = run(bad_h, bad_cls, sw, flags, logprobs=True)
    assert flags.tolist() == [0, 1, 1, 2, 0, 0]
    assert bool(((tokens >= 0) & (tokens < V)).all()) and tokens[1] == 0
    assert p[3].isnan() and p[4].isnan() and not p[[0, 1, 2, 5]].isnan().any()
    keep = torch.tensor([True, False, False, True, True, True]) & (temps == 0)
    assert_greedy(tokens[keep], h[keep], w)              # unflagged logits: the argmax

    bad_sw = sw.clone()
    bad_sw[7] = NAN                                      # the safety head: every scoring row
    run(h, h_cls, bad_sw, flags)
    assert flags.tolist() == [2, 3, 3, 2, 0, 2]          # ORed into the earlier flags
    bad_w = w.clone()
    bad_w[450, 3] = NAN                                  # one LM-head row: every row
    flags.zero_()
    tokens, _ = emu_head_sample(emu, h, bad_w, nonfinite=flags)   # no safety head: no bit 2
    assert flags.tolist() == [1] * B and bool(((tokens >= 0) & (tokens < V)).all())
