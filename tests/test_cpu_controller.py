"""The fused CPU controller (``safekern.ops.cpu.controller``) against the reference controller
(``safekern.reference.controller``, the oracle): after every step of long random traces, every
state field, the windows, the forced mask and the forced tokens are identical, for every
schedule x policy, verdicts at and around the threshold (and NaN), prefilled responses,
``refusal_skip``, annealing growth that overflows int32; plus input validation."""
import zlib

import pytest
import torch

from safekern.ops.cpu import controller as cpu_controller
from safekern.reference.controller import escalate, forced_tokens, plan_step, update_state
from safekern.reference.sampling import probe_score_ref
from safekern.spec import BENIGN, POLICIES, REFUSING, SCHEDULES, SUSPECT, EssConfig, EssState

pytestmark = pytest.mark.skipif(cpu_controller.unavailable_reason() is not None,
                                reason=f"cpu_controller: {cpu_controller.unavailable_reason()}")

REFUSAL = [7, 11, 13, 17]
FIELDS = ("prompt_len", "query_start", "query_end", "seq_len", "mode", "flags", "switch_step",
          "next_eval", "interval", "forced_idx", "trigger_step", "evaluating", "finished")


def configs():
    for schedule in SCHEDULES:
        for policy in POLICIES:
            for first_at in (0, 2):
                yield EssConfig(schedule=schedule, policy=policy, period=3, anneal_start=1,
                                anneal_growth=1.7, anneal_stop=25, first_at=first_at,
                                threshold=0.3 if policy == "low" else 0.5,
                                tau=2 if schedule == "each" else 3, r1=4, r2=3, r3=2)
    # floor(2930 * 2.3) is 6738 in float64 but 6739 in float32: the interval grows in float64
    yield EssConfig(schedule="annealing", anneal_start=2930, anneal_growth=2.3,
                    anneal_stop=10000)
    # interval * growth beyond int32: clamped to NEVER // 4 before the cast
    yield EssConfig(schedule="annealing", anneal_start=3, anneal_growth=1e6, anneal_stop=10**9)
    yield EssConfig(schedule="each", threshold=0.1, tau=1)   # 0.1 is not a float32
    # the cascade with annealing's points as its safety net
    yield EssConfig(schedule="cascade", cascade_net=True, anneal_growth=1.7, anneal_stop=25,
                    tau=2)


PROBE_THRESHOLD = 0.6   # not a float32: the compare is in float32 on both sides


@pytest.mark.parametrize("ess", list(configs()),
                         ids=lambda e: f"{e.label}-{e.policy}-{e.first_at}-{e.threshold}")
