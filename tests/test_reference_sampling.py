"""Reference head + safety + sampling: statistics, supports, seeds, forced tokens."""
import math

import pytest
import torch

from safekern import EssConfig, EssState, SamplingParams, head_sample
from safekern.reference import filter_logits_ref, head_sample_ref, safety_score_ref, sample_ref

N = 20000


def freq(tokens, V):
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


def assert_frequencies(tokens, probs):
    f = freq(tokens, probs.numel())
    tol = 5 * torch.sqrt(probs * (1 - probs) / tokens.numel()) + 1e-3
    assert ((f - probs).abs() <= tol).all(), (f, probs)
    assert (f[probs == 0] == 0).all()


def draws(logits_row, sp, n=N, seed=0):
    logits = logits_row[None].expand(n, -1).contiguous()
    return sample_ref(logits, sp, torch.Generator().manual_seed(seed))


def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5], dtype=torch.float64)
    for T in (0.7, 1.0, 2.0):
        assert_frequencies(draws(logits, SamplingParams(temperature=T)),
                           torch.softmax(logits / T, -1))


def test_top_k_top_p_min_p_supports_and_frequencies():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(111, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    # top-k
    t = draws(logits, SamplingParams(temperature=1.0, top_k=7))
    keep = torch.zeros(111, dtype=torch.bool)
    keep[order[:7]] = True
    assert_frequencies(t, torch.where(keep, probs, 0) / probs[keep].sum())
    # top-p: smallest prefix whose mass reaches p
    p = 0.6
    cum = probs[order].cumsum(0)
    n_keep = int((cum - probs[order] < p).sum())
    keep = torch.zeros(111, dtype=torch.bool)
    keep[order[:n_keep]] = True
    t = draws(logits, SamplingParams(temperature=1.0, top_p=p))
    assert_frequencies(t, torch.where(keep, probs, 0) / probs[keep].sum())
    # min-p relative to the max
    keep = probs >= 0.2 * probs.max()
    t = draws(logits, SamplingParams(temperature=1.0, min_p=0.2))
    assert_frequencies(t, torch.where(keep, probs, 0) / probs[keep].sum())


def test_filters_compose_in_order():
    logits = torch.tensor([[3.0, 2.9, 2.0, 1.0, 0.0]], dtype=torch.float64)
    sp = SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.3)
    x = filter_logits_ref(logits, sp)
    p = torch.softmax(logits / 0.5, -1)[0, :4]
    p = p / p.sum()                                   # after top-k
    assert torch.isfinite(x[0, :2]).all() and torch.isneginf(x[0, 3:]).all()
    assert (p[2] / p[0] < 0.3) == bool(torch.isneginf(x[0, 2]))  # min-p decides token 2


def test_greedy_and_per_row_parameters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    sp = SamplingParams(temperature=torch.tensor([0.0, 1.0, 0.0, 1.0]),
                        top_k=torch.tensor([0, 1, 0, 1]))
    out = sample_ref(logits, sp, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, logits.argmax(-1))   # top_k=1 is greedy too
    assert SamplingParams().is_greedy and not sp.is_greedy


def test_seed_reproducibility():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2))
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    a, b = sample_ref(logits, sp), sample_ref(logits, sp)
    c = sample_ref(logits, SamplingParams(temperature=1.0, top_p=0.95, seed=124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_safety_head_forms_agree():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 32, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(2, 32, generator=g, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    p2 = safety_score_ref(h, w2, b2)
    p1 = safety_score_ref(h, w2[1] - w2[0], float(b2[1] - b2[0]))
    want = torch.softmax(h @ w2.t() + b2, -1)[:, 1].float()
    torch.testing.assert_close(p2, want)
    torch.testing.assert_close(p1, want)


def test_head_sample_ref_decides_before_sampling():
    g = torch.Generator().manual_seed(7)
    B, Dm, V = 3, 16, 111
    h_tok, W = torch.randn(B, Dm, generator=g), torch.randn(V, Dm, generator=g)
    h_cls, w = torch.randn(B, Dm, generator=g), torch.randn(Dm, generator=g)
    ess = EssConfig(tau=2)
    state = EssState.create([4, 4, 4], [1, 1, 1], [3, 3, 3], [7, 8], ess)
    state.evaluating.copy_(torch.tensor([True, True, False]))
    p_logit = h_cls @ w
    bias = -float(p_logit[1])                             # row 1: p = 0.5 exactly -> flag
    tok, p = head_sample_ref(h_tok, W, h_cls=h_cls, safety_weight=w, safety_bias=bias,
                             state=state, ess=ess)
    want_p = torch.sigmoid(p_logit + bias)
    assert math.isnan(p[2]) and torch.allclose(p[:2], want_p[:2])
    greedy = (h_tok @ W.t()).argmax(-1)
    triggered = want_p[:2] >= 0.5
    assert bool(triggered[1])
    for r in range(2):
        assert int(tok[r]) == (7 if triggered[r] else int(greedy[r]))
    assert int(tok[2]) == int(greedy[2])
    # the public op with the torch backend is the reference
    state2 = EssState.create([4, 4, 4], [1, 1, 1], [3, 3, 3], [7, 8], ess)
    state2.evaluating.copy_(torch.tensor([True, True, False]))
    tok2, p2 = head_sample(h_tok, W, h_cls=h_cls, safety_weight=w, safety_bias=bias,
                           state=state2, ess=ess, backend="torch")
    assert torch.equal(tok, tok2) and torch.equal(state.mode, state2.mode)


@pytest.mark.parametrize("V", [111, 32000])
def test_head_sample_top_k_support_large_vocab(V):
    g = torch.Generator().manual_seed(V)
    h, W = torch.randn(8, 32, generator=g), torch.randn(V, 32, generator=g)
    logits = h @ W.t()
    sp = SamplingParams(temperature=1.3, top_k=5, seed=9)
    tok, p = head_sample(h, W, sampling=sp, backend="torch")
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == tok[:, None]).any(-1).all() and torch.isnan(p).all()
