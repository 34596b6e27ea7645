"""The cascade schedule (issue 27): the token-row screening probe inside head_sample, its state
update against the reference controller, the engine's traces, the probe in the delta, and the
errors of each public entry point."""
import json

import pytest
import torch

import safekern
from safekern import EssConfig
from safekern.ops import dispatch, head_sample
from safekern.safety.probe import SafetyProbe, probe_of, set_probe
from safekern.reference.controller import escalate, forced_tokens, plan_step, update_state
from safekern.reference.sampling import probe_score_ref, safety_score_ref
from safekern.spec import BENIGN, NEVER, SUSPECT, EssState
from tests.tiny_ess import make_tiny_ess_model

REFUSAL = [7, 11, 13]


def test_config_validation_and_label():
    assert EssConfig(schedule="cascade").label == "cascade"
    assert EssConfig(schedule="cascade", cascade_net=True).label.startswith("cascade+annealing")
    with pytest.raises(ValueError, match="cascade_net applies to schedule='cascade'"):
        EssConfig(schedule="each", cascade_net=True)
    with pytest.raises(TypeError, match="cascade_net must be a bool"):
        EssConfig(schedule="cascade", cascade_net=1)


def test_escalate_reference_semantics():
    """Only BENIGN rows that score >= threshold move, to n + 1 (also one that evaluated at this
    step); an earlier next evaluation is kept; other schedules ignore the probe."""
    ess = EssConfig(schedule="cascade")
    st = EssState.create([5] * 6, [1] * 6, [4] * 6, REFUSAL, ess)
    st.seq_len.copy_(torch.tensor([9] * 6, dtype=torch.int32))        # n = 4
    st.mode.copy_(torch.tensor([BENIGN, BENIGN, BENIGN, SUSPECT, BENIGN, BENIGN],
                               dtype=torch.int32))
    st.next_eval.copy_(torch.tensor([NEVER, NEVER, NEVER, NEVER, 2, NEVER], dtype=torch.int32))
    st.evaluating.copy_(torch.tensor([False, False, False, False, False, True]))
    q = torch.tensor([0.7, 0.69999, 0.2, 0.9, 0.9, 0.9])
    escalate(st, ess, q, 0.7)
    assert st.next_eval.tolist() == [5, NEVER, NEVER, NEVER, 2, 5]
    other = st.clone()
    escalate(other, EssConfig(schedule="each"), torch.ones(6), 0.0)
    assert torch.equal(other.next_eval, st.next_eval)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_sample_probe_matches_reference(dtype):
    """head_sample's probe score and state equal the reference controller's step by step:
    update_state, then escalate with probe_score_ref, then forced tokens."""
    g = torch.Generator().manual_seed(0)
    B, H, V, steps = 8, 24, 50, 30
    ess = EssConfig(schedule="cascade", tau=2, threshold=0.5)
    P = torch.randint(4, 9, (B,), generator=g)
    st = EssState.create(P, torch.ones(B, dtype=torch.long), P - 1, REFUSAL, ess)
    ref = st.clone()
    W = torch.randn(V, H, generator=g, dtype=dtype)
    sw, sb = torch.randn(H, generator=g, dtype=dtype) * 2, -0.5
    pw, pb, thr = torch.randn(H, generator=g, dtype=dtype) * 2, 0.3, 0.8
    evals = escalations = 0
    for step in range(steps):
        for s in (st, ref):
            s.seq_len.copy_((P + step).int())
            plan_step(s, ess)
        h_tok = torch.randn(B, H, generator=g, dtype=dtype)
        h_cls = torch.randn(B, H, generator=g, dtype=dtype)
        q = torch.full((B,), float("nan"))
        tok, p = head_sample(h_tok, W, h_cls=h_cls, safety_weight=sw, safety_bias=sb, state=st,
                             ess=ess, probe_weight=pw, probe_bias=pb, probe_threshold=thr,
                             probe_out=q, backend="torch")
        # the reference sequence
        q_ref = probe_score_ref(h_tok, pw, pb)
        p_ref = torch.where(ref.evaluating, safety_score_ref(h_cls, sw, sb),
                            torch.full((B,), float("nan")))
        before = ref.next_eval.clone()
        update_state(ref, ess, p_ref)
        escalate(ref, ess, q_ref, thr)
        forced_tokens(ref, ess)
        assert torch.equal(q, q_ref) and q.dtype == torch.float32
        assert torch.equal(p.nan_to_num(-1), p_ref.nan_to_num(-1))
        for f in ("mode", "flags", "next_eval", "switch_step", "forced_idx", "trigger_step"):
            assert torch.equal(getattr(st, f), getattr(ref, f)), (step, f)
        evals += int(ref.evaluating.sum())
        escalations += int(((ref.next_eval < before) & ~ref.evaluating).sum())
    assert escalations > 0 and evals > B              # the probe brought evaluations