def test_state_trace_matches_reference(ess):
    steps, B = 40, 16
    g = torch.Generator().manual_seed(zlib.crc32(repr(ess).encode()))
    P = torch.randint(3, 9, (B,), generator=g)
    prefilled = torch.randint(0, 3, (B,), generator=g) * (torch.arange(B) % 3 == 0)
    fused = EssState.create(P, torch.ones(B, dtype=torch.long), P - 1, REFUSAL, ess,
                            refusal_skip=1)
    ref = fused.clone()
    thr = torch.tensor(ess.threshold, dtype=torch.float32)
    seen, escalated = set(), False
    for step in range(steps):
        for s in (fused, ref):
            s.seq_len.copy_((P + prefilled + step).int())
        w_ref = plan_step(ref, ess)
        w, n_ev = cpu_controller.plan(fused, ess)
        assert torch.equal(w, w_ref) and w.dtype == w_ref.dtype, step
        assert n_ev == int(ref.evaluating.sum())
        assert torch.equal(cpu_controller.plan_step(fused.clone(), ess), w_ref)
        assert torch.equal(fused.evaluating, ref.evaluating), step
        # verdicts: around the threshold, exactly at its float32 value, one float32 ulp below;
        # NaN on rows that do not evaluate (never read)
        scores = (thr - 0.25 + torch.rand(B, generator=g) * 0.45).clamp(0, 1)
        scores[0] = thr
        scores[1] = torch.nextafter(thr, torch.tensor(0.0))
        scores = torch.where(ref.evaluating | (torch.arange(B) % 4 != 3), scores,
                             torch.full_like(scores, float("nan")))
        drawn = torch.randint(0, 50, (B,), generator=g)
        # head_sample_ref's controller part
        p_ref = torch.where(ref.evaluating, scores, torch.full_like(scores, float("nan")))
        update_state(ref, ess, p_ref)
        f_ref, tok_ref = forced_tokens(ref, ess)
        tok_ref = torch.where(f_ref, tok_ref, drawn)
        tok, p, f = cpu_controller.update(fused, ess, scores, drawn)
        assert torch.equal(f, f_ref) and torch.equal(tok, tok_ref), step
        assert torch.equal(p.isnan(), p_ref.isnan())
        assert torch.equal(p[~p.isnan()], p_ref[~p_ref.isnan()])
        for name in FIELDS:
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (step, name)
        # the cascade's screening step (a no-op for other schedules): random token rows, one
        # row's score exactly at the threshold's float32 value
        gp = torch.Generator().manual_seed(1000 + step)     # g's stream stays as it was
        h_tok, pw = torch.randn(B, 6, generator=gp), torch.randn(6, generator=gp)
        pb = torch.tensor(0.2)
        q_ref = probe_score_ref(h_tok, pw, pb)
        if ess.schedule == "cascade":
            h_tok[2] = 0.0
            pb = torch.logit(torch.tensor(PROBE_THRESHOLD, dtype=torch.float32).double()).float()
            q_ref = probe_score_ref(h_tok, pw, pb)
        next_before = ref.next_eval.clone()
        escalate(ref, ess, q_ref, PROBE_THRESHOLD)
        q = cpu_controller.escalate(fused, ess, h_tok, pw, pb, PROBE_THRESHOLD)
        assert torch.equal(q, q_ref), step
        for name in FIELDS:
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (step, name)
        if ess.schedule == "cascade":
            escalated |= bool((ref.next_eval < next_before).any())
        seen.update(ref.mode.tolist())
    if ess.schedule != "first" and ess.anneal_start < steps and ess.threshold == 0.5:
        assert {BENIGN, SUSPECT, REFUSING} <= seen, seen   # every transition path exercised
    assert escalated or ess.schedule != "cascade"       # the probe moved an evaluation


def test_nan_verdict_raises_like_the_reference_and_changes_nothing():
    ess = EssConfig(schedule="each")
    st = EssState.create([4, 4, 4], [1, 1, 1], [3, 3, 3], REFUSAL, ess)
    st.evaluating.copy_(torch.tensor([True, True, False]))
    before = st.clone()
    scores = torch.tensor([0.1, float("nan"), float("nan")])
    with pytest.raises(ValueError, match=r"non-finite p_unsafe in rows \[1\].*safety head"):
        cpu_controller.update(st, ess, scores, torch.zeros(3, dtype=torch.long))
    for name in FIELDS:
        assert torch.equal(getattr(st, name), getattr(before, name)), name
    # the reference raises the same error for the same inputs
    from safekern.reference.sampling import head_sample_ref

    h, W = torch.randn(3, 4), torch.randn(5, 4)
    sw = torch.zeros(4)
    sw[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite p_unsafe in rows \[0, 1\].*safety head"):
        head_sample_ref(h, W, h_cls=h, safety_weight=sw, state=before, ess=ess)


def test_validation_names_the_argument():
    ess = EssConfig()
    st = EssState.create([4], [1], [3], REFUSAL, ess)
    with pytest.raises(TypeError, match="state must be an EssState"):
        cpu_controller.plan_step(object(), ess)
    d = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="ess must be an EssConfig"):
        cpu_controller.update(st, {}, torch.zeros(1), d)
    with pytest.raises(TypeError, match="scores must be a tensor"):
        cpu_controller.update(st, ess, [0.0], d)
    with pytest.raises(TypeError, match="drawn must be a tensor"):
        cpu_controller.update(st, ess, torch.zeros(1), [0])
    with pytest.raises(RuntimeError, match="scores must be a contiguous"):
        cpu_controller.update(st, ess, torch.zeros(1, dtype=torch.float64), d)
    with pytest.raises(RuntimeError, match="scores must be a contiguous"):
        cpu_controller.update(st, ess, torch.zeros(2), d)
    with pytest.raises(RuntimeError, match="drawn must be a contiguous"):
        cpu_controller.update(st, ess, torch.zeros(1), d.int())
    bad = st.clone()
    bad.flags = bad.flags.long()
    with pytest.raises(RuntimeError, match="state.flags must be a contiguous"):
        cpu_controller.plan_step(bad, ess)
    bad = st.clone()
    bad.evaluating = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="state.evaluating must be"):
        cpu_controller.update(bad, ess, torch.zeros(1), d)


