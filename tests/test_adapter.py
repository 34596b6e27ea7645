"""The [CLS] adapter (safekern.safety.adapter): the recipe's [CLS] rows are the engine's evaluations
with the adapter on every path, token rows stay the base model's bit for bit, and the delta
format (version 2) round-trips and refuses what it cannot describe."""
import json
import warnings

import pytest
import torch

import safekern
from safekern import EssConfig, SamplingParams
from safekern.safety.adapter import AdaptedLinears, ClsAdapter
from safekern.ops.cpu import linear as cpu_linear_op
from safekern.runtime.engine import Engine
from safekern.safety.attach import add_adapter
from safekern.safety.prompts import encode_for_model
from safekern.training.frozen import Window, _Layers, gather_windows
from tests.tiny_ess import make_tiny_ess_model


def _adapted(seed=3, rank=4, targets=None):
    model, tok = make_tiny_ess_model(seed=seed)
    model.eval()
    model.safekern.response_sees_cls = False
    model.safekern.cls_position = "last"
    kw = {} if targets is None else {"targets": targets}
    adapter = add_adapter(model, rank=rank, alpha=2.0 * rank, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                       # a trained-looking adapter: B != 0
        for p in adapter.B:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapter.embedding.add_(torch.randn(adapter.embedding.shape, generator=g))
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return _adapted()


PROMPTS = ["How do I bake bread?", "Tell me about the weather in spring and how rain works."]
PREFILL = ["", "Sure, here is"]


def _recipe_p(model, tok, out, ess):
    """p_unsafe of every evaluation in ``out``'s traces, recomputed by the recipe's [CLS]
    forward (rules 1-2: the config never flags, so every sequence stays BENIGN)."""
    enc = encode_for_model(model, tok, PROMPTS, PREFILL)
    layers = _Layers(model)
    got = []
    for b, r in enumerate(out):
        ids = enc.ids[b] + r.token_ids
        P, (qs, qe) = enc.prompt_len[b], (enc.query_start[b], enc.query_end[b])
        kv = layers.sequence_kv(torch.tensor([ids[1:]]), torch.tensor([len(ids) - 1]))
        wins = []
        for n in r.trace.eval_lengths:
            t = P + n
            spans = ((qs, qe), (P, P + min(n, ess.r1))) if not wins else \
                ((max(P, t - ess.r2), t),)
            wins.append(Window(0, spans, 0, "x", t))
        kvw, nkeys = gather_windows(kv, wins, 0)
        h = layers.cls_rows(None, kvw, nkeys, rope_pos=torch.tensor([w.t - 1 for w in wins]),
                            adapter=model.safety_adapter)
        got.append(torch.sigmoid(model.safety_head(h)[:, 0]))
    return got


@pytest.mark.parametrize("cpu_linear,cpu_controller,cpp_adapter",
                         [(True, True, True), (False, False, True), ("kernel", True, True),
                          (True, True, False)])
def test_recipe_equals_engine_at_prefill_and_decode_windows(tiny, cpu_linear, cpu_controller,
                                                            cpp_adapter, monkeypatch):
    """cpp_adapter=False: the deltas through the torch path (the C++ op's reference)."""
    if not cpp_adapter:
        monkeypatch.setattr(AdaptedLinears, "_fast", lambda self, x: False)
    model, tok = tiny
    ess = EssConfig(threshold=1.0, schedule="each", r1=3, r2=4)
    eng = Engine(model, tok, backend="torch", cpu_linear=cpu_linear,
                 cpu_controller=cpu_controller)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = eng.generate(PROMPTS, max_new_tokens=9, safety=ess, prefill=PREFILL)
    want = _recipe_p(model, tok, out, ess)
    for r, p in zip(out, want):
        assert len(r.trace.eval_steps) == 9
        torch.testing.assert_close(torch.tensor(r.trace.p_unsafe), p, atol=2e-5, rtol=0)


@pytest.mark.skipif(cpu_linear_op.unavailable_reason() is not None,
                    reason=f"cpu extension: {cpu_linear_op.unavailable_reason()}")
@pytest.mark.parametrize("col,rank", [(0, 4), (1, 8), (1, 3), (1, 16), (0, 32), (1, 64)])
def test_cpp_adapter_op_equals_the_torch_path(col, rank):
    """safekern_cpu.adapter_add == the torch deltas on column ``col`` of every output; every
    other row of every output bitwise untouched; a strided (sliced) input reads right; each
    row's bits are those of the row alone (ranks 8/16/32/64 run rows in register blocks)."""
    g = torch.Generator().manual_seed(rank)
    B, L, K, Ns = 7, 2, 37, (19, 40, 5)
    x = torch.randn(B, L, K + 3, generator=g)[..., 1:K + 1]      # unit stride in K only
    ys = [torch.randn(B, L, n, generator=g) for n in Ns]
    As = [torch.randn(K, rank, generator=g) for _ in Ns]
    Bs = [torch.randn(rank, n, generator=g) for n in Ns]
    before = [y.clone() for y in ys]
    torch.ops.safekern_cpu.adapter_add(x, col, ys, As, Bs, 0.75)
    for y, y0, A, Bm in zip(ys, before, As, Bs):
        want = y0[:, col] + (x[:, col] @ A) @ Bm * 0.75
        # fp32 sums in another order than torch's matmul: the error grows with the rank
        tol = 1e-5 * max(1, rank // 16)
        torch.testing.assert_close(y[:, col], want, atol=tol, rtol=tol)
        others = [c for c in range(L) if c != col]
        assert torch.equal(y[:, others], y0[:, others])
    for b in range(B):                                   # one row at a time: the same bits
        alone = [y0[b:b + 1].clone() for y0 in before]
        torch.ops.safekern_cpu.adapter_add(x[b:b + 1], col, alone, As, Bs, 0.75)
        for y, y1 in zip(ys, alone):
            assert torch.equal(y[b:b + 1], y1)
    bad = [("col", dict(col=2)), ("As\\[0\\]", dict(As=[As[0][:-1]] + As[1:])),
           ("Bs\\[1\\]", dict(Bs=[Bs[0], Bs[1][:, :-1], Bs[2]])),
           ("x must be", dict(x=x.double()))]
    for match, kw in bad:
        args = dict(x=x, col=col, ys=ys, As=As, Bs=Bs)
        args.update(kw)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.safekern_cpu.adapter_add(args["x"], args["col"], args["ys"], args["As"],
                                               args["Bs"], 0.75)


def test_adapter_changes_the_verdict(tiny):
    """The parity test above must be able to fail: without the adapter the recipe and the
    engine would both compute the base [CLS] row — here they differ from it."""
    model, tok = tiny
    ess = EssConfig(threshold=1.0, schedule="each")
    on = safekern.generate(model, tok, PROMPTS, max_new_tokens=4, safety=ess, prefill=PREFILL)
    saved = model.safety_adapter
    model.safety_adapter = None
    try:
        off = safekern.generate(model, tok, PROMPTS, max_new_tokens=4, safety=ess,
                                prefill=PREFILL)
    finally:
        model.safety_adapter = saved
    diff = max(abs(a - b) for r1, r2 in zip(on, off)
               for a, b in zip(r1.trace.p_unsafe, r2.trace.p_unsafe))
    assert diff > 1e-3


@pytest.mark.parametrize("cpu_linear", [True, False])
def test_token_rows_bit_identical_with_the_adapter(tiny, cpu_linear):
    """Same rows in every step (safety on both ways), adapter on vs removed: the token rows'
    logprobs are bitwise equal, so benign answers are the base model's."""
    model, tok = tiny
    sp = SamplingParams(logprobs=3)                  # logprobs: the token rows' exact values
    ess = EssConfig(threshold=1.0, schedule="each")
    eng = Engine(model, tok, backend="torch", cpu_linear=cpu_linear)
    on = eng.generate(PROMPTS, max_new_tokens=10, sampling=sp, prefill=PREFILL, safety=ess)
    saved = model.safety_adapter
    model.safety_adapter = None
    try:
        off = eng.generate(PROMPTS, max_new_tokens=10, sampling=sp, prefill=PREFILL,
                           safety=ess)
    finally:
        model.safety_adapter = saved
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]
        assert a.trace.p_unsafe != b.trace.p_unsafe
    plain = eng.generate(PROMPTS, max_new_tokens=10, prefill=PREFILL, safety=None)
    fused = eng.generate(PROMPTS, max_new_tokens=10, prefill=PREFILL, safety=ess)
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]


