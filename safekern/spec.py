"""The ESS semantics as data: configuration of strategic decoding and of sampling.

Defaults follow Li & Kim (ICML 2025): windows r1 = r2 = r3 = 10, threshold 0.5, tau <= 3,
"medium dependency" policy, refusal prefix "Sorry, I cannot fulfill your request because".
Everything is validated in ``__post_init__`` so a bad config fails where it is written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

POLICIES = ("low", "medium", "high")
SCHEDULES = ("first", "each", "periodic", "annealing", "cascade")

# Per-sequence controller modes (docs/DESIGN.md §4), stored as int32 in EssState.mode.
PENDING, BENIGN, SUSPECT, REFUSING = 0, 1, 2, 3
# Sentinel for "never evaluate again" in EssState.next_eval (fits in int32).
NEVER = 2**31 - 1

Scalar = Union[float, int, torch.Tensor]


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")


def _check_real(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo):
        lo_s = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {lo_s}{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class EssConfig:
    """Strategic decoding configuration (docs/DESIGN.md §4).

    Attributes:
        r1: response tokens in the first evaluation window (rule 1).
        r2: latest tokens in the BENIGN window (rule 2) and look-back of the SUSPECT window.
        r3: look-ahead of the SUSPECT window after the flagged step (rule 3).
        tau: consecutive flags that trigger the policy for a sequence that started benign.
        threshold: ``p_unsafe >= threshold`` counts as a flag.
        policy: ``"low"`` (record only), ``"medium"`` (force the refusal prefix, then sample
            freely), ``"high"`` (force the refusal prefix, then end the sequence).
        schedule: when a BENIGN sequence is re-evaluated: ``"first"`` (never), ``"each"``
            (every step), ``"periodic"`` (every ``period`` tokens), ``"annealing"`` (interval
            ``anneal_start``, then ``max(interval + 1, floor(interval * anneal_growth))``;
            evaluation points past ``anneal_stop`` response tokens become never),
            ``"cascade"`` (only at the step after the delta's token-row screening probe flags
            the sequence's token row; docs/DESIGN.md §4; needs a delta with a probe).
        cascade_net: with ``"cascade"``, also evaluate at ``"annealing"``'s points (a sparse
            safety net under the probe); False = the probe alone.
        first_at: the first evaluation happens at the first step with ``n >= first_at``
            response tokens (0 = at prefill).
        refusal_text: the prefix forced by the medium and high policies.
        cls_bias_scale: scale of the safety-signal key bias on the [CLS] key for response rows
            (0 = exactly the paper).
    """

    r1: int = 10
    r2: int = 10
    r3: int = 10
    tau: int = 3
    threshold: float = 0.5
    policy: str = "medium"
    schedule: str = "each"
    period: int = 10
    anneal_start: int = 1
    anneal_growth: float = 2.0
    anneal_stop: int = 256
    first_at: int = 0
    refusal_text: str = "Sorry, I cannot fulfill your request because"
    cls_bias_scale: float = 0.0
    cascade_net: bool = False

    def __post_init__(self):
        for name in ("r1", "r2", "r3", "tau", "period", "anneal_start"):
            _check_int(name, getattr(self, name), 1)
        _check_int("anneal_stop", self.anneal_stop, 0)
        _check_int("first_at", self.first_at, 0)
        _check_real("threshold", self.threshold, 0.0, 1.0)
        _check_real("anneal_growth", self.anneal_growth, 1.0, 1e6)
        _check_real("cls_bias_scale", self.cls_bias_scale, -1e4, 1e4)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.cascade_net, bool):
            raise TypeError(f"cascade_net must be a bool, got {type(self.cascade_net).__name__}")
        if self.cascade_net and self.schedule != "cascade":
            raise ValueError(f"cascade_net applies to schedule='cascade' only, got schedule="
                             f"{self.schedule!r}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("refusal_text must be a non-empty string")

    @property
    def label(self) -> str:
        """Short human-readable name of the schedule, e.g. ``periodic(10)``."""
        if self.schedule == "periodic":
            return f"periodic({self.period})"
        if self.schedule == "annealing":
            return f"annealing({self.anneal_start},{self.anneal_growth:g},{self.anneal_stop})"
        if self.schedule == "cascade" and self.cascade_net:
            return (f"cascade+annealing({self.anneal_start},{self.anneal_growth:g},"
                    f"{self.anneal_stop})")
        return self.schedule


def _check_param(name: str, value, lo: float, hi: float, lo_open: bool = False, integer=False):
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} as a tensor must be 1-D (one value per row), got shape "
                             f"{tuple(value.shape)}")
        if integer and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} tensor must be int32 or int64, got {value.dtype}")
        if not integer and not value.dtype.is_floating_point:
            raise TypeError(f"{name} tensor must be floating point, got {value.dtype}")
        if value.device.type == "meta":
            raise ValueError(f"{name} tensor is on the meta device (a shape without values); "
                             "pass a CPU or CUDA tensor")
        v = value.detach().to("cpu", torch.float64)
        bad = torch.isnan(v) | (v < lo) | (v > hi)
        if lo_open:
            bad |= v == lo
        if bool(bad.any()):
            raise ValueError(f"{name} values must be in {'(' if lo_open else '['}{lo}, {hi}], "
                             f"got {v[bad][0].item()}")
        return
    if integer:
        _check_int(name, value, int(lo), int(hi))
    else:
        _check_real(name, value, lo, hi, lo_open)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters, applied in the order temperature -> top-k -> top-p -> min-p.

    Each parameter is a Python scalar (all rows) or a 1-D tensor with one value per row.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the tokens whose logit is >= the k-th largest (0 = off). Ties at the
            k-th value are all kept.
        top_p: keep the smallest prefix of the probability-sorted vocabulary whose mass
            reaches ``top_p`` (a token is kept iff the mass strictly before it is < top_p;
            1.0 = off). The most likely token is always kept.
        min_p: keep tokens with ``p >= min_p * p_max`` (0 = off).
        seed: seeds a private generator, so the same seed gives the same tokens.
        logprobs: per-token log-probabilities on request (None = off). ``0``: the sampled
            token's logprob; ``k > 0``: also the ``k`` most likely tokens and their logprobs.
            Logprobs are ``log_softmax(logits / temperature)`` (temperature 0: of the raw
            logits), taken *before* top-k / top-p / min-p filtering (vLLM's default). A forced
            refusal token gets its logprob under the model.
    ``top_k``, ``top_p`` and ``min_p`` accept None for "off", as in transformers.
    Default: greedy decoding (the paper evaluates with greedy decoding).
    """

    temperature: Scalar = 0.0
    top_k: Union[int, torch.Tensor, None] = 0
    top_p: Union[Scalar, None] = 1.0
    min_p: Union[Scalar, None] = 0.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None

    def __post_init__(self):
        # transformers spells "off" as None; store the neutral value so kernels see one form.
        for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, off)
        _check_param("temperature", self.temperature, 0.0, 1e4)
        _check_param("top_k", self.top_k, 0, 2**31 - 1, integer=True)
        _check_param("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_param("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, 2**31 - 1)

    @property
    def is_greedy(self) -> bool:
        """True when every row decodes greedily (temperature 0)."""
        t = self.temperature
        return bool((t == 0).all()) if isinstance(t, torch.Tensor) else t == 0