# ---------------------------------------------------------------- the engine with it
transformers = pytest.importorskip("transformers")


def _tiny_model(bias):
    import safekern
    from safekern.safety.probe import SafetyProbe, set_probe
    from safekern.models.tiny import build_tokenizer, tiny_llama_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_llama_config(len(tok), "llama")).eval()
    safekern.attach(model, tok)
    with torch.no_grad():
        model.safety_head.weight.mul_(40.0)        # scores spread over (0, 1): flags happen
        model.safety_head.bias.fill_(bias)
    # a screening probe whose scores spread over (0, 1) too: the cascade escalates sometimes
    hidden = model.get_input_embeddings().weight.shape[1]
    probe = SafetyProbe(hidden, threshold=0.5)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 3)
    set_probe(model, probe)
    return model, tok


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_engine_fused_controller_matches_reference(schedule, policy):
    """Streams, traces, finish reasons and the final state equal the reference controller's,
    with a head whose verdicts flip (flags, SUSPECT, triggers, refusals)."""
    from safekern.runtime.engine import Engine

    model, tok = _tiny_model(bias=0.0)
    prompts = ["How do I bake bread at home?", "hi", "Tell me a story about a fox.", "ok then"]
    # One linear path for both ("auto" measures per engine, so two engines may round apart)
    fused = Engine(model, tok, ignore_eos=True, cpu_linear="kernel")
    ref = Engine(model, tok, ignore_eos=True, cpu_linear="kernel", cpu_controller=False)
    assert fused.cpu_controller_reason is None
    assert ref.cpu_controller_reason == "disabled by the caller"
    ess = EssConfig(schedule=schedule, policy=policy, period=2, anneal_growth=1.5, tau=2)
    a = fused.generate(prompts, max_new_tokens=16, safety=ess, prefill=["", "Sure", "", "x"])
    b = ref.generate(prompts, max_new_tokens=16, safety=ess, prefill=["", "Sure", "", "x"])
    assert not ref._fused_ctl and fused._fused_ctl
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        assert x.trace == y.trace
    for f in FIELDS:
        assert torch.equal(getattr(fused.state, f), getattr(ref.state, f)), f
    flagged = sum(p >= ess.threshold for r in b for p in r.trace.p_unsafe)
    benign = sum(p < ess.threshold for r in b for p in r.trace.p_unsafe)
    assert flagged and benign                            # both verdicts happened
    if schedule == "cascade":                            # escalations after the first verdict
        assert any(len(r.trace.eval_steps) > 1 for r in b)


def test_engine_fused_controller_off_for_logprobs_and_validated():
    from safekern import SamplingParams
    from safekern.runtime.engine import Engine

    model, tok = _tiny_model(bias=-8.0)
    e = Engine(model, tok, ignore_eos=True)
    e.generate(["hi"], max_new_tokens=3, sampling=SamplingParams(logprobs=2))
    assert not e._fused_ctl                              # logprobs: the reference path
    e.generate(["hi"], max_new_tokens=3)
    assert e._fused_ctl
    with pytest.raises(TypeError, match="cpu_controller must be a bool"):
        Engine(model, tok, cpu_controller="yes")


