"""The user's surface: prompt forms (strings, token ids, chats), logprobs, SamplingParams
spelled the transformers way, refusals on a new line, errors that name what the user called."""
import math

import pytest
import torch

import safekern
from safekern import EssConfig, EssState, SamplingParams, ess_attention, head_sample
from safekern.ops.cuda_backend import head_sample_can_run
from safekern.reference import forced_tokens, head_sample_ref, plan_step, update_state
from safekern.spec import REFUSING

transformers = pytest.importorskip("transformers")
from safekern.safety.prompts import as_prompt_list, encode_inputs, refusal_token_ids  # noqa: E402
from safekern.models.tiny import build_tokenizer, tiny_llama_config  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "triton" not in safekern.info()["backends"]["head_sample"], reason="triton not installed"))]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(
        len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1)).eval()
    safekern.attach(model, tok)
    return model, tok


# ---------------------------------------------------------------- SamplingParams
def test_none_means_off_like_transformers():
    sp = SamplingParams(temperature=0.7, top_k=None, top_p=None, min_p=None)
    assert (sp.top_k, sp.top_p, sp.min_p) == (0, 1.0, 0.0)
    assert sp == SamplingParams(temperature=0.7)
    assert SamplingParams().logprobs is None and SamplingParams(logprobs=0).logprobs == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_logprobs_must_be_a_non_negative_int(bad):
    with pytest.raises((TypeError, ValueError), match="logprobs"):
        SamplingParams(logprobs=bad)


# ---------------------------------------------------------------- logprobs of head_sample
def _want_logprobs(h, W, tokens, temperature):
    """log_softmax of the float64 reference logits after temperature (raw logits if T = 0)."""
    logits = h.double() @ W.double().t()
    B = h.shape[0]
    t = temperature if isinstance(temperature, torch.Tensor) else torch.full((B,), temperature)
    t = t.double()
    lp = torch.log_softmax(logits / torch.where(t > 0, t, torch.ones_like(t))[:, None], -1)
    return lp, lp.gather(1, tokens[:, None]).squeeze(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("sampling", [
    dict(), dict(temperature=0.7, seed=3),
    dict(temperature=torch.tensor([0.0, 0.5, 1.3, 2.0, 0.0]), top_k=5, top_p=0.9, seed=1),
], ids=["greedy", "temperature", "per-row+filters"])
def test_logprobs_are_log_softmax_after_temperature_before_filters(backend, k, sampling):
    g = torch.Generator().manual_seed(k)
    B, Dm, V = 5, 64, 111
    h, W = torch.randn(B, Dm, generator=g), torch.randn(V, Dm, generator=g) / 6
    sp = SamplingParams(logprobs=k, **sampling)
    tok, p, lp = head_sample(h, W, sampling=sp, backend=backend)
    assert torch.isnan(p).all()
    lp_all, want = _want_logprobs(h, W, tok, sp.temperature)
    torch.testing.assert_close(lp.token.double(), want, atol=2e-5, rtol=1e-5)
    assert lp.token.dtype == torch.float32 and lp.top_ids.shape == lp.top.shape == (B, k)
    if k:
        top = lp_all.topk(k, dim=-1)
        torch.testing.assert_close(lp.top.double(), top.values, atol=2e-5, rtol=1e-5)
        assert torch.equal(lp.top_ids, top.indices)          # the test data has no near-ties
    # Tokens unchanged by asking for logprobs (greedy rows exactly).
    greedy = (sp.temperature == 0) if isinstance(sp.temperature, torch.Tensor) else \
        torch.full((B,), sp.temperature == 0)
    tok_plain, _ = head_sample(h, W, sampling=SamplingParams(**sampling), backend=backend)
    assert torch.equal(tok[greedy], tok_plain[greedy])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_refusal_tokens_get_their_logprob_under_the_model(backend):
    g = torch.Generator().manual_seed(7)
    B, Dm, V = 4, 32, 97
    h, W = torch.randn(B, Dm, generator=g), torch.randn(V, Dm, generator=g) / 4
    h_cls, sw = torch.randn(B, Dm, generator=g), torch.zeros(Dm)
    ess = EssConfig(threshold=0.0)                           # every first evaluation triggers
    st = EssState.create([3] * B, [1] * B, [2] * B, [11, 12, 13], ess, refusal_skip=1)
    st.seq_len.copy_(torch.tensor([3, 4, 3, 5], dtype=torch.int32))
    plan_step(st, ess)
    sp = SamplingParams(temperature=0.9, seed=0, logprobs=2)
    tok, p, lp = head_sample(h, W, h_cls=h_cls, safety_weight=sw, state=st, ess=ess,
                             sampling=sp, backend=backend)
    assert tok.tolist() == [12, 11, 12, 11]                  # forced; newline only mid-response
    _, want = _want_logprobs(h, W, tok, 0.9)
    torch.testing.assert_close(lp.token.double(), want, atol=2e-5, rtol=1e-5)


def test_reference_logprobs_and_too_many_top_tokens():
    h, W = torch.randn(2, 8), torch.randn(10, 8)
    tok, _, lp = head_sample_ref(h, W, sampling=SamplingParams(logprobs=10))
    torch.testing.assert_close(lp.top.exp().sum(-1), torch.ones(2))   # the whole vocabulary
    with pytest.raises(ValueError, match="logprobs"):
        head_sample(h, W, sampling=SamplingParams(logprobs=11))


def test_cuda_backend_declines_top_k_logprobs_so_auto_falls_back():
    """logprobs=0 is computed by the CUDA kernels (tests/test_cuda_emulated.py); top-k is not."""
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, vocab=100)
    why = head_sample_can_run(**ctx, sampling=SamplingParams(logprobs=3))
    assert why is not None and "top-3 logprobs" in why
    why = head_sample_can_run(**ctx, sampling=SamplingParams(logprobs=0))
    assert why is None or "logprobs" not in why          # only "extension not built" here