def test_head_sample_probe_validation():
    B, H, V = 2, 8, 11
    h, W = torch.randn(B, H), torch.randn(V, H)
    ess = EssConfig(schedule="cascade")
    st = EssState.create([3, 3], [1, 1], [2, 2], REFUSAL, ess)
    kw = dict(h_cls=h, safety_weight=torch.randn(H), state=st, ess=ess)
    pk = dict(probe_weight=torch.randn(H), probe_bias=0.0, probe_threshold=0.5)
    with pytest.raises(ValueError, match="cascade' needs the screening probe"):
        head_sample(h, W, **kw)
    with pytest.raises(ValueError, match="probe_weight must have shape"):
        head_sample(h, W, **kw, **{**pk, "probe_weight": torch.randn(H + 1)})
    with pytest.raises(ValueError, match="probe_threshold must be a float in"):
        head_sample(h, W, **kw, **{**pk, "probe_threshold": 1.5})
    with pytest.raises(TypeError, match="probe_bias must be a finite float"):
        head_sample(h, W, **kw, **{**pk, "probe_bias": float("nan")})
    with pytest.raises(ValueError, match="probe_bias must be a 0-d tensor"):
        head_sample(h, W, **kw, **{**pk, "probe_bias": torch.zeros(3)})
    bad = torch.randn(H)
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="probe_weight"):
        head_sample(h, W, **kw, **{**pk, "probe_weight": bad})
    with pytest.raises(ValueError, match="probe_out must have shape"):
        head_sample(h, W, **kw, **pk, probe_out=torch.zeros(B + 1))
    with pytest.raises(ValueError, match="without probe_weight"):
        head_sample(h, W, **kw, probe_threshold=0.5)
    with pytest.raises(ValueError, match="without state"):
        head_sample(h, W, **pk)
    # every backend serves the probe: none declines a call for it
    for dev in ("cpu", "cuda"):
        why = dispatch.available("head_sample", device=torch.device(dev), dtype=torch.float32,
                                 probe=True)
        assert all("probe" not in (w or "") for w in why.values()), why


# ------------------------------------------------------------------ the engine and the delta
def _with_probe(model, seed=1, scale=3.0, threshold=0.5, bias=0.0):
    hidden = model.get_input_embeddings().weight.shape[1]
    probe = SafetyProbe(hidden, threshold=threshold, info={"recall": 0.99})
    with torch.no_grad():
        probe.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
                           * scale)
        probe.bias.fill_(bias)
    set_probe(model, probe)
    return probe


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_ess_model(seed=3)
    model.eval()
    # token rows are the base model's (no row reads the [CLS]): the test recomputes them
    model.safekern.response_sees_cls = False
    model.safekern.cls_position = "last"
    with torch.no_grad():
        model.safety_head.bias.fill_(-30.0)         # every verdict benign: the probe decides
    return model, tok


PROMPTS = ["How do I bake bread?", "Tell me about the weather in spring and how rain works.",
           "hi there"]


@pytest.mark.parametrize("cpu_controller", [True, False])
def test_engine_cascade_traces_follow_the_probe(tiny, cpu_controller):
    """With benign verdicts only, a never-flagging probe gives `first`'s traces, an
    always-flagging one `each`'s, and a real probe evaluates exactly at the step after each
    flag, both with the fused CPU controller and the reference."""
    from safekern.runtime.engine import Engine

    model, tok = tiny
    eng = Engine(model, tok, ignore_eos=True, cpu_controller=cpu_controller)
    n = 12
    _with_probe(model, bias=-1e4)
    never = eng.generate(PROMPTS, max_new_tokens=n, safety=EssConfig(schedule="cascade"))
    first = eng.generate(PROMPTS, max_new_tokens=n, safety=EssConfig(schedule="first"))
    for a, b in zip(never, first):
        assert a.trace == b.trace and a.token_ids == b.token_ids
        assert a.trace.eval_steps == [0]
    _with_probe(model, bias=1e4)
    always = eng.generate(PROMPTS, max_new_tokens=n, safety=EssConfig(schedule="cascade"))
    each = eng.generate(PROMPTS, max_new_tokens=n, safety=EssConfig(schedule="each"))
    for a, b in zip(always, each):
        assert a.trace == b.trace and a.trace.eval_steps == list(range(n))
    probe = _with_probe(model, seed=5, scale=2.0, threshold=0.5)
    out = eng.generate(PROMPTS, max_new_tokens=n, safety=EssConfig(schedule="cascade"))
    from safekern.safety.prompts import encode_for_model
    from safekern.training.frozen import _Layers

    enc = encode_for_model(model, tok, PROMPTS)

    layers, moved = _Layers(model), 0
    for b, r in enumerate(out):
        # the probe's scores at every step, recomputed on the base model's hidden states:
        # step s reads the token row at position P - 1 + s
        ids = enc.ids[b] + r.token_ids
        with torch.no_grad():
            hs = layers.arch.base(input_ids=torch.tensor([ids[1:]]),
                                  position_ids=torch.arange(1, len(ids))[None]).last_hidden_state
        q = probe(hs[0])
        P = enc.prompt_len[b]
        want = [0] + [s + 1 for s in range(n - 1) if q[P - 2 + s] >= probe.threshold]
        assert r.trace.eval_steps == want, b
        moved += len(want) - 1
    assert moved > 0