def test_cls_layout_matches_the_engine_reference():
    from safekern.runtime.engine import Engine

    g = torch.Generator().manual_seed(3)
    for B in (1, 3, 8):
        t_prev = torch.randint(4, 200, (B,), generator=g).int()
        ev = torch.rand(B, generator=g) < 0.5
        for cls_last in (False, True):
            got = cpu_controller.cls_layout(t_prev, ev, cls_last, 257)
            want = Engine._cls_layout_ref(t_prev, ev, cls_last, 257)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="t_prev must be"):
        cpu_controller.cls_layout(t_prev.long(), ev, True, 9)
    with pytest.raises(RuntimeError, match="evaluating must be"):
        cpu_controller.cls_layout(t_prev, ev.int(), True, 9)
    with pytest.raises(ValueError, match="spare_slot must be"):
        cpu_controller.cls_layout(t_prev, ev, True, -1)
    with pytest.raises(TypeError, match="t_prev must be a tensor"):
        cpu_controller.cls_layout([1], ev, True, 1)


def test_record_matches_the_engine_reference():
    from safekern.runtime.engine import Engine

    g = torch.Generator().manual_seed(5)
    B, T = 5, 7
    st = EssState.create([4] * B, [1] * B, [3] * B, REFUSAL, EssConfig())
    bufs = [torch.full((B, T), float("nan")), torch.zeros(B, T, dtype=torch.bool),
            torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, dtype=torch.bool)]
    ref = [b.clone() for b in bufs]
    for c in range(T):
        st.evaluating.copy_(torch.rand(B, generator=g) < 0.5)
        st.finished.copy_(torch.rand(B, generator=g) < 0.3)
        st.seq_len.copy_(torch.randint(4, 99, (B,), generator=g).int())
        p = torch.rand(B, generator=g)
        emit = torch.rand(B, generator=g) < 0.7
        col = torch.tensor([c])
        cpu_controller.record(st, p, emit, col, *bufs)
        Engine._record_ref(st, p, emit, col, *ref)
        for a, b in zip(bufs, ref):
            assert torch.equal(a.isnan() if a.is_floating_point() else a,
                               b.isnan() if b.is_floating_point() else b)
        assert torch.equal(bufs[0].nan_to_num(-1), ref[0].nan_to_num(-1))
    with pytest.raises(RuntimeError, match="col 7 is outside"):
        cpu_controller.record(st, p, emit, torch.tensor([T]), *bufs)
    with pytest.raises(RuntimeError, match="emit must be"):
        cpu_controller.record(st, p, emit.int(), col, *bufs)
    with pytest.raises(RuntimeError, match="out_t must be"):
        cpu_controller.record(st, p, emit, col, bufs[0], bufs[1], bufs[2].long(), bufs[3])
    with pytest.raises(TypeError, match="state must be an EssState"):
        cpu_controller.record(None, p, emit, col, *bufs)


def _bufs(B, T):
    return [torch.full((B, T), float("nan")), torch.zeros(B, T, dtype=torch.bool),
            torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, dtype=torch.bool)]


@pytest.mark.parametrize("ess", [EssConfig(schedule=s, policy=p, period=2, tau=2, r1=4, r2=3,
                                           r3=2, threshold=0.45)
                                 for s in SCHEDULES for p in POLICIES],
                         ids=lambda e: f"{e.label}-{e.policy}")