# ---------------------------------------------------------------- refusal on a new line
def test_controller_starts_mid_response_refusals_at_the_newline():
    ess = EssConfig(threshold=0.5)
    st = EssState.create([5, 5], [1, 1], [4, 4], [9, 10, 11], ess, refusal_skip=1)
    st.seq_len.copy_(torch.tensor([5, 7], dtype=torch.int32))    # n = 0 | n = 2 (prefilled)
    plan_step(st, ess)
    update_state(st, ess, torch.tensor([0.9, 0.9]))
    assert st.mode.tolist() == [REFUSING] * 2 and st.forced_idx.tolist() == [1, 0]
    forced, tok = forced_tokens(st, ess)
    assert forced.all() and tok.tolist() == [10, 9]
    with pytest.raises(ValueError, match="refusal_skip"):
        EssState.create([5], [1], [4], [9], ess, refusal_skip=1)  # would skip every id


def test_refusal_token_ids_are_the_newline_variant(llama):
    _, tok = llama
    text = EssConfig().refusal_text
    ids, skip = refusal_token_ids(tok, text)
    assert tok.decode(ids) == "\n" + text and tok.decode(ids[skip:]) == text
    assert ids[skip:] == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_refusal_reads_as_a_new_line_mid_response(llama, backend):
    model, tok = llama
    text = "Sorry, no."                                      # short: the interpreter is slow
    kw = dict(max_new_tokens=16, backend=backend)
    ess = dict(threshold=0.0, policy="high", refusal_text=text)
    opening, prefilled = safekern.generate(model, tok, ["hi", "hi"], prefill=["", "Sure"],
                                           safety=EssConfig(**ess), **kw)
    assert opening.text == text and opening.finish_reason == "refusal"
    assert prefilled.text == "\n" + text
    late, = safekern.generate(model, tok, ["hi"], safety=EssConfig(first_at=3, **ess), **kw)
    assert late.trace.trigger_step == 3 and late.text.endswith("\n" + text)
    assert late.token_ids[3:] == refusal_token_ids(tok, text)[0]