# transformers' generate() keywords that safekern.generate maps onto SamplingParams.
SAMPLING_KEYWORDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "seed")


def sampling_from_keywords(sampling: SamplingParams, **kw) -> SamplingParams:
    """``sampling`` with transformers-style keywords applied (``safekern.generate(...,
    temperature=0.7)``): each keyword overrides the field of the same name.

    ``do_sample=False`` is greedy decoding (temperature 0) and refuses the keywords that only
    apply when sampling; ``do_sample=True`` samples at ``temperature`` (default 1.0, as in
    transformers). Unlike transformers, ``temperature > 0`` alone samples (transformers
    ignores it unless ``do_sample=True``): a temperature here is never dropped silently.
    """
    unknown = sorted(set(kw) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise TypeError(f"not a sampling keyword: {unknown[0]!r} (sampling keywords: "
                        f"{', '.join(SAMPLING_KEYWORDS)})")
    do_sample = kw.pop("do_sample", None)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    if do_sample is False:
        neutral = {"temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0}
        only_sampling = [k for k, off in neutral.items() if k in kw and kw[k] is not None and
                         (isinstance(kw[k], torch.Tensor) or kw[k] != off)]
        if only_sampling:
            raise ValueError(f"do_sample=False is greedy decoding, which {only_sampling[0]}="
                             f"{kw[only_sampling[0]]!r} would not change; drop one of them")
        kw["temperature"] = 0.0
    elif do_sample:
        t = kw.get("temperature")
        if t is None and sampling.is_greedy:
            kw["temperature"] = 1.0
        elif isinstance(t, (int, float)) and t == 0:
            raise ValueError("do_sample=True with temperature=0 (greedy); drop one of them")
    return dataclasses.replace(sampling, **kw)


_STATE_FIELDS = ("prompt_len", "query_start", "query_end", "seq_len", "mode", "flags",
                 "switch_step", "next_eval", "interval", "forced_idx", "trigger_step")


@dataclass
class EssState:
    """Batched per-sequence strategic-decoding state (docs/DESIGN.md §4), on one device.

    Every field is a ``(B,)`` int32 tensor except ``evaluating``/``finished`` (bool) and
    ``refusal_ids`` (``(R,)`` int64). Kernels read and update it in place, so the decode loop
    never synchronises with the host.

    Attributes:
        prompt_len: ``P``, prompt tokens including [CLS]; the response starts at ``P``.
        query_start, query_end: the user query span ``Q = [query_start, query_end)``.
        seq_len: ``t``, tokens in the cache once this step's token is written. The caller
            (the engine) sets it before each step.
        mode: PENDING (not evaluated yet), BENIGN, SUSPECT or REFUSING.
        flags: consecutive flagged evaluations.
        switch_step: ``S``, the value of ``t`` at the evaluation that entered SUSPECT (-1).
        next_eval: response length ``n`` at which a BENIGN sequence is evaluated next
            (``NEVER`` = never again). Under ``"cascade"`` a probe flag at ``n`` sets it to
            ``n + 1``.
        interval: the next annealing interval.
        forced_idx: index of the next refusal-prefix token to force (-1 = none).
        trigger_step: ``t`` at the evaluation that triggered the policy (-1 = none).
        evaluating: rows whose [CLS] row is evaluated this step (set by ``plan_step``).
        finished: rows the ``high`` policy has ended.
        refusal_ids: token ids of the refusal prefix as inserted mid-response, on a new line
            (the ids of ``"\\n" + refusal_text``; docs/DESIGN.md §4).
        refusal_skip: how many leading ``refusal_ids`` (the newline) a trigger skips when the
            response is still empty (``n = t - P == 0``), so a refusal that opens the response
            starts with the text itself. A Python int: the per-row choice is made on the device
            from ``n`` (``forced_idx`` starts at 0 or at ``refusal_skip``), no host sync.
    """

    prompt_len: torch.Tensor
    query_start: torch.Tensor
    query_end: torch.Tensor
    seq_len: torch.Tensor
    mode: torch.Tensor
    flags: torch.Tensor
    switch_step: torch.Tensor
    next_eval: torch.Tensor
    interval: torch.Tensor
    forced_idx: torch.Tensor
    trigger_step: torch.Tensor
    evaluating: torch.Tensor
    finished: torch.Tensor
    refusal_ids: torch.Tensor
    refusal_skip: int = 0

    @classmethod
    def create(cls, prompt_len, query_start, query_end, refusal_ids, ess: EssConfig,
               device=None, refusal_skip: int = 0) -> "EssState":
        """Fresh state for a batch whose prompts have been prefilled (``seq_len = P``).

        Args:
            prompt_len, query_start, query_end: ``(B,)`` ints (tensors or sequences).
            refusal_ids: token ids of the refusal prefix as forced mid-response (non-empty;
                the engine passes the ids of ``"\\n" + ess.refusal_text``).
            ess: the configuration (its ``anneal_start`` seeds ``interval``).
            refusal_skip: leading ``refusal_ids`` skipped when the response is empty
                (``0 <= refusal_skip < len(refusal_ids)``; 0 = always force them all).
        """
        if not isinstance(ess, EssConfig):
            raise TypeError(f"ess must be an EssConfig, got {type(ess).__name__}")
        as_i32 = lambda name, x: _as_vector(name, x, torch.int32, device)  # noqa: E731
        P = as_i32("prompt_len", prompt_len)
        qs = as_i32("query_start", query_start)
        qe = as_i32("query_end", query_end)
        B = P.shape[0]
        if qs.shape[0] != B or qe.shape[0] != B:
            raise ValueError(f"query_start/query_end must have {B} entries like prompt_len, got "
                             f"{qs.shape[0]} and {qe.shape[0]}")
        if bool((P < 1).any()):
            raise ValueError("prompt_len must be >= 1 (the [CLS] token is at index 0)")
        if bool(((qs < 0) | (qs > qe) | (qe > P)).any()):
            raise ValueError("query span must satisfy 0 <= query_start <= query_end <= prompt_len")
        rid = _as_vector("refusal_ids", refusal_ids, torch.int64, P.device)
        if rid.numel() == 0:
            raise ValueError("refusal_ids must hold at least one token id")
        _check_refusal_skip(refusal_skip, rid.numel())
        full = lambda v: torch.full((B,), v, dtype=torch.int32, device=P.device)  # noqa: E731
        return cls(
            prompt_len=P, query_start=qs, query_end=qe, seq_len=P.clone(),
            mode=full(PENDING), flags=full(0), switch_step=full(-1), next_eval=full(ess.first_at),
            interval=full(ess.anneal_start), forced_idx=full(-1), trigger_step=full(-1),
            evaluating=torch.zeros(B, dtype=torch.bool, device=P.device),
            finished=torch.zeros(B, dtype=torch.bool, device=P.device),
            refusal_ids=rid, refusal_skip=refusal_skip,
        )

    @property
    def batch_size(self) -> int:
        return self.mode.shape[0]

    def clone(self) -> "EssState":
        return EssState(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                           for k, v in self.__dict__.items()})

    def tensors(self):
        """The state's tensors (every field but ``refusal_skip``)."""
        return [v for v in self.__dict__.values() if isinstance(v, torch.Tensor)]

    def validate(self, batch_size: Optional[int] = None, device=None) -> None:
        """Check dtypes, shapes and devices; raise naming the offending field."""
        B = self.batch_size if batch_size is None else batch_size
        dev = self.mode.device if device is None else torch.device(device)
        for name in _STATE_FIELDS + ("evaluating", "finished"):
            x = getattr(self, name)
            want = torch.bool if name in ("evaluating", "finished") else torch.int32
            if not isinstance(x, torch.Tensor) or x.dtype != want or tuple(x.shape) != (B,):
                got = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                       else type(x).__name__)
                raise ValueError(f"state.{name} must be a ({B},) {want} tensor, got {got}")
            if x.device != dev:
                raise ValueError(f"state.{name} is on {x.device}, expected {dev}")
        r = self.refusal_ids
        if r.dtype != torch.int64 or r.dim() != 1 or r.numel() == 0 or r.device != dev:
            raise ValueError("state.refusal_ids must be a non-empty 1-D int64 tensor on "
                             f"{dev}, got {r.dtype} {tuple(r.shape)} on {r.device}")
        _check_refusal_skip(self.refusal_skip, r.numel(), "state.refusal_skip")


def _check_refusal_skip(skip, R: int, name: str = "refusal_skip") -> None:
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < R:
        raise ValueError(f"{name} must be an int in [0, {R}) (fewer than the {R} refusal ids), "
                         f"got {skip!r}")


def _as_vector(name, x, dtype, device):
    if isinstance(x, torch.Tensor):
        t = x
    else:
        vals = [x] if isinstance(x, int) else list(x)
        t = torch.as_tensor(vals) if vals else torch.zeros(0, dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=dtype)