def test_step_begin_and_end_match_the_engine_references(ess):
    """The engine's two per-step controller calls against their reference sequences
    (``Engine._step_begin_ref`` / ``_step_end_ref``) over a random trace: windows, counts,
    layouts, flat cache rows, tokens, bit-equal p_unsafe, every state field, the trace."""
    from safekern.runtime.engine import Engine

    g = torch.Generator().manual_seed(zlib.crc32(repr(ess).encode()))
    B, T, H, spare = 6, 24, 16, 301
    P = torch.randint(3, 9, (B,), generator=g)
    fused = EssState.create(P, torch.ones(B, dtype=torch.long), P - 1, REFUSAL, ess,
                            refusal_skip=1)
    ref = fused.clone()
    lengths = (P + torch.randint(0, 3, (B,), generator=g)).int()
    row_base = torch.arange(B) * (spare + 1)
    w, b = torch.randn(H, generator=g), torch.tensor(0.1)
    pw, pb = torch.randn(H, generator=g) * 4, torch.tensor(-0.2)
    bufs, ref_bufs = _bufs(B, T), _bufs(B, T)
    seen_skip = seen_both = seen_finished = False
    for step in range(T):
        col = torch.tensor([step])
        cls_last, skip = step % 3 == 1, step % 2 == 0
        got = cpu_controller.step_begin(fused, ess, lengths, col, row_base, cls_last, spare,
                                        skip)
        want = Engine._step_begin_ref(ref, ess, lengths, col, row_base, cls_last, spare, skip)
        assert got[1] == int(ref.evaluating.sum())
        assert want[1] is None if not skip else got[1] == want[1]
        for x, y in zip(got[:1] + got[2:], want[:1] + want[2:]):
            assert x.dtype == y.dtype and torch.equal(x, y), step
        seen_skip |= got[2].shape[1] == 1
        seen_both |= got[2].shape[1] == 2 and bool(ref.evaluating.any())
        for name in FIELDS:
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (step, name)
        # (B, 2, H) hidden states: the [CLS] row is a strided view, as in the engine
        h = torch.randn(B, 2, H, generator=g) * 0.3
        drawn = torch.randint(0, 50, (B,), generator=g)
        emit = torch.rand(B, generator=g) < 0.85
        done = torch.rand(B, generator=g) < 0.2
        done_r = done.clone()
        # the fused call reads the [CLS] row of (B, 2, H) itself; the reference gets h[:, 1]
        # the cascade's probe reads the token rows h[:, 0] (a strided view, as in the engine)
        probe = (h[:, 0], pw, pb, 0.55) if ess.schedule == "cascade" else None
        tok, p = cpu_controller.step_end(fused, ess, h, w, b, drawn, emit, col, *bufs, done,
                                         probe=probe)
        tok_r, p_r = Engine._step_end_ref(ref, ess, h[:, 1], w, b, drawn, emit, col, *ref_bufs,
                                          done_r, probe=probe)
        assert torch.equal(tok, tok_r) and torch.equal(p.nan_to_num(-1), p_r.nan_to_num(-1))
        assert torch.equal(done, done_r)
        seen_finished |= bool(ref.finished.any())
        for name in FIELDS:
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (step, name)
        for x, y in zip(bufs, ref_bufs):
            assert torch.equal(x.nan_to_num(-1) if x.is_floating_point() else x,
                               y.nan_to_num(-1) if y.is_floating_point() else y)
    assert seen_both and (seen_skip or ess.schedule == "each")
    assert seen_finished or ess.policy != "high"