# ---------------------------------------------------------------- prompt forms
def test_prompt_forms_normalise():
    assert as_prompt_list("hi") == ["hi"]
    assert as_prompt_list([1, 2, 3]) == [[1, 2, 3]]
    chat = [{"role": "user", "content": "hi"}]
    assert as_prompt_list(chat) == [chat] and as_prompt_list([chat, "x"]) == [chat, "x"]
    assert as_prompt_list({"prompt_token_ids": [4, 5]}) == [[4, 5]]
    assert as_prompt_list(["a", {"input_ids": torch.tensor([1, 2])}]) == ["a", [1, 2]]
    for bad, exc, match in ((3, TypeError, "prompts must be"), ([], ValueError, "at least one"),
                            (["a", 1.5], TypeError, r"prompts\[1\]"),
                            (["a", []], TypeError, r"prompts\[1\]")):
        with pytest.raises(exc, match=match):
            as_prompt_list(bad)


def test_ids_and_chats_lay_out_like_the_string_message(llama):
    model, tok = llama
    msg = "How do I bake bread?"
    chat = [{"role": "user", "content": msg}]
    ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    ref = encode_inputs(model, tok, [msg])
    for form in (ids, chat, {"prompt_token_ids": ids}, [model.safekern.cls_id] + ids):
        assert encode_inputs(model, tok, [form]) == ref, form
    # Earlier turns and a system message go before the query; the span is the last message.
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": msg}]
    enc = encode_inputs(model, tok, [convo])
    qs, qe = enc.query_start[0], enc.query_end[0]
    assert tok.decode(enc.ids[0][qs:qe]) == msg and qs > ref.query_start[0]
    assert enc.ids[0][0] == model.safekern.cls_id
    assert "hello" in tok.decode(enc.ids[0][:qs]) and "Hi!" in tok.decode(enc.ids[0][:qs])
    # Untemplated ids: the query is everything after BOS.
    raw = [tok.bos_token_id] + tok("plain text", add_special_tokens=False)["input_ids"]
    enc = encode_inputs(model, tok, [raw])
    assert enc.ids[0] == [model.safekern.cls_id] + raw
    assert (enc.query_start[0], enc.query_end[0], enc.prompt_len[0]) == (2, len(raw) + 1,
                                                                         len(raw) + 1)


def test_generate_takes_every_form_in_one_batch(llama):
    model, tok = llama
    msg = "What is 2 + 2?"
    chat = [{"role": "user", "content": msg}]
    ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    ess = EssConfig(threshold=1.0)
    one = safekern.generate(model, tok, msg, max_new_tokens=5, safety=ess)
    assert len(one) == 1
    mixed = safekern.generate(model, tok, [msg, ids, chat, "other"], max_new_tokens=5,
                              safety=ess, prefill=["a", "a", "a", "a"])
    ref = safekern.generate(model, tok, [msg], max_new_tokens=5, safety=ess, prefill=["a"])[0]
    for r in mixed[:3]:
        assert r.token_ids == ref.token_ids and r.trace.eval_steps == ref.trace.eval_steps
        torch.testing.assert_close(r.trace.p_unsafe, ref.trace.p_unsafe, atol=1e-6, rtol=0)
        assert r.prefill_ids == ref.prefill_ids
    plain = safekern.generate(model, tok, [ids, chat], max_new_tokens=5, safety=None)
    assert plain[0].token_ids == plain[1].token_ids