def test_round_trip_and_operating_point(tiny, tmp_path):
    model, tok = tiny
    model.safekern.windows = (3, 4, 10)
    model.safekern.operating_point = EssConfig(r1=3, r2=4, schedule="annealing", policy="high",
                                                threshold=1.0)
    try:
        safekern.save_safety(model, str(tmp_path))
    finally:
        model.safekern.windows = model.safekern.operating_point = None
    meta = json.loads((tmp_path / "safety.json").read_text())
    assert meta["version"] == 2 and meta["adapter"]["rank"] == 4
    fresh, ftok = make_tiny_ess_model(seed=3)
    fresh.eval()
    safekern.load_safety(fresh, ftok, str(tmp_path))
    assert isinstance(fresh.safety_adapter, ClsAdapter)
    assert fresh.safekern.windows == (3, 4, 10)
    assert fresh.safekern.operating_point.schedule == "annealing"
    for (n1, a), (n2, b) in zip(model.safety_adapter.tensors().items(),
                                fresh.safety_adapter.tensors().items()):
        assert n1 == n2 and torch.equal(a, b)
    # No safety argument: the delta's operating point (here: annealing + high).
    out = safekern.generate(fresh, ftok, PROMPTS[:1], max_new_tokens=8)
    assert out[0].trace.eval_steps[:4] == [0, 1, 3, 7][:len(out[0].trace.eval_steps[:4])]
    ref = safekern.generate(fresh, ftok, PROMPTS[:1], max_new_tokens=8,
                            safety=fresh.safekern.operating_point)
    assert ref[0].token_ids == out[0].token_ids
    with pytest.warns(UserWarning, match="trained for windows"):
        safekern.generate(fresh, ftok, PROMPTS[:1], max_new_tokens=2, safety=EssConfig())