def test_step_begin_and_end_validate_and_fail_closed():
    ess = EssConfig(schedule="each")
    B = 3
    st = EssState.create([4] * B, [1] * B, [3] * B, REFUSAL, ess)
    lengths, col, base = torch.full((B,), 5, dtype=torch.int32), torch.tensor([2]), \
        torch.arange(B) * 40
    begin = cpu_controller.step_begin
    with pytest.raises(RuntimeError, match="lengths must be"):
        begin(st, ess, lengths.long(), col, base, False, 39, True)
    with pytest.raises(RuntimeError, match="row_base must be"):
        begin(st, ess, lengths, col, base.int(), False, 39, True)
    with pytest.raises(RuntimeError, match="step_idx must be"):
        begin(st, ess, lengths, col.int(), base, False, 39, True)
    with pytest.raises(ValueError, match="spare_slot must be"):
        begin(st, ess, lengths, col, base, False, -1, True)
    with pytest.raises(TypeError, match="row_base must be a tensor"):
        begin(st, ess, lengths, col, [0, 40, 80], False, 39, True)
    with pytest.raises(TypeError, match="ess must be an EssConfig"):
        begin(st, None, lengths, col, base, False, 39, True)
    begin(st, ess, lengths, col, base, False, 39, True)
    assert st.seq_len.tolist() == [7] * B and bool(st.evaluating.all())
    # a NaN verdict raises the reference's error; the state and the trace stay as they were
    h, w, b = torch.randn(B, 8), torch.randn(8), torch.tensor(0.0)
    h[1, 3] = float("nan")
    bufs = _bufs(B, 4)
    before, before_bufs = st.clone(), [x.clone() for x in bufs]
    drawn, emit = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool)
    done = torch.zeros(B, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"non-finite p_unsafe in rows \[1\]"):
        cpu_controller.step_end(st, ess, h, w, b, drawn, emit, col, *bufs, done)
    for name in FIELDS:
        assert torch.equal(getattr(st, name), getattr(before, name)), name
    for x, y in zip(bufs, before_bufs):
        assert torch.equal(x.nan_to_num(-1) if x.is_floating_point() else x,
                           y.nan_to_num(-1) if y.is_floating_point() else y)
    assert not done.any()
    h[1, 3] = 0.0
    with pytest.raises(RuntimeError, match="h_cls must be"):
        cpu_controller.step_end(st, ess, h[:2], w, b, drawn, emit, col, *bufs, done)
    with pytest.raises(RuntimeError, match="safety head must be"):
        cpu_controller.step_end(st, ess, h, w[:4], b, drawn, emit, col, *bufs, done)
    with pytest.raises(RuntimeError, match="safety head must be"):
        cpu_controller.step_end(st, ess, h, w, b.double(), drawn, emit, col, *bufs, done)
    with pytest.raises(RuntimeError, match="emit must be"):
        cpu_controller.step_end(st, ess, h, w, b, drawn, emit.int(), col, *bufs, done)
    with pytest.raises(RuntimeError, match="drawn must be"):
        cpu_controller.step_end(st, ess, h, w, b, drawn.int(), emit, col, *bufs, done)
    with pytest.raises(RuntimeError, match="done must be"):
        cpu_controller.step_end(st, ess, h, w, b, drawn, emit, col, *bufs, done.int())
    with pytest.raises(TypeError, match="h_cls must be a tensor"):
        cpu_controller.step_end(st, ess, None, w, b, drawn, emit, col, *bufs, done)
    tok, p = cpu_controller.step_end(st, ess, h, w, b, drawn, emit, col, *bufs, done)
    assert torch.equal(p, torch.sigmoid(h @ w + b)) and bufs[1][:, 2].all()
    # the cascade's probe: required, a 4-tuple of tensors + threshold, shapes checked in C++
    cas = EssConfig(schedule="cascade")
    with pytest.raises(ValueError, match="cascade' needs probe"):
        cpu_controller.step_end(st, cas, h, w, b, drawn, emit, col, *bufs, done)
    with pytest.raises(TypeError, match="probe must be a tuple"):
        cpu_controller.step_end(st, cas, h, w, b, drawn, emit, col, *bufs, done, probe=(h, w))
    with pytest.raises(TypeError, match="probe weight must be a tensor"):
        cpu_controller.step_end(st, cas, h, w, b, drawn, emit, col, *bufs, done,
                                probe=(h, None, b, 0.5))
    with pytest.raises(RuntimeError, match="probe must be a"):
        cpu_controller.step_end(st, cas, h, w, b, drawn, emit, col, *bufs, done,
                                probe=(h, w[:4], b, 0.5))
    with pytest.raises(RuntimeError, match="h_tok must be"):
        cpu_controller.escalate(st, cas, h[:2], w, b, 0.5)
    with pytest.raises(TypeError, match="threshold must be a float"):
        cpu_controller.escalate(st, cas, h, w, b, "0.5")
    with pytest.raises(ValueError, match="cascade' needs probe"):
        cpu_controller.Bound(st, cas)


def test_decode_rows_matches_the_engine_reference():
    from safekern.runtime.engine import Engine

    g = torch.Generator().manual_seed(9)
    for B in (1, 4, 7):
        lengths = torch.randint(3, 90, (B,), generator=g).int()
        base = torch.arange(B) * 130
        for step in (1, 5, 37):
            col = torch.tensor([step])
            got = cpu_controller.decode_rows(lengths, col, base)
            want = Engine._decode_rows_ref(lengths, col, base)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="lengths must be"):
        cpu_controller.decode_rows(lengths.long(), col, base)
    with pytest.raises(RuntimeError, match="row_base must be"):
        cpu_controller.decode_rows(lengths, col, base[:2])
    with pytest.raises(RuntimeError, match="step_idx must be"):
        cpu_controller.decode_rows(lengths, col.int(), base)
    with pytest.raises(TypeError, match="step_idx must be a tensor"):
        cpu_controller.decode_rows(lengths, 3, base)