def test_prompt_form_errors_name_the_prompt(llama):
    model, tok = llama
    gen = lambda p, **kw: safekern.generate(model, tok, p, max_new_tokens=2, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token id"):
        gen([[1, 10**6]])
    with pytest.raises(ValueError, match=r"last message of prompts\[1\] must have role 'user'"):
        gen(["x", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    with pytest.raises(TypeError, match=r"prompts\[0\]\[0\]"):
        gen([[{"role": "user"}]])
    with pytest.raises(ValueError, match="prefill must hold 2"):
        gen(["a", [5, 6]], prefill=["x"])
    notemplate = build_tokenizer()
    notemplate.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_inputs(model, notemplate, [[{"role": "user", "content": "a"}]], safety=False)


def test_unknown_keyword_names_the_function_called(llama):
    model, tok = llama
    with pytest.raises(TypeError, match=r"safekern\.generate\(\) got an unexpected keyword "
                                        r"argument 'temprature'"):
        safekern.generate(model, tok, "hi", max_new_tokens=2, temprature=0.5)
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword"):
        safekern.Engine(model, tok).generate("hi", max_new_tokens=2, temprature=0.5)


def test_transformers_sampling_keywords_map_onto_sampling_params(llama):
    model, tok = llama

    def tokens(**kw):
        return [r.token_ids for r in safekern.generate(model, tok, ["hi", "a longer prompt"],
                                                       max_new_tokens=6, **kw)]

    assert tokens(temperature=5.0, top_k=50, seed=3) == tokens(
        sampling=SamplingParams(temperature=5.0, top_k=50, seed=3))
    assert tokens(temperature=5.0, seed=3) != tokens()         # not dropped: it samples
    assert tokens(do_sample=False) == tokens()                  # greedy
    assert tokens(do_sample=True, seed=3) == tokens(sampling=SamplingParams(temperature=1.0,
                                                                            seed=3))
    # keywords override the matching fields of sampling=
    assert tokens(sampling=SamplingParams(temperature=5.0, seed=3), do_sample=False) == tokens()
    with pytest.raises(ValueError, match="do_sample=False is greedy decoding, which "
                                         "temperature=0.7 would not change"):
        tokens(do_sample=False, temperature=0.7)
    with pytest.raises(ValueError, match="do_sample=True with temperature=0"):
        tokens(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        tokens(temperature=1.0, top_p=0.0)                      # SamplingParams still checks
    with pytest.raises(TypeError, match=r"sampling=SamplingParams\(\.\.\.\)"):
        tokens(num_beams=4)


def test_threads_apply_to_the_call_and_are_restored(llama):
    model, tok = llama
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        safekern.generate(model, tok, "hi", max_new_tokens=2, threads=1,
                          stream=lambda *a: seen.append(torch.get_num_threads()))
        assert seen == [1, 1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads must be an int >= 1 or None, got 0"):
            safekern.generate(model, tok, "hi", max_new_tokens=2, threads=0)
    finally:
        torch.set_num_threads(before)


def test_models_is_an_attribute_of_the_package():
    import subprocess
    import sys

    code = ("import sys, safekern; assert 'safekern.models' not in sys.modules; "
            "print(safekern.models.load.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "safekern.models"


# ---------------------------------------------------------------- logprobs through the engine
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_logprobs_match_the_model(llama, backend):
    """Without safety the engine's tokens are transformers' (test_engine); their logprobs must
    be log_softmax of transformers' logits after temperature, per generated token."""
    model, tok = llama
    prompts = ["hi", "How do I bake bread at home?"]
    for sp in (SamplingParams(logprobs=3), SamplingParams(temperature=0.8, top_k=20, seed=0,
                                                          logprobs=0)):
        res = safekern.generate(model, tok, prompts, max_new_tokens=6, safety=None,
                                sampling=sp, backend=backend, stop=None)
        t = sp.temperature or 1.0
        for prompt_ids, r in zip(encode_inputs(model, tok, prompts, safety=False).ids, res):
            assert len(r.logprobs) == len(r.token_ids)
            x = torch.tensor([prompt_ids + r.token_ids])
            with torch.no_grad():
                logits = model(x).logits[0, len(prompt_ids) - 1:-1].double()
            lp = torch.log_softmax(logits / t, -1)
            got = torch.tensor([e.logprob for e in r.logprobs], dtype=torch.float64)
            want = lp.gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for e, row in zip(r.logprobs, lp):
                assert len(e.top) == sp.logprobs
                if e.top:
                    assert [i for i, _ in e.top] == row.topk(sp.logprobs).indices.tolist()
                    assert math.isclose(e.top[0][1], row.max().item(), abs_tol=1e-4)
    assert safekern.generate(model, tok, "hi", max_new_tokens=2)[0].logprobs is None


# ---------------------------------------------------------------- attention layouts
def test_bhsd_mixed_with_bshd_is_named():
    B, S, Hq, Hkv, D = 2, 7, 4, 2, 16
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    for args, fix in (((q.transpose(1, 2), k, v), "q.transpose(1, 2)"),
                      ((q, k, v.transpose(1, 2)), "v.transpose(1, 2)"),
                      ((q, k.transpose(1, 2), v.transpose(1, 2)),
                       "k.transpose(1, 2), v.transpose(1, 2)")):
        with pytest.raises(ValueError, match=r"\(batch, seqlen, nheads, headdim\)") as e:
            ess_attention(*args)
        assert fix in str(e.value)
    with pytest.raises(ValueError, match="multiple") as e:   # not a layout mix: no hint
        ess_attention(q, torch.randn(B, S, 3, D), torch.randn(B, S, 3, D))
    assert "transpose" not in str(e.value)


# ---------------------------------------------------------------- varlen (flash-attn layout)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "triton" not in safekern.info()["backends"]["ess_attention"], reason="no triton"))])
@pytest.mark.parametrize("ess", [False, True])
def test_varlen_equals_one_call_per_sequence(backend, ess):
    from safekern import ess_attention_varlen

    g = torch.Generator().manual_seed(int(ess))
    Hq, Hkv, D = 4, 1, 64
    lens_k, lens_q = [9, 1, 14, 5], [9, 1, 2, 5]            # prefill, decode-like, chunk
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(),  # noqa: E731
                                 dtype=torch.int32)
    q = torch.randn(sum(lens_q), Hq, D, generator=g)
    k, v = torch.randn(2, sum(lens_k), Hkv, D, generator=g)
    kw = {}
    if ess:
        kw = dict(response_start=torch.tensor([4, 1, 6, 9], dtype=torch.int32),
                  cls_windows=torch.tensor([[[1, 3]], [[0, 0]], [[2, 12]], [[1, 5]]],
                                           dtype=torch.int32))
    o, lse = ess_attention_varlen(q, k, v, cu(lens_q), cu(lens_k), return_lse=True,
                                  backend=backend, **kw)
    assert o.shape == q.shape and lse.shape == (Hq, q.shape[0])
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for b in range(4):
        one = {n: t[b:b + 1] for n, t in kw.items()}
        o_b, lse_b = ess_attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]],
                                   v[None, ck[b]:ck[b + 1]], return_lse=True, backend="torch",
                                   **one)
        torch.testing.assert_close(o[cq[b]:cq[b + 1]], o_b[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, cq[b]:cq[b + 1]], lse_b[0], atol=2e-5, rtol=1e-4)


def test_varlen_errors_name_the_argument():
    from safekern import ess_attention_varlen

    q, k = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    ok = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ess_attention_varlen(q[None], k, k, ok, ok)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at"):
        ess_attention_varlen(q, k, k, ok, torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q differences"):
        ess_attention_varlen(q, k, k, torch.tensor([0, 3, 2, 5], dtype=torch.int32),
                             torch.tensor([0, 1, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="len_k - len_q"):
        ess_attention_varlen(q, k, k, ok, torch.tensor([0, 1, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_k"):
        ess_attention_varlen(q, k, k, ok, ok, 3, 2)


# ---------------------------------------------------------------- the README's example
def test_readme_strategic_decoding_example_is_deterministic_and_shows_the_refusal(
        tmp_path, monkeypatch, capsys):
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "safekern.generate(" in b and "torch.manual_seed" in b)
    monkeypatch.chdir(tmp_path)                          # it saves the delta to ess_delta/
    outputs = []
    for _ in range(2):
        exec(compile(block, "README.md", "exec"), {})
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert repr("\n" + EssConfig().refusal_text)[1:-1] in outputs[0]   # the whole prefix
