"""Reference fused head + safety + sampling step (docs/DESIGN.md §5).

Order: safety score -> state/decision update -> forced token (refusal prefix) or
temperature -> top-k -> top-p -> min-p -> sample.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..spec import EssConfig, EssState, SamplingParams
from .controller import escalate, forced_tokens, update_state


class Logprobs(NamedTuple):
    """Per-row log-probabilities of one step (``SamplingParams.logprobs``), all on the device.

    ``log_softmax(logits / T)`` (T = 0: of the raw logits), before top-k/top-p/min-p filtering.

    Attributes:
        token: ``(B,) float32``, the logprob of the token emitted this step (a forced refusal
            token included).
        top_ids: ``(B, k) int64``, the ``k = sampling.logprobs`` most likely tokens, most
            likely first (``(B, 0)`` for k = 0).
        top: ``(B, k) float32``, their logprobs.
    """

    token: torch.Tensor
    top_ids: torch.Tensor
    top: torch.Tensor


def logprobs_ref(logits: torch.Tensor, tokens: torch.Tensor, temperature, k: int) -> Logprobs:
    """``Logprobs`` of ``tokens (B,)`` and the top ``k`` under ``log_softmax(logits / T)``
    (rows with T = 0 use the raw logits). Computes in float64 for float64 input, else fp32."""
    B, V = logits.shape
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    t = _row_param(temperature, B, logits.device, cd)
    lp = torch.log_softmax(logits.to(cd) / torch.where(t > 0, t, torch.ones_like(t))[:, None], -1)
    top = torch.topk(lp, min(k, V), dim=-1)
    return Logprobs(lp.gather(1, tokens[:, None]).squeeze(1).float(), top.indices,
                    top.values.float())


def _row_param(x, B: int, device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((B,), x, device=device, dtype=dtype)


def safety_score_ref(h_cls: torch.Tensor, safety_weight: torch.Tensor,
                     safety_bias=None) -> torch.Tensor:
    """``p_unsafe = sigmoid(w . h + b)`` for a ``(Dm,)`` head, or ``softmax(W h + b)[1]`` for a
    ``(2, Dm)`` two-class head (the same thing with ``w = W[1] - W[0]``). Returns ``(B,)`` fp32."""
    cd = torch.float64 if h_cls.dtype == torch.float64 else torch.float32
    h, w = h_cls.to(cd), safety_weight.to(cd)
    b = torch.zeros((), dtype=cd, device=h.device) if safety_bias is None else \
        torch.as_tensor(safety_bias, device=h.device).to(cd)
    if w.dim() == 2:
        w = w[1] - w[0]
        b = b[1] - b[0] if b.dim() == 1 else b
    return torch.sigmoid(h @ w + b).float()


def probe_score_ref(h_tok: torch.Tensor, probe_weight: torch.Tensor,
                    probe_bias) -> torch.Tensor:
    """The cascade's screening score ``sigmoid(h_tok . w + b)`` of the token rows (``(Dm,)``
    weight, scalar bias; docs/DESIGN.md §4): ``safety_score_ref``'s arithmetic on ``h_tok``.
    Returns ``(B,)`` fp32."""
    return safety_score_ref(h_tok, probe_weight, probe_bias)


def filter_logits_ref(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p; removed tokens get ``-inf``.

    Greedy rows (temperature 0) are returned unscaled and unfiltered. Computes in float64
    for float64 input, else float32.
    """
    B, V = logits.shape
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(cd)
    dev = x.device
    temp = _row_param(sampling.temperature, B, dev, cd)
    greedy = temp == 0
    x = x / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=cd, device=dev)

    top_k = _row_param(sampling.top_k, B, dev, torch.int64)
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        sorted_desc = torch.sort(x, dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (torch.clamp(top_k, 1, V) - 1)[:, None])
        x = torch.where(k_on[:, None] & (x < kth), neg_inf, x)

    top_p = _row_param(sampling.top_p, B, dev, cd)
    p_on = top_p < 1
    if bool(p_on.any()):
        probs = torch.softmax(x, dim=-1)
        sp, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sp, dim=-1) - sp
        keep_sorted = mass_before < top_p[:, None]
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        x = torch.where(p_on[:, None] & ~keep, neg_inf, x)

    min_p = _row_param(sampling.min_p, B, dev, cd)
    m_on = min_p > 0
    if bool(m_on.any()):
        probs = torch.softmax(x, dim=-1)
        pmax = probs.max(dim=-1, keepdim=True).values
        x = torch.where(m_on[:, None] & (probs < min_p[:, None] * pmax), neg_inf, x)

    return torch.where(greedy[:, None], logits.to(cd), x)


