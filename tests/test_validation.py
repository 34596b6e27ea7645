"""Every public function rejects bad input with an error that names the argument."""
import pytest
import torch

from safekern import EssConfig, EssState, SamplingParams, ess_attention, head_sample


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def qkv(B=2, L=5, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    return (torch.randn(B, L, Hq, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype),
            torch.randn(B, L, Hkv, D, dtype=dtype))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.randn(2, 5, 4)), ValueError, "q must be 4-D"),
    (dict(q=torch.randn(2, 5, 4, 8, dtype=torch.float16)), TypeError, "k must have dtype"),
    (dict(q=torch.randint(0, 3, (2, 5, 4, 8))), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 5, 2, 8, device="meta")), ValueError, "k is on meta"),
    (dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), ValueError, "multiple"),
    (dict(v=torch.randn(2, 6, 2, 8)), ValueError, "v must have shape"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(q_pos=i32([[0, 1, 2, 3, 4]])), ValueError, "q_pos must have shape"),
    (dict(q_pos=i32([[0, 1, 2, 3, -2]] * 2)), ValueError, "q_pos values"),
    (dict(q_pos=torch.zeros(2, 5)), TypeError, "q_pos must have dtype"),
    (dict(seqlens_k=i32([5, 6])), ValueError, "seqlens_k values"),
    (dict(response_start=i32([-1, 2])), ValueError, "response_start values"),
    (dict(cls_windows=i32([[[0, 2]], [[0, 2]]])), ValueError, "requires response_start"),
    (dict(response_start=i32([1, 1]), cls_windows=i32([[[0, 9]], [[0, 2]]])), ValueError,
     "cls_windows values"),
    (dict(response_start=i32([1, 1]), cls_windows=i32([[[-1, 2]], [[0, 2]]])), ValueError,
     "cls_windows values"),
    (dict(response_start=i32([1, 1]), cls_windows=i32([[0, 2], [0, 2]])), ValueError,
     "cls_windows must have shape"),
    (dict(key_bias=torch.zeros(2, 3, 5)), ValueError, "key_bias must have shape"),
    (dict(key_bias=torch.zeros(2, 1, 5, dtype=torch.float64)), TypeError, "key_bias"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
def test_ess_attention_errors(kwargs, exc, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        ess_attention(q, k, v, **args)


def test_unavailable_backend_raises_and_env_override(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ess_attention(q, k, v, backend="cuda")
    monkeypatch.setenv("SAFEKERN_BACKEND", "nope")
    with pytest.raises(ValueError, match="SAFEKERN_BACKEND"):
        ess_attention(q, k, v)


def test_head_sample_errors():
    h, W = torch.randn(2, 8), torch.randn(11, 8)
    ess = EssConfig()
    st = EssState.create([3, 3], [1, 1], [2, 2], [5], ess)
    cases = [
        (dict(h_tok=torch.randn(2, 8, 1)), ValueError, "h_tok must be 2-D"),
        (dict(lm_head_weight=torch.randn(11, 9)), ValueError, "lm_head_weight must have shape"),
        (dict(lm_head_weight=torch.randn(11, 8, dtype=torch.float64)), TypeError,
         "lm_head_weight must have dtype"),
        (dict(h_tok=torch.tensor([[float("nan")] * 8] * 2)), ValueError, "h_tok contains NaN"),
        (dict(lm_head_weight=torch.full((11, 8), float("inf"))), ValueError,
         "lm_head_weight contains NaN"),
        (dict(h_cls=torch.randn(2, 8)), ValueError, "safety_weight is required"),
        (dict(h_cls=torch.randn(2, 8), safety_weight=torch.randn(3, 8)), ValueError,
         "safety_weight must have shape"),
        (dict(state=st, ess=ess), ValueError, "h_cls is None"),
        (dict(state=st, h_cls=torch.randn(2, 8), safety_weight=torch.randn(8)), TypeError,
         "ess"),
        (dict(state=EssState.create([3], [1], [2], [5], ess), ess=ess, h_cls=torch.randn(2, 8),
              safety_weight=torch.randn(8)), ValueError, r"state.prompt_len must be a \(2,\)"),
        (dict(sampling=SamplingParams(temperature=torch.ones(3))), ValueError,
         "sampling.temperature"),
        (dict(sampling={"temperature": 1.0}), TypeError, "sampling must be"),
        (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for kwargs, exc, match in cases:
        args = dict(h_tok=h, lm_head_weight=W)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            head_sample(args.pop("h_tok"), args.pop("lm_head_weight"), **args)
    st.evaluating.fill_(True)
    bad_cls = torch.randn(2, 8)
    bad_cls[1, 0] = float("nan")
    with pytest.raises(ValueError, match="h_cls contains NaN"):
        head_sample(h, W, h_cls=bad_cls, safety_weight=torch.randn(8), state=st, ess=ess)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r1=0), "r1"), (dict(tau=1.5), "tau"), (dict(threshold=1.5), "threshold"),
    (dict(policy="strict"), "policy"), (dict(schedule="sometimes"), "schedule"),
    (dict(period=0), "period"), (dict(anneal_growth=0.5), "anneal_growth"),
    (dict(refusal_text=" "), "refusal_text"), (dict(first_at=-1), "first_at"),
    (dict(threshold=float("nan")), "threshold"),
])
def test_ess_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EssConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=2.0), "min_p"), (dict(seed=-3), "seed"),
    (dict(top_k=2.5), "top_k"), (dict(top_p=torch.tensor([0.5, float("nan")])), "top_p"),
    (dict(temperature=torch.ones(2, 2)), "temperature"),
])
def test_sampling_params_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamplingParams(**kwargs)


def test_ess_state_errors():
    ess = EssConfig()
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        EssState.create([0], [0], [0], [1], ess)
    with pytest.raises(ValueError, match="query span"):
        EssState.create([4], [3], [2], [1], ess)
    with pytest.raises(ValueError, match="refusal_ids"):
        EssState.create([4], [1], [2], [], ess)
    with pytest.raises(TypeError, match="ess must be"):
        EssState.create([4], [1], [2], [1], None)


def test_no_value_checks_skips_only_value_checks():
    from safekern._checks import no_value_checks, value_checks_enabled

    q, k, v = qkv()
    with no_value_checks():
        assert not value_checks_enabled()
        ess_attention(q, k, v, seqlens_k=i32([5, 4]))
        with pytest.raises(ValueError, match="q must be 4-D"):
            ess_attention(q[0], k, v)
    assert value_checks_enabled()
    with pytest.raises(ValueError, match="seqlens_k values"):
        ess_attention(q, k, v, seqlens_k=i32([5, 6]))