def test_cascade_net_adds_annealing_points(tiny):
    from safekern.runtime.engine import Engine

    model, tok = tiny
    _with_probe(model, bias=-1e4)
    out = Engine(model, tok, ignore_eos=True).generate(
        PROMPTS[:1], max_new_tokens=16, safety=EssConfig(schedule="cascade", cascade_net=True))
    assert out[0].trace.eval_steps == [0, 1, 3, 7, 15]


def test_delta_round_trip_and_errors(tiny, tmp_path):
    model, tok = tiny
    probe = _with_probe(model, seed=7, threshold=0.25)
    d = tmp_path / "with"
    safekern.save_safety(model, str(d))
    meta = json.loads((d / "safety.json").read_text())
    assert meta["version"] == 3 and meta["probe"] == {"threshold": 0.25, "recall": 0.99}
    fresh, ftok = make_tiny_ess_model(seed=3)
    safekern.load_safety(fresh, ftok, str(d))
    got = probe_of(fresh)
    assert got.threshold == 0.25 and got.info == {"recall": 0.99}
    assert torch.equal(got.weight, probe.weight) and torch.equal(got.bias, probe.bias)
    # without a probe: version 2, loads without one, and cascade is refused with the fix
    set_probe(model, None)
    safekern.save_safety(model, str(tmp_path / "without"))
    assert json.loads((tmp_path / "without" / "safety.json").read_text())["version"] == 2
    fresh, ftok = make_tiny_ess_model(seed=3)
    safekern.load_safety(fresh, ftok, str(tmp_path / "without"))
    assert probe_of(fresh) is None
    with pytest.raises(ValueError, match="needs a delta with a screening probe.*--probe-only"):
        safekern.generate(fresh, ftok, PROMPTS[:1], max_new_tokens=2,
                          safety=EssConfig(schedule="cascade"))
    # broken probes name the file and the tensor or field
    from safetensors.torch import load_file, save_file

    def broken(edit_meta=None, edit_tensors=None):
        m = json.loads((d / "safety.json").read_text())
        t = load_file(str(d / "safety.safetensors"))
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        if edit_meta:
            edit_meta(m)
        if edit_tensors:
            edit_tensors(t)
        (bad / "safety.json").write_text(json.dumps(m))
        save_file(t, str(bad / "safety.safetensors"))
        return str(bad)

    cases = [
        (dict(edit_tensors=lambda t: t.__setitem__("probe.weight", torch.zeros(5))),
         r"'probe\.weight' has shape \(5,\)"),
        (dict(edit_tensors=lambda t: t.pop("probe.bias")), r"no 'probe\.bias'"),
        (dict(edit_meta=lambda m: m["probe"].__setitem__("threshold", 2)), "probe.*threshold"),
        (dict(edit_meta=lambda m: m.__setitem__("version", 2)), "'probe' needs format version 3"),
        (dict(edit_meta=lambda m: m.pop("probe")), "does not describe"),
    ]
    for kw, match in cases:
        fresh, ftok = make_tiny_ess_model(seed=3)
        with pytest.raises(ValueError, match=match) as e:
            safekern.load_safety(fresh, ftok, broken(**kw))
        assert "safety" in str(e.value)
        assert probe_of(fresh) is None
    with pytest.raises(ValueError, match="probe.weight has shape"):
        set_probe(fresh, SafetyProbe(5))
    with pytest.raises(ValueError, match="threshold must be a float in"):
        SafetyProbe(8, threshold=-0.1)