def make_generator(sampling: SamplingParams, generator: Optional[torch.Generator],
                   device) -> Optional[torch.Generator]:
    """The generator to draw from: the caller's, else one seeded from ``sampling.seed``."""
    if generator is not None:
        return generator
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def sample_ref(logits: torch.Tensor, sampling: SamplingParams,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Filter ``logits (B, V)`` and draw one token per row; greedy rows take the argmax."""
    B = logits.shape[0]
    x = filter_logits_ref(logits, sampling)
    greedy = _row_param(sampling.temperature, B, x.device, x.dtype) == 0
    argmax = x.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax
    probs = torch.softmax(x, dim=-1)
    probs = torch.where(greedy[:, None], torch.ones_like(probs), probs)
    drawn = torch.multinomial(probs, 1, generator=make_generator(sampling, generator,
                                                                 x.device)).squeeze(1)
    return torch.where(greedy, argmax, drawn)


def _raise_non_finite(what: str, bad_rows: torch.Tensor, source: str) -> None:
    """Raise if any row is flagged: a NaN score or logit has no verdict and no token."""
    if bool(bad_rows.any()):
        rows = bad_rows.nonzero().flatten().tolist()
        raise ValueError(f"head_sample: non-finite {what} in rows {rows[:8]}: {source} holds "
                         "NaN/inf (e.g. a weight changed in place through .data, which the "
                         "once-per-version weight check cannot see)")


def head_sample_ref(
    h_tok: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    h_cls: Optional[torch.Tensor] = None,
    safety_weight: Optional[torch.Tensor] = None,
    safety_bias=None,
    state: Optional[EssState] = None,
    ess: Optional[EssConfig] = None,
    sampling: SamplingParams = SamplingParams(),
    generator: Optional[torch.Generator] = None,
    probe_weight: Optional[torch.Tensor] = None,
    probe_bias=None,
    probe_threshold: Optional[float] = None,
    probe_out: Optional[torch.Tensor] = None,
):
    """The decode step's tail, defined in plain PyTorch. Inputs are assumed valid.

    Args:
        h_tok: ``(B, Dm)`` last hidden states of the token rows.
        lm_head_weight: ``(V, Dm)``.
        h_cls: ``(B, Dm)`` [CLS] hidden states; read only for rows in ``state.evaluating``
            (every row when ``state`` is None).
        safety_weight / safety_bias: the safety head, ``(Dm,)`` + scalar or ``(2, Dm)`` + ``(2,)``.
        state / ess: the batched ESS state (updated in place) and its config.
        probe_weight / probe_bias / probe_threshold: the cascade's token-row screening probe
            (``(Dm,)`` + scalar, docs/DESIGN.md §4): its score ``probe_score_ref(h_tok)`` goes
            to ``escalate`` after ``update_state``; ``probe_out`` ``(B,)`` float32 receives it.
    Returns:
        ``next_tokens (B,) int64`` and ``p_unsafe (B,) float32`` (NaN where not evaluated);
        with ``sampling.logprobs`` not None, a third element: the step's ``Logprobs``.
    Raises ``ValueError`` when a logit is NaN/inf or an evaluating row's score is NaN: a
    token drawn from NaN logits (argmax would say 0) or a NaN verdict (it would read benign)
    is never returned.
    """
    B = h_tok.shape[0]
    dev = h_tok.device
    p_unsafe = torch.full((B,), float("nan"), dtype=torch.float32, device=dev)
    if h_cls is not None:
        scores = safety_score_ref(h_cls, safety_weight, safety_bias)
        p_unsafe = scores if state is None else torch.where(state.evaluating, scores, p_unsafe)
        read = torch.ones_like(scores, dtype=torch.bool) if state is None else state.evaluating
        _raise_non_finite("p_unsafe", torch.isnan(scores) & read,
                          "h_cls or the safety head (safety_weight, safety_bias)")
    cd = torch.float64 if h_tok.dtype == torch.float64 else torch.float32
    logits = h_tok.to(cd) @ lm_head_weight.to(cd).t()
    _raise_non_finite("logits", ~torch.isfinite(logits).all(1), "h_tok or lm_head_weight")
    forced = None
    if state is not None:
        update_state(state, ess, p_unsafe)
        if probe_weight is not None:
            q = probe_score_ref(h_tok, probe_weight, probe_bias)
            escalate(state, ess, q, probe_threshold)
            if probe_out is not None:
                probe_out.copy_(q)
        forced, forced_tok = forced_tokens(state, ess)
    tokens = sample_ref(logits, sampling, generator)
    if forced is not None:
        tokens = torch.where(forced, forced_tok, tokens)
    if sampling.logprobs is None:
        return tokens, p_unsafe
    return tokens, p_unsafe, logprobs_ref(logits, tokens, sampling.temperature,
                                          sampling.logprobs)