def test_version_1_delta_loads_as_rank_0(tmp_path):
    model, tok = make_tiny_ess_model(seed=3)
    model.safekern.response_sees_cls = False
    safekern.save_safety(model, str(tmp_path))
    meta = json.loads((tmp_path / "safety.json").read_text())
    for k in ("adapter", "windows", "operating_point"):
        meta.pop(k)
    meta["version"] = 1
    (tmp_path / "safety.json").write_text(json.dumps(meta))
    fresh, ftok = make_tiny_ess_model(seed=3)
    safekern.load_safety(fresh, ftok, str(tmp_path))
    assert getattr(fresh, "safety_adapter", None) is None
    assert fresh.safekern.operating_point is None


def _broken(tmp_path, model, *, meta=None, tensors=None):
    from safetensors.torch import load_file, save_file

    safekern.save_safety(model, str(tmp_path))
    m = json.loads((tmp_path / "safety.json").read_text())
    if meta:
        meta(m)
    (tmp_path / "safety.json").write_text(json.dumps(m))
    if tensors:
        t = load_file(str(tmp_path / "safety.safetensors"))
        tensors(t)
        save_file(t, str(tmp_path / "safety.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize("case,match", [
    ("shape", r"adapter\.1\.k_proj\.B.*shape"),
    ("unknown", "does not describe"),
    ("missing", r"no 'adapter\.0\.q_proj\.A'"),
    ("sees_cls", "response_sees_cls"),
    ("bias", "cls_bias_scale"),
    ("rank", "rank"),
    ("targets", "targets"),
    ("version", "version 2"),
    ("windows", "windows"),
    ("op", "operating_point"),
])
def test_load_errors_name_the_file_and_tensor(tiny, tmp_path, case, match):
    model, _ = tiny
    edits = {
        "shape": dict(tensors=lambda t: t.__setitem__("adapter.1.k_proj.B",
                                                      torch.zeros(4, 3))),
        "unknown": dict(tensors=lambda t: t.__setitem__("adapter.9.q_proj.A",
                                                        torch.zeros(64, 4))),
        "missing": dict(tensors=lambda t: t.pop("adapter.0.q_proj.A")),
        "sees_cls": dict(meta=lambda m: m.__setitem__("response_sees_cls", True)),
        "bias": dict(meta=lambda m: m.__setitem__(
            "operating_point", {"cls_bias_scale": 1.0})),
        "rank": dict(meta=lambda m: m["adapter"].__setitem__("rank", 0)),
        "targets": dict(meta=lambda m: m["adapter"].__setitem__("targets", ["lm_head"])),
        "version": dict(meta=lambda m: m.__setitem__("version", 1)),
        "windows": dict(meta=lambda m: m.__setitem__("windows", [10, 0, 10])),
        "op": dict(meta=lambda m: m.__setitem__("operating_point", {"tau": -1})),
    }
    path = _broken(tmp_path, model, **edits[case])
    fresh, ftok = make_tiny_ess_model(seed=3)
    with pytest.raises(ValueError, match=match) as e:
        safekern.load_safety(fresh, ftok, path)
    assert "safety" in str(e.value)                       # names the file
    assert getattr(fresh, "safety_adapter", None) is None  # nothing half-loaded


def test_adapter_refusals(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="cls_bias_scale"):
        safekern.generate(model, tok, PROMPTS[:1], max_new_tokens=2,
                          safety=EssConfig(cls_bias_scale=0.5))
    paper, ptok = make_tiny_ess_model(seed=4)           # response_sees_cls=True
    with pytest.raises(ValueError, match="response_sees_cls=False"):
        add_adapter(paper, rank=2)
    with pytest.raises(ValueError, match="rank"):
        ClsAdapter(model.model.layers, 0, 1.0)
    with pytest.raises(ValueError, match="targets"):
        ClsAdapter(model.model.layers, 2, 1.0, targets=("q_proj", "q_proj"))


def test_attn_implementation_integration_refuses_an_adapter(tiny):
    from safekern.integrations.hf import apply_safekern
    from safekern.training.trainer import EssForTraining

    model, _ = tiny
    with pytest.raises(ValueError, match="adapter"):
        apply_safekern(model)
    with pytest.raises(ValueError, match="adapter"):
        EssForTraining(model)