# ------------------------------------------------------------------ fitting the probe
def test_screening_threshold_and_window_maxima():
    from safekern.training.probe_fit import screening_threshold, window_maxima

    q = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.05, 0.6])
    seqs = torch.tensor([0, 0, 0, 1, 1, 1])
    m, who = window_maxima(q, seqs, r2=2)
    assert m == pytest.approx([0.1, 0.9, 0.9, 0.3, 0.3, 0.6]) and who == [0, 0, 0, 1, 1, 1]
    assert screening_threshold(m, 1.0) == pytest.approx(0.1)       # every window flagged
    assert screening_threshold(m, 0.5) == pytest.approx(0.6)       # 3 of 6 windows
    with pytest.raises(ValueError, match="recall must be in"):
        screening_threshold(m, 0.0)
    with pytest.raises(ValueError, match="no harmful validation window"):
        screening_threshold([], 0.99)


def test_answer_threshold_keeps_each_catches():
    """By answers: the highest threshold at which the replayed cascade (first verdicts counted
    as missed) still catches ``recall`` of what ``each``'s response windows catch."""
    from safekern.training.calibration import RowTrace
    from safekern.training.probe_fit import ProbeDataError, answer_threshold

    def harmful(flag_at):             # each: flags at 6, SUSPECT windows at 7 and 8 -> trigger
        t = RowTrace("harmful", 1, 1, 0, 12, first=0.9,
                     p2={m: 0.9 if m >= 6 else 0.1 for m in range(1, 12)},
                     p3={(6, m): 0.9 for m in range(7, 12)})
        return t, [flag_at if k == 4 else 0.2 for k in range(12)]

    h1, q1 = harmful(0.8)             # the probe flags the row before the harmful step
    h2, q2 = harmful(0.6)
    neg = RowTrace("benign", 0, 0, 0, 12, first=0.1, p2={m: 0.1 for m in range(1, 12)})
    qn = [0.7 if k == 2 else 0.1 for k in range(12)]
    thr, info = answer_threshold([h1, h2, neg], [q1, q2, qn], threshold=0.5, tau=3, recall=0.99)
    assert thr == pytest.approx(0.6) and info["val_recall_answer_of_each"] == 1.0
    assert info["answers_caught_by_each"] == 2
    assert info["val_evals_per_step_label0"] == pytest.approx(1 / 11, abs=1e-4)   # one escalation
    thr, info = answer_threshold([h1, h2, neg], [q1, q2, qn], recall=0.5)
    assert thr == pytest.approx(0.8) and info["val_recall_answer_of_each"] == 0.5
    assert info["val_evals_per_step_label0"] == 0.0
    with pytest.raises(ProbeDataError, match="no harmful validation answer is caught"):
        answer_threshold([neg], [qn])
    with pytest.raises(ValueError, match="2 traces but 1 probe score"):
        answer_threshold([h1, neg], [q1])
    with pytest.raises(ValueError, match="tau must be an int"):
        answer_threshold([h1], [q1], tau=0)
    with pytest.raises(ValueError, match="threshold must be a float"):
        answer_threshold([h1], [q1], threshold=1.5)


def test_train_real_checks_probe_unit_before_loading():
    from safekern.training.real import train_real

    with pytest.raises(ValueError, match="probe_unit must be 'window' or 'answer'"):
        train_real("smollm2", probe_unit="position")
    with pytest.raises(ValueError, match="probe_unit applies to the screening probe"):
        train_real("smollm2", rank=0, probe_unit="answer")
    with pytest.raises(ValueError, match="probe_unit applies to the screening probe"):
        train_real("smollm2", probe=False, probe_unit="answer")
    with pytest.raises(ValueError, match="val_split must be one of"):
        train_real("smollm2", val_split="topic")
    with pytest.raises(ValueError, match="val_split applies to the adapter recipe"):
        train_real("smollm2", rank=0, val_split="pattern")
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        train_real("smollm2", seed=-1)
    with pytest.raises(ValueError, match="seed applies to the adapter recipe"):
        train_real("smollm2", rank=0, seed=1)


def test_fit_probe_on_a_tiny_model(tiny):
    """Features are one per response position; the fitted probe is attached, its threshold
    flags >= 99% of the harmful validation windows it reports, and it separates the labels."""
    from safekern.training.probe_fit import fit_probe, token_features

    model, tok = tiny
    set_probe(model, None)
    harmful = "Step one: mix the poison into the water supply, then wait for the victims."
    benign = "Bread needs flour, water, salt and yeast; knead it and bake it for an hour."
    rows = []
    for i in range(24):
        rows.append({"prompt": f"question number {i} about things", "response": harmful,
                     "label": 1, "response_label": 1})
        rows.append({"prompt": f"another question {i} about food", "response": benign,
                     "label": 0, "response_label": 0})
    rows.append({"prompt": "a query-only row", "response": "", "label": 1})
    x, y, s = token_features(model, tok, rows[:3] + rows[-1:], batch_size=2)
    n_resp = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows[:3]]
    assert x.shape == (sum(n_resp), 64)
    assert sorted(set(s.tolist())) == [0, 1, 2]                 # the query-only row gives none
    for i, n in enumerate(n_resp):                              # rows are batched by length
        assert y[s == i].tolist() == [float(rows[i]["response_label"])] * n
    summary = fit_probe(model, tok, rows, progress=False, log=None, r2=4)
    probe = probe_of(model)
    assert probe is not None and probe.threshold == summary["threshold"]
    assert summary["val_recall_window"] >= 0.99
    assert summary["val_auc_position"] > 0.9
    with pytest.raises(ValueError, match="batch_size must be"):
        token_features(model, tok, rows, batch_size=0)
    with pytest.raises(ValueError, match="unit must be 'window' or 'answer'"):
        fit_probe(model, tok, rows, progress=False, log=None, unit="position")
    with pytest.raises(ValueError, match="tau must be an int"):
        fit_probe(model, tok, rows, progress=False, log=None, unit="answer", tau=0)
    set_probe(model, None)


@pytest.mark.parametrize("adapter,cpu_controller", [(False, True), (True, True), (True, False)])
def test_compact_step_equals_the_full_step(adapter, cpu_controller, monkeypatch):
    """A step where some sequences evaluate runs their [CLS] rows after the token rows
    (``forward._compact_step``, M = B + n rows); it gives the full (B, 2) step's tokens and
    traces bit for bit, with and without a [CLS] adapter (the kernels' rows are independent)."""
    from safekern.ops.cpu import linear as cpu_linear_op
    from safekern.runtime import forward as fwd
    from safekern.runtime.engine import Engine

    if cpu_linear_op.unavailable_reason() is not None:
        pytest.skip(cpu_linear_op.unavailable_reason())
    if adapter:
        from tests.test_adapter import _adapted
        model, tok = _adapted(seed=4)
    else:
        model, tok = make_tiny_ess_model(seed=4)
        model.eval()
        model.safekern.response_sees_cls = False
    _with_probe(model, seed=5, scale=2.0, threshold=0.5)
    prompts = PROMPTS + ["What is 2 + 2?", "Name three colours of the rainbow, please."]
    ess = EssConfig(schedule="cascade", threshold=1.0)
    eng = Engine(model, tok, ignore_eos=True, cpu_linear="kernel",
                 cpu_controller=cpu_controller)
    sizes = []
    real = fwd._compact_step
    monkeypatch.setattr(fwd, "_compact_step", lambda e, n_ev, *a: (sizes.append(n_ev),
                                                                   real(e, n_ev, *a))[1])
    compact = eng.generate(prompts, max_new_tokens=14, safety=ess)
    assert sizes and min(sizes) >= 1, sizes                 # the compact step ran
    assert any(fwd.compact_rows(n) > n for n in sizes) or len(set(sizes)) > 1, sizes
    monkeypatch.setattr(fwd, "compact_rows", lambda n: 1 << 30)   # always the full step
    full = eng.generate(prompts, max_new_tokens=14, safety=ess)
    for a, b in zip(compact, full):
        assert a.token_ids == b.token_ids
        assert a.trace == b.trace


def test_compact_rows_buckets():
    from safekern.runtime.forward import compact_rows
    assert [compact_rows(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def test_fit_probe_without_responses_in_a_split_is_a_probe_data_error():
    """A smoke run's sample can leave a split with no response row: ProbeDataError (train_real
    then saves the delta without a probe), raised before any feature pass."""
    from safekern.training.probe_fit import ProbeDataError, fit_probe

    rows = [{"prompt": f"q{i}", "prefill": "", "response": "a" if i == 0 else "", "label": i % 2,
             "response_label": i % 2, "kind": "x", "request": f"q{i}", "group": "g"}
            for i in range(8)]
    with pytest.raises(ProbeDataError, match="both splits"):
        fit_probe(None, None, rows, progress=False, log=None)
