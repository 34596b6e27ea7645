"""Batched strategic decoding over Llama-family transformers models (docs/DESIGN.md §2-§5).

One generic forward walks the model's own modules (``embed_tokens``, ``layers[i]`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (Qwen2 biases included),
``post_attention_layernorm``, ``mlp``; ``norm``, ``rotary_emb``, ``lm_head``) and keeps its own
preallocated KV cache ``(layers, B, Lmax, Hkv, D)``. Attention goes through
``safekern.ess_attention`` and the step's tail through ``safekern.head_sample``, so the fastest
registered backend runs. On CPU (float32) decode steps run the projections and MLPs through
``safekern.ops.cpu.decode_linear`` / ``safekern.ops.cpu.linear``, which read each weight once for the
token and [CLS] rows (MKL's small-M sgemm does not); prefill keeps the model's own modules.
A delta with a [CLS] adapter (``safekern.safety.adapter``) adds its low-rank deltas to the [CLS]
rows of both (column 0 of a prefill, column 1 of a fused step) after the shared projections.

Per decode step and sequence, two query rows share one forward pass (Lq = 2):

* the token row: the token sampled last step, at position ``t - 1``;
* the [CLS] row at ``q_pos = 0`` when the sequence re-evaluates this step (``-1`` otherwise:
  a padding row that costs nothing and writes nothing). In every layer its fresh K/V overwrite
  cache slot 0 *before* that layer's attention, so the token row of the same step already sees
  the refreshed [CLS] (docs/DESIGN.md §3, KV-cache semantics).

Prompts of different lengths are right-padded (never left-padded): padding rows get
``q_pos = -1`` and ``seqlens_k`` hides padding keys, so RoPE positions equal indices.
On CUDA the decode loop does not synchronise with the host: EOS/finished bookkeeping lives in
device tensors and "all finished?" is read every ``sync_every`` steps; the decode step can be
captured in a CUDA graph (``cuda_graph=True``, greedy sampling).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..safety.adapter import AdaptedLinears, adapter_of, with_adapter
from ..ops.cpu.decode_linear import KernelLinears, ModuleLinears, decode_linears
from ..safety.prompts import encode_inputs, refusal_token_ids
from ..safety.config import safety_head_params
from ..ops import dispatch, ess_attention, head_sample
from ..ops.attention import reuse_masks
from ..ops.cpu import controller as fused_controller
from ..ops.head_sample import raise_non_finite
from ..safety.probe import probe_params
from ..reference.controller import escalate, plan_step
from ..spec import (NEVER, REFUSING, SAMPLING_KEYWORDS, EssConfig, EssState, SamplingParams,
                    sampling_from_keywords)

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_ACTIONS = {"low": "record", "medium": "refusal_prefix", "high": "refusal_stop"}


@dataclass
class Trace:
    """What the safety controller did for one sequence.

    Attributes:
        eval_steps: generation steps at which the [CLS] row was evaluated; a verdict at step
            ``s`` decides generated token ``s`` (step 0 = prefill).
        eval_lengths: response length ``n = t - P`` at each evaluation (prefilled tokens count).
        p_unsafe: ``p_unsafe`` at each evaluation.
        trigger_step: the step whose verdict triggered the policy (None = never).
        action: ``"refusal_prefix"`` (medium), ``"refusal_stop"`` (high), ``"record"`` (low) or
            None when nothing triggered.
    """

    eval_steps: List[int] = field(default_factory=list)
    eval_lengths: List[int] = field(default_factory=list)
    p_unsafe: List[float] = field(default_factory=list)
    trigger_step: Optional[int] = None
    action: Optional[str] = None


@dataclass
class TokenLogprob:
    """The log-probability of one generated token (``SamplingParams(logprobs=k)``).

    Attributes:
        token_id: the generated token (a forced refusal token included).
        logprob: its ``log_softmax(logits / T)`` (T = 0: of the raw logits), before
            top-k/top-p/min-p filtering, as vLLM reports by default.
        top: the ``k`` most likely ``(token_id, logprob)`` pairs, most likely first (empty for
            ``logprobs=0``).
    """

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One sequence's output.

    Attributes:
        text: the generated text (after the prefill, if any; cut at a stop string).
        token_ids: the generated token ids (EOS included when it ended the sequence).
        prefill_ids: the forced response start (part of the response, not generated).
        finish_reason: ``"eos"``, ``"stop"`` (stop string), ``"refusal"`` (high policy) or
            ``"length"``.
        trace: the safety trace (None when decoding without safety).
        logprobs: one ``TokenLogprob`` per entry of ``token_ids`` when
            ``SamplingParams.logprobs`` is set, else None.
    """

    text: str
    token_ids: List[int]
    prefill_ids: List[int]
    finish_reason: str
    trace: Optional[Trace]
    logprobs: Optional[List[TokenLogprob]] = None


class _Arch:
    """The modules of a Llama-family model, checked once; raises for what the engine lacks."""

    def __init__(self, model):
        cfg = getattr(model, "config", None)
        mtype = getattr(cfg, "model_type", None)
        if mtype not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {mtype!r} ({type(model).__name__}); the "
                             f"engine supports {SUPPORTED_ARCHS}")
        base = getattr(model, "model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb")
                   if not hasattr(base, n)]
        if missing or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} lacks the Llama-family modules "
                             f"{missing or ['lm_head']}")
        if getattr(model.lm_head, "bias", None) is not None:
            raise ValueError("an LM head with a bias is not supported by the engine")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") == "dynamic":
            raise ValueError("dynamic RoPE scaling depends on the running length and is not "
                             "supported by the engine (its RoPE table is precomputed)")
        if rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported by the engine")
        layer0 = base.layers[0]
        for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
            if not hasattr(layer0, name):
                raise ValueError(f"decoder layers lack {name!r}; not a Llama-family layer")
        for name in ("q_norm", "k_norm"):
            if hasattr(layer0.self_attn, name):
                raise ValueError(f"attention with {name} (e.g. Qwen3) is not supported")
        self.model, self.base, self.config = model, base, cfg
        self.layers = list(base.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = float(getattr(layer0.self_attn, "scaling", self.head_dim ** -0.5))
        self.max_positions = getattr(cfg, "max_position_embeddings", None)

    def check_length(self, L: int):
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        active = ("sliding_attention" in types) if types is not None else window is not None
        if active and window is not None and window < L:
            raise ValueError(f"sliding-window attention (window {window}) is active within the "
                             f"cache length {L}; the engine implements full attention only")

    def rope_table(self, L: int, device, dtype):
        pos = torch.arange(L, device=device)[None]
        dummy = torch.zeros(1, device=device, dtype=dtype)
        cos, sin = self.base.rotary_emb(dummy, pos)
        return cos[0], sin[0]                                            # (L, D) each


class Engine:
    """Strategic decoding with its own KV cache over a Llama/Mistral/Qwen2 transformers model.

    Args:
        model: a transformers causal LM; ``safekern.attach`` it first to decode with safety.
        tokenizer: its tokenizer (the one ``attach`` modified).
        max_cache_len: longest prompt + new tokens a sequence may reach (default: the model's
            ``max_position_embeddings``).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"``, passed to the ops.
        cuda_graph: capture the decode step in a CUDA graph (CUDA, greedy sampling only).
        sync_every: read the device-side "all finished" flag every this many steps (default 1
            on CPU, 16 on CUDA).
        ignore_eos: decode ``max_new_tokens`` tokens regardless of EOS (benchmarks).
        cpu_linear: on CPU (float32), how decode steps run their projections and MLP:
            ``True`` / ``"auto"``: per number of rows, whichever of the
            ``safekern.ops.cpu.linear`` kernels (weights read once for the token and [CLS]
            rows; packed-panel copies for small models) and MKL measured faster on first use
            (``safekern.ops.cpu.decode_linear.KernelLinears``); ``"kernel"``: the tile kernel
            always; ``False``: the model's modules.
            ``cpu_linear_reason`` says why the kernel is not used when it cannot run.
        cpu_controller: on CPU with the torch ``head_sample`` backend, run each decode step's
            controller (plan, update, forced token) as two fused C++ calls
            (``safekern.ops.cpu.controller``, tested against the reference controller)
            instead of ~60 small torch ops; ``False``: the reference controller.
            ``cpu_controller_reason`` says why the fused one is not used.

    >>> eng = Engine(model, tokenizer)                                     # doctest: +SKIP
    >>> eng.generate(["How do I bake bread?"], max_new_tokens=32)[0].trace  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, *, max_cache_len: Optional[int] = None,
                 backend: str = "auto", cuda_graph: bool = False,
                 sync_every: Optional[int] = None, ignore_eos: bool = False,
                 cpu_linear: Union[bool, str] = True, cpu_controller: bool = True):
        self.arch = _Arch(model)
        if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got "
                            f"{type(tokenizer).__name__}")
        dispatch.resolve_backend(backend)
        if max_cache_len is None:
            max_cache_len = self.arch.max_positions or 4096
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or \
                max_cache_len < 2:
            raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
        if sync_every is not None and (not isinstance(sync_every, int) or sync_every < 1):
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError("cuda_graph must be a bool")
        if not isinstance(cpu_controller, bool):
            raise TypeError("cpu_controller must be a bool")
        if not (isinstance(cpu_linear, bool) or cpu_linear in ("auto", "kernel")):
            raise ValueError(f"cpu_linear must be True, False, 'auto' or 'kernel', got "
                             f"{cpu_linear!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_cache_len, self.backend = max_cache_len, backend
        self.cuda_graph, self._sync_every = cuda_graph, sync_every
        self.ignore_eos = bool(ignore_eos)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self._modules = ModuleLinears(self.arch.layers)
        self._refusal_ids: Dict[Tuple[str, int], Tuple[Tuple[int, ...], int]] = {}
        self._decode_linears, self.cpu_linear_reason = decode_linears(
            self.arch.layers, self.device, self.dtype, enabled=cpu_linear is not False,
            mode="kernel" if cpu_linear == "kernel" else "auto")
        self.cpu_controller_reason = (
            "disabled by the caller" if not cpu_controller else
            f"the fused controller runs on CPU (the model is on {self.device.type})"
            if self.device.type != "cpu" else fused_controller.unavailable_reason())

    # ------------------------------------------------------------------ the generic forward
    def _forward(self, ids, pos, q_pos, kv_len, write, attn, ess_kw, linears):
        """Run the decoder on ``ids (B, L)`` at ``pos (B, L)``; ``write(layer, k, v)`` stores
        this pass's K/V in the cache before ``attn`` reads ``cache[:, :kv_len]``; ``linears``
        runs the projections and MLPs (``safekern.ops.cpu.decode_linear``)."""
        a = self.arch
        B, L = ids.shape
        kw = {"response_start": None, "cls_windows": None, "key_bias": None, **ess_kw}
        x = a.base.embed_tokens(ids)
        if isinstance(linears, AdaptedLinears):
            linears.embed(x)                      # the adapter's own [CLS] embedding
        cos, sin = self._cos[pos][:, :, None, :], self._sin[pos][:, :, None, :]
        half = a.head_dim // 2
        with reuse_masks():                   # one visibility mask per pass, not one per layer
            for i, layer in enumerate(a.layers):
                h = layer.input_layernorm(x)
                q, k, v = linears.qkv(i, h)
                q = q.view(B, L, a.n_heads, a.head_dim)
                k = k.view(B, L, a.n_kv, a.head_dim)
                v = v.view(B, L, a.n_kv, a.head_dim)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
                write(i, k, v)
                o = attn(q, self._k[i, :, :kv_len], self._v[i, :, :kv_len],
                         softmax_scale=a.scale, causal=True, q_pos=q_pos, return_lse=False, **kw)
                x = x + linears.o(i, o.reshape(B, L, a.n_heads * a.head_dim))
                x = x + linears.mlp(i, layer.post_attention_layernorm(x))
        return x

    # ------------------------------------------------------------------ setup per generate
    def _setup(self, enc, max_new_tokens, ess, sampling):
        a, dev = self.arch, self.device
        ids, lengths = enc.padded(self.tokenizer.pad_token_id or 0, dev)
        B, Lp = ids.shape
        need = Lp + max_new_tokens
        if need > self.max_cache_len:
            raise ValueError(f"the longest prompt ({Lp} tokens incl. prefill) + max_new_tokens "
                             f"({max_new_tokens}) = {need} exceeds the cache length "
                             f"{self.max_cache_len}")
        if a.max_positions is not None and need > a.max_positions:
            raise ValueError(f"{need} positions exceed the model's max_position_embeddings "
                             f"({a.max_positions})")
        a.check_length(need)
        self.B, self.Lmax, self.Lp = B, need, Lp
        # One spare slot at index ``need``: the [CLS] K/V of rows that do not re-evaluate are
        # written there (never read), so each layer stores both rows in one indexed write.
        shape = (len(a.layers), B, need + 1, a.n_kv, a.head_dim)
        # Zeros, not empty: the reference reads padded key slots (masked, but 0 * NaN = NaN).
        self._k = torch.zeros(shape, device=dev, dtype=self.dtype)
        self._v = torch.zeros(shape, device=dev, dtype=self.dtype)
        self._cos, sin = a.rope_table(need, dev, self.dtype)
        # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1.., +1..]: fold the sign into sin
        # (exact: only a negation moves) so RoPE is two multiplies and one roll per tensor.
        sign = torch.ones(a.head_dim, device=dev, dtype=self.dtype)
        sign[:a.head_dim // 2] = -1
        self._sin = sin * sign
        self._lengths = lengths
        self._bidx = torch.arange(B, device=dev)
        # (B * (need + 1), Hkv, D) views of each layer's cache: decode steps write their rows
        # with one index_copy_ at row * (need + 1) + slot (_slot_writer).
        self._kflat = self._k.view(shape[0], -1, *shape[3:]).unbind(0)
        self._vflat = self._v.view(shape[0], -1, *shape[3:]).unbind(0)
        self._row_base = self._bidx * shape[2]
        if isinstance(self._decode_linears, KernelLinears):
            self._decode_linears.refresh()           # packed weight copies: never stale
        self._ess = ess
        self._sampling = sampling
        self._generator = (torch.Generator(device=dev).manual_seed(sampling.seed)
                           if sampling.seed is not None else None)
        eos = self._eos_ids()
        self._eos = torch.tensor(eos if eos else [-1], device=dev, dtype=torch.int64)
        self._done = torch.zeros(B, dtype=torch.bool, device=dev)
        self._reason_refusal = torch.zeros(B, dtype=torch.bool, device=dev)
        self._step_idx = torch.zeros(1, dtype=torch.int64, device=dev)
        # A decode step's ids: (token, [CLS]) per sequence; _tok is column 0 (a view), so a
        # step with [CLS] rows reads its ids without a per-step cat.
        self._ids2 = torch.zeros(B, 2, dtype=torch.int64, device=dev)
        self._tok = self._ids2[:, 0]
        pad = self.tokenizer.pad_token_id
        self._pad = -1 if pad is None else pad
        self._out_tok = torch.full((B, max_new_tokens), -1, dtype=torch.int64, device=dev)
        self._out_emit = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
        if sampling.logprobs is not None:
            k = sampling.logprobs
            self._out_lp = torch.full((B, max_new_tokens), float("nan"), device=dev)
            self._out_top_ids = torch.zeros(B, max_new_tokens, k, dtype=torch.int64, device=dev)
            self._out_top_lp = torch.zeros(B, max_new_tokens, k, device=dev)
        self._lm_w = self.model.lm_head.weight
        self._norm = a.base.norm
        self._prefill_linears, self._step_linears = self._modules, self._decode_linears
        self._probe = None
        if ess is not None:
            cfg = self.model.safekern
            if adapter_of(self.model) is not None:
                if ess.cls_bias_scale != 0:
                    raise ValueError("this model's delta has a [CLS] adapter, which needs "
                                     "cls_bias_scale=0 (the bias would carry the adapted "
                                     "verdict into token rows)")
                self._prefill_linears = with_adapter(self.model, self._modules, 0)
                self._step_linears = with_adapter(self.model, self._decode_linears, 1)
            if cfg.windows is not None and (ess.r1, ess.r2, ess.r3) != tuple(cfg.windows):
                warnings.warn(f"the safety delta was trained for windows r1, r2, r3 = "
                              f"{tuple(cfg.windows)}; this EssConfig uses "
                              f"{(ess.r1, ess.r2, ess.r3)}: its verdicts are out of the "
                              "distribution it was trained on", stacklevel=4)
            self._sw, self._sb = safety_head_params(self.model)
            # The cascade's screening probe (docs/DESIGN.md §4): (w, b, threshold), or None.
            self._probe = probe_params(self.model, self.dtype) \
                if ess.schedule == "cascade" else None
            # Forced after a mid-response trigger as "\n" + refusal (docs/DESIGN.md §4); a
            # trigger on an empty response skips the newline ids (chosen per row on device).
            key = (ess.refusal_text, len(self.tokenizer))       # tokenised once per text
            if key not in self._refusal_ids:
                rids, rskip = refusal_token_ids(self.tokenizer, ess.refusal_text)
                self._refusal_ids[key] = (tuple(rids), rskip)
            refusal, skip = self._refusal_ids[key]
            refusal = list(refusal)
            self.state = EssState.create(enc.prompt_len, enc.query_start, enc.query_end,
                                         refusal, ess, device=dev, refusal_skip=skip)
            self.state.seq_len.copy_(lengths)
            self._out_p = torch.full((B, max_new_tokens), float("nan"), device=dev)
            self._out_ev = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
            self._out_t = torch.zeros(B, max_new_tokens, dtype=torch.int32, device=dev)
            self._logit = torch.zeros(B, device=dev)
            self._ids2[:, 1] = cfg.cls_id
            # Where rows start to see the [CLS] key: the response (the paper), or never (a
            # delta trained on a frozen LM, SafetyConfig.response_sees_cls=False).
            self._cls_visible_from = (self.state.prompt_len if cfg.response_sees_cls else
                                      torch.full_like(self.state.prompt_len, NEVER))
        # Resolve the backends once: the decode loop calls them directly, because the public
        # functions validate values (a host sync per call) and the engine builds valid inputs.
        attn = {lq: dispatch.choose(
            "ess_attention", self.backend, device=dev, dtype=self.dtype, head_dim=a.head_dim,
            seqlen_q=lq, seqlen_k=need, requires_grad=False) for lq in (1, 2)}
        self._attn_fns = {lq: fn for lq, (_, fn) in attn.items()}
        head_backend, self._head_fn = dispatch.choose(
            "head_sample", self.backend, device=dev, dtype=self.dtype, batch=B,
            vocab=self._lm_w.shape[0], hidden=self._lm_w.shape[1], sampling=sampling,
            probe=self._probe is not None)
        # NaN/inf logits or scores (e.g. a weight changed through .data): the torch reference
        # raises at the step; the Triton and CUDA kernels flag the row here (no host sync), the
        # row ends, and _results raises before any token is returned.
        self._nonfinite = torch.zeros(B, dtype=torch.int32, device=dev)
        self._head_kw = {"nonfinite": self._nonfinite} if head_backend in ("triton", "cuda") \
            else {}
        # The torch head_sample backend runs the reference controller as small ops; on CPU the
        # fused controller replaces it (same state trace). Logprobs stay on the reference path:
        # they are taken of the final (possibly forced) token inside head_sample.
        # Steps without ESS lay out their rows in one C++ call where the controller can run.
        self._fused_rows = self.cpu_controller_reason is None
        self._fused_ctl = (ess is not None and head_backend == "torch" and
                           self.cpu_controller_reason is None and sampling.logprobs is None)
        # Bound once per generate: the per-step calls skip the argument checks (issue 11).
        self._ctl = fused_controller.Bound(self.state, ess, self._probe) if self._fused_ctl \
            else None
        self._plan = (lambda st, e: self._ctl.plan()) if self._fused_ctl else \
            (lambda st, e: (plan_step(st, e), None))
        if self._fused_ctl:
            # safety_score_ref's operands, prepared once: the score is then sigmoid(h @ w + b),
            # the same ops on the same values as the reference (bit-identical verdicts).
            cd = torch.float64 if self.dtype == torch.float64 else torch.float32
            w = self._sw.to(cd)
            b = torch.zeros((), dtype=cd, device=dev) if self._sb is None else \
                torch.as_tensor(self._sb, device=dev).to(cd)
            if w.dim() == 2:
                w = w[1] - w[0]
                b = b[1] - b[0] if b.dim() == 1 else b
            self._score_wb = (cd, w, b)
        # The torch reference reads values on the host (e.g. "all rows greedy?"), which a CUDA
        # graph cannot capture: graphs need fast backends for both ops.
        self._graphable = head_backend != "torch" and all(b != "torch" for b, _ in attn.values())
        return ids, lengths

    def _eos_ids(self) -> List[int]:
        ids = set()
        if self.ignore_eos:
            return []
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        e = getattr(gen, "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else (e or []))
        return sorted(ids)

    def _key_bias(self, kv_len):
        """``cls_bias_scale * logit(p_unsafe)`` on key 0 (the [CLS]) — seen by response rows
        and the [CLS] row itself; prompt rows never see key 0. None when the scale is 0."""
        if self._ess is None or self._ess.cls_bias_scale == 0:
            return None
        kb = torch.zeros(self.B, 1, kv_len, device=self.device)
        kb[:, 0, 0] = self._ess.cls_bias_scale * self._logit
        return kb

    # ------------------------------------------------------------------ prefill
    def _prefill(self, ids, lengths):
        B, L = ids.shape
        i = torch.arange(L, device=self.device, dtype=torch.int32)[None]
        valid = i < lengths[:, None]
        q_pos = torch.where(valid, i, torch.full_like(i, -1))
        pos = torch.where(valid, i, torch.zeros_like(i)).long()
        if self._ess is not None and self.model.safekern.cls_position == "last":
            pos[:, 0] = lengths.long() - 1           # the [CLS] row looks back from t - 1

        def write(layer, k, v):
            self._k[layer, :, :L] = k
            self._v[layer, :, :L] = v

        ess_kw = dict(seqlens_k=lengths, key_bias=self._key_bias(L))
        if self._ess is not None:
            windows = self._plan(self.state, self._ess)[0]
            ess_kw.update(response_start=self._cls_visible_from, cls_windows=windows)
        attn = lambda *args, **kw: ess_attention(*args, backend=self.backend, **kw)  # noqa: E731
        x = self._forward(ids, pos, q_pos, L, write, attn, ess_kw, self._prefill_linears)
        h_tok = self._norm(x[self._bidx, lengths.long() - 1])
        h_cls = self._norm(x[:, 0]) if self._ess is not None else None
        self._sample(h_tok, h_cls, checked=True)

    # ------------------------------------------------------------------ decode
    def _decode_step(self, kv_len: int, host_skip: bool = False):
        """One step for every sequence; reads and writes only device tensors (graph-safe).

        ``host_skip`` (CPU, where reading a flag costs nothing): when no sequence re-evaluates
        this step, the token rows run alone. A decode token row sits at ``t - 1 >= P``, so plain
        causal attention over ``[0, t)`` is exactly its ESS visibility.
        """
        st = self.state if self._ess is not None else None
        if st is None:
            rows = fused_controller.decode_rows if self._fused_rows else self._decode_rows_ref
            pos, q_pos, flat, seqlens = rows(self._lengths, self._step_idx, self._row_base)
            x = self._forward(self._tok[:, None], pos, q_pos, kv_len, self._flat_writer(flat),
                              self._attn_fns[1],
                              dict(seqlens_k=seqlens, key_bias=self._key_bias(kv_len)),
                              self._decode_linears)
            self._sample(self._norm(x[:, 0]), None, controller=False)
            return
        args = (self._lengths, self._step_idx, self._row_base,
                self.model.safekern.cls_position == "last", self.Lmax, host_skip)
        windows, n_ev, pos, q_pos, flat = self._ctl.step_begin(*args) if self._fused_ctl else \
            self._step_begin_ref(st, self._ess, *args)
        write = self._flat_writer(flat)
        if pos.shape[1] == 1:                 # host_skip and nobody evaluates: token rows only
            ess_kw = dict(seqlens_k=st.seq_len, key_bias=self._key_bias(kv_len))
            if not self.model.safekern.response_sees_cls:
                ess_kw["response_start"] = self._cls_visible_from     # token rows skip key 0
            x = self._forward(self._tok[:, None], pos, q_pos, kv_len, write,
                              self._attn_fns[1], ess_kw, self._decode_linears)
            h = self._norm(x[:, 0])
            if self._probe is None and not bool((st.forced_idx >= 0).any()):
                # Nobody evaluates or takes a refusal token: the controller update is a no-op
                # (under the cascade it is not: the probe screens every step).
                self._sample(h, None, controller=False)
            else:
                self._sample(h, h)                    # no [CLS] row is read: none evaluates
            return
        ess_kw = dict(seqlens_k=st.seq_len, response_start=self._cls_visible_from,
                      cls_windows=windows, key_bias=self._key_bias(kv_len))
        x = self._forward(self._ids2, pos, q_pos, kv_len, write, self._attn_fns[2], ess_kw,
                          self._step_linears)
        h = self._norm(x)
        # the fused controller reads the [CLS] rows of h itself (a select is a ~5 us op here)
        self._sample(h[:, 0], h if self._fused_ctl else h[:, 1])

    @staticmethod
    def _decode_rows_ref(lengths, step_idx, row_base):
        """``cpu_controller.decode_rows``'s reference: ``(pos, q_pos, flat, seqlens_k)`` of a
        decode step's token rows."""
        t_prev = lengths + (step_idx.int() - 1)                          # t - 1 per sequence
        pos = t_prev.long()[:, None]
        return pos, t_prev[:, None], row_base + pos[:, 0], t_prev + 1

    @staticmethod
    def _step_begin_ref(st, ess, lengths, step_idx, row_base, cls_last: bool, spare_slot: int,
                        skip_idle: bool):
        """``cpu_controller.step_begin``'s reference: ``(windows, n_ev, pos, q_pos, flat)`` of a
        decode step (n_ev None when no host count is needed) and ``st.seq_len`` set."""
        t_prev = lengths + (step_idx.int() - 1)                          # t - 1 per sequence
        st.seq_len.copy_(t_prev + 1)
        windows = plan_step(st, ess)
        n_ev = int(st.evaluating.sum()) if skip_idle else None
        if skip_idle and n_ev == 0:
            pos = t_prev.long()[:, None]
            return windows, n_ev, pos, t_prev[:, None], (row_base[:, None] + pos).reshape(-1)
        pos, q_pos, slots = Engine._cls_layout_ref(t_prev, st.evaluating, cls_last, spare_slot)
        return windows, n_ev, pos, q_pos, (row_base[:, None] + slots).reshape(-1)

    def _slot_writer(self, slots: torch.Tensor):
        """``write(layer, k, v)`` storing ``k``/``v (B, L, Hkv, D)`` at cache slots
        ``slots (B, L)`` (int64, distinct within a row) of each sequence: one ``index_copy_``
        per tensor into the layer's flattened cache (the advanced-index assignment
        ``cache[layer, rows, slots] = k`` it replaces: 3.8 -> 2.4 us per tensor on CPU, batch 4
        with [CLS] rows, 1 thread)."""
        return self._flat_writer((self._row_base[:, None] + slots).reshape(-1))

    def _flat_writer(self, flat: torch.Tensor):
        """``_slot_writer`` with the flattened cache rows ``row_base + slot`` given, ``(B * L,)``
        in ``(B, L)`` order."""
        def write(layer, k, v):
            self._kflat[layer].index_copy_(0, flat, k.reshape(-1, k.shape[2], k.shape[3]))
            self._vflat[layer].index_copy_(0, flat, v.reshape(-1, v.shape[2], v.shape[3]))
        return write

    @staticmethod
    def _cls_layout_ref(t_prev, ev, cls_last: bool, spare_slot: int):
        """``(pos, q_pos, slots)`` of a step's token and [CLS] rows, ``(B, 2)`` each: RoPE
        positions, query positions (-1: a [CLS] row that does not evaluate, a padding row) and
        cache slots. The [CLS] slot (0) is refreshed before each layer's attention, for
        evaluating rows only; the others write to the spare slot, never read."""
        cls_pos = t_prev if cls_last else torch.zeros_like(t_prev)
        pos = torch.stack([t_prev, cls_pos], 1).long()
        q_pos = torch.stack([t_prev, torch.where(ev, 0, -1).int()], 1)
        slots = torch.stack([pos[:, 0], torch.where(ev, 0, spare_slot)], 1)
        return pos, q_pos, slots

    def _sample(self, h_tok, h_cls, checked: bool = False, controller: bool = True):
        """head_sample + per-step bookkeeping in device tensors (no host sync)."""
        ess = self._ess
        kw = dict(h_cls=None, safety_weight=None, safety_bias=None, state=None, ess=None,
                  sampling=self._sampling, generator=self._generator)
        fused = ess is not None and controller and self._fused_ctl and not checked
        if ess is not None and controller and not fused:
            kw.update(h_cls=h_cls, safety_weight=self._sw, safety_bias=self._sb,
                      state=self.state, ess=ess)
            if self._probe is not None:
                kw.update(probe_weight=self._probe[0], probe_bias=self._probe[1],
                          probe_threshold=self._probe[2])
        emit = ~self._done
        col = self._step_idx
        if checked:
            res = head_sample(h_tok, self._lm_w, backend=self.backend, **kw)
            tok, p = res[0], res[1]
        elif fused:
            tok, p = self._sample_fused(h_tok, h_cls, kw, emit)      # and the trace record
        else:
            res = self._head_fn(h_tok, self._lm_w, **kw, **self._head_kw)
            tok, p = res[0], res[1]
        if self._sampling.logprobs is not None:
            lp = res[2]
            self._out_lp.index_copy_(1, col, lp.token[:, None])
            self._out_top_ids.index_copy_(1, col, lp.top_ids[:, None])
            self._out_top_lp.index_copy_(1, col, lp.top[:, None])
        self._out_tok.index_copy_(1, col, torch.where(emit, tok, self._pad)[:, None])
        self._out_emit.index_copy_(1, col, emit[:, None])
        done = self._done | torch.isin(tok, self._eos) | (self._nonfinite != 0)
        # Without a controller update nothing below changes (outputs start as NaN/False).
        if ess is not None and controller:
            if not fused:
                self._record_ref(self.state, p, emit, col, self._out_p, self._out_ev,
                                 self._out_t, self._reason_refusal)
            if ess.cls_bias_scale != 0:
                ev = self.state.evaluating & emit
                pc = p.clamp(1e-6, 1 - 1e-6)
                self._logit.copy_(torch.where(ev, torch.log(pc) - torch.log1p(-pc), self._logit))
            if not fused:                             # step_end or'd it into self._done
                done = done | self.state.finished
        self._done.copy_(done)
        self._tok.copy_(tok)
        self._step_idx += 1

    @staticmethod
    def _record_ref(state, p, emit, col, out_p, out_ev, out_t, reason_refusal):
        """The step's trace columns and refusal flags (``cpu_controller.record`` fuses it)."""
        out_p.index_copy_(1, col, p[:, None])
        out_ev.index_copy_(1, col, (state.evaluating & emit)[:, None])
        out_t.index_copy_(1, col, state.seq_len[:, None])
        reason_refusal |= emit & state.finished

    def _sample_fused(self, h_tok, h_cls, kw, emit):
        """``head_sample_ref``'s step with the fused CPU controller (the same score, NaN check,
        state update, forced tokens and draws; the draws do not depend on the state), and the
        step's trace record: ``_step_end_ref`` is the reference of the one call after the
        draw."""
        drawn = self._head_fn(h_tok, self._lm_w, **kw, **self._head_kw)[0]
        _, w, b = self._score_wb
        return self._ctl.step_end(h_cls, w, b, drawn, emit, self._step_idx, self._out_p,
                                  self._out_ev, self._out_t, self._reason_refusal, self._done,
                                  h_tok)

    @staticmethod
    def _step_end_ref(st, ess, h_cls, w, b, drawn, emit, col, out_p, out_ev, out_t,
                      reason_refusal, done, probe=None):
        """``cpu_controller.step_end``'s reference: ``safety_score_ref``'s score with the
        prepared head ``(w, b)``, the controller update, the cascade's ``escalate`` when
        ``probe = (h_tok, w, b, threshold)``, the trace record, ``done |= st.finished``."""
        h_cls = h_cls[:, -1] if h_cls.dim() == 3 else h_cls
        scores = torch.sigmoid(h_cls.to(w.dtype) @ w + b).float()      # safety_score_ref
        tok, p, _ = fused_controller.update(st, ess, scores, drawn)
        if probe is not None:
            h_tok, pw, pb, thr = probe
            escalate(st, ess, torch.sigmoid(h_tok.to(pw.dtype) @ pw + pb).float(), thr)
        Engine._record_ref(st, p, emit, col, out_p, out_ev, out_t, reason_refusal)
        done |= st.finished
        return tok, p

    # ------------------------------------------------------------------ CUDA graph
    def _capture_graph(self):
        """Capture ``_decode_step`` over the full cache length; None if capture fails."""
        tensors = [self._tok, self._done, self._step_idx, self._out_tok, self._out_emit,
                   self._reason_refusal, self._nonfinite]
        if self._sampling.logprobs is not None:
            tensors += [self._out_lp, self._out_top_ids, self._out_top_lp]
        if self._ess is not None:
            tensors += self.state.tensors() + [
                self._out_p, self._out_ev, self._out_t, self._logit]
        saved = [t.clone() for t in tensors]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode_step(self.Lmax)                              # warm-up (allocator)
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(tensors, saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step(self.Lmax)
        except RuntimeError as e:  # e.g. a backend that synchronises (the torch reference)
            warnings.warn(f"CUDA-graph capture of the decode step failed ({e}); running eagerly")
            graph = None
        # Warm-up and capture touched the state; the [CLS]/token cache writes they made are
        # recomputed identically by the first real step, so restoring the small tensors suffices.
        for t, s in zip(tensors, saved):
            t.copy_(s)
        return graph

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, prompts, *, max_new_tokens: int,
                 safety: Union[EssConfig, None, str] = "auto",
                 sampling: SamplingParams = SamplingParams(),
                 prefill: Optional[Sequence[str]] = None,
                 stream: Optional[Callable[[int, List[Optional[int]], List[float]], None]] = None,
                 stop: Optional[Sequence[str]] = None,
                 chat_template: bool = True) -> List[GenerationResult]:
        """Generate for a batch of prompts (strings, token ids or chats); see
        ``safekern.generate``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        safety = resolve_safety(self.model, safety)
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if stream is not None and not callable(stream):
            raise TypeError("stream must be a callable(step, tokens, p_unsafe) or None")
        if stop is not None and (isinstance(stop, str) or not all(
                isinstance(s, str) and s for s in stop)):
            raise TypeError("stop must be a list of non-empty strings or None")
        # encode_inputs checks the safety head and the tokenizer's [CLS] (safety_config) when
        # safety is on; a second check here cost a 49k-entry get_vocab() (~22 ms) per call.
        enc = encode_inputs(self.model, self.tokenizer, prompts, prefill,
                            safety=safety is not None, chat_template=chat_template)
        for name in ("temperature", "top_k", "top_p", "min_p"):
            x = getattr(sampling, name)
            if isinstance(x, torch.Tensor) and x.shape[0] != len(enc.ids):
                raise ValueError(f"sampling.{name} must have one value per prompt "
                                 f"({len(enc.ids)}), got {x.shape[0]}")
        if sampling.logprobs is not None and sampling.logprobs > self._lm_vocab():
            raise ValueError(f"sampling.logprobs={sampling.logprobs} exceeds the vocabulary "
                             f"size {self._lm_vocab()}")
        sampling = dataclasses.replace(sampling, **{
            n: getattr(sampling, n).to(self.device) for n in ("temperature", "top_k", "top_p",
                                                              "min_p")
            if isinstance(getattr(sampling, n), torch.Tensor)})
        ids, lengths = self._setup(enc, max_new_tokens, safety, sampling)
        on_cuda = self.device.type == "cuda"
        sync_every = self._sync_every or (16 if on_cuda else 1)
        self._prefill(ids, lengths)
        graph = None
        if self.cuda_graph and on_cuda and max_new_tokens > 1:
            if not (sampling.is_greedy and self._graphable):
                warnings.warn("cuda_graph needs greedy sampling and non-reference backends for "
                              "ess_attention and head_sample; decoding eagerly")
            else:
                graph = self._capture_graph()
        steps = 1
        self._stopped = [False] * self.B
        if stream is not None:
            self._emit_stream(stream, 0)
        while steps < max_new_tokens:
            if steps % sync_every == 0 and bool(self._done.all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(self.Lp + steps, host_skip=not on_cuda)
            if stream is not None:
                self._emit_stream(stream, steps)
            steps += 1
            if stop and steps % sync_every == 0 and self._all_stopped(stop, steps, sync_every):
                break
        return self._results(enc, stop, steps)

    def _lm_vocab(self) -> int:
        return self.model.lm_head.weight.shape[0]

    def _emit_stream(self, stream, step):
        emit = self._out_emit[:, step].tolist()
        toks = self._out_tok[:, step].tolist()
        p = self._out_p[:, step].tolist() if self._ess is not None else [math.nan] * self.B
        stream(step, [t if e else None for t, e in zip(toks, emit)], p)

    def _all_stopped(self, stop, steps, sync_every) -> bool:
        """Host check, every ``sync_every`` steps: has every row ended or written a stop string?

        Only the tail that can hold a new occurrence is decoded (every token is >= 1 byte;
        a few spare tokens cover characters split across tokens)."""
        tail = sync_every + max(len(s.encode()) for s in stop) + 4
        lo = max(0, steps - tail)
        toks = self._out_tok[:, lo:steps].tolist()
        emit = self._out_emit[:, lo:steps].tolist()
        for b, (d, row, em) in enumerate(zip(self._done.tolist(), toks, emit)):
            if not (d or self._stopped[b]):
                text = self.tokenizer.decode([t for t, e in zip(row, em) if e])
                self._stopped[b] = any(s in text for s in stop)
        return all(d or st for d, st in zip(self._done.tolist(), self._stopped))

    def _results(self, enc, stop, steps) -> List[GenerationResult]:
        raise_non_finite(self._nonfinite)
        toks = self._out_tok[:, :steps].tolist()
        emit = self._out_emit[:, :steps].tolist()
        done = self._done.tolist()
        refused = self._reason_refusal.tolist()
        eos = set(self._eos.tolist())
        traces = self._traces(enc, steps) if self._ess is not None else [None] * self.B
        logprobs = self._logprobs(steps, emit)
        out = []
        for b in range(self.B):
            row = [t for t, e in zip(toks[b], emit[b]) if e]
            reason = ("refusal" if refused[b] else "eos" if done[b] and row and row[-1] in eos
                      else "length")
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for s in stop or ():
                cut = text.find(s)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    row = _ids_covering(self.tokenizer, row, text)
            prefill_ids = enc.ids[b][enc.prompt_len[b]:]
            lp = None if logprobs is None else logprobs[b][:len(row)]
            out.append(GenerationResult(text, row, prefill_ids, reason, traces[b], lp))
        return out

    def _logprobs(self, steps, emit) -> Optional[List[List[TokenLogprob]]]:
        if self._sampling.logprobs is None:
            return None
        toks = self._out_tok[:, :steps].tolist()
        lp = self._out_lp[:, :steps].tolist()
        top_ids = self._out_top_ids[:, :steps].tolist()
        top_lp = self._out_top_lp[:, :steps].tolist()
        return [[TokenLogprob(toks[b][s], lp[b][s], list(zip(top_ids[b][s], top_lp[b][s])))
                 for s in range(steps) if emit[b][s]] for b in range(self.B)]

    def _traces(self, enc, steps) -> List[Trace]:
        ev = self._out_ev[:, :steps].tolist()
        p = self._out_p[:, :steps].tolist()
        t = self._out_t[:, :steps].tolist()
        trig = self.state.trigger_step.tolist()
        mode = self.state.mode.tolist()
        lengths = self._lengths.tolist()
        out = []
        for b in range(self.B):
            tr = Trace()
            for s in range(steps):
                if ev[b][s]:
                    tr.eval_steps.append(s)
                    tr.eval_lengths.append(t[b][s] - enc.prompt_len[b])
                    tr.p_unsafe.append(p[b][s])
            if mode[b] == REFUSING and trig[b] >= 0 and trig[b] - lengths[b] in tr.eval_steps:
                tr.trigger_step = trig[b] - lengths[b]
                tr.action = _ACTIONS[self._ess.policy]
            out.append(tr)
        return out


def resolve_safety(model, safety) -> Optional[EssConfig]:
    """``generate``'s ``safety`` argument as an ``EssConfig`` (or None): ``"auto"`` takes the
    delta's measured operating point, else the paper's ``EssConfig()``."""
    if isinstance(safety, str):
        if safety != "auto":
            raise ValueError(f"safety must be an EssConfig, None or 'auto', got {safety!r}")
        cfg = getattr(model, "safekern", None)
        return getattr(cfg, "operating_point", None) or EssConfig()
    if safety is not None and not isinstance(safety, EssConfig):
        raise TypeError(f"safety must be an EssConfig, None or 'auto', got "
                        f"{type(safety).__name__}")
    return safety


def _ids_covering(tokenizer, ids: List[int], text: str) -> List[int]:
    """The shortest prefix of ``ids`` whose decoding starts with ``text``."""
    for k in range(len(ids) + 1):
        if tokenizer.decode(ids[:k], skip_special_tokens=True).startswith(text):
            return ids[:k]
    return ids


_ENGINE_OPTIONS = ("max_cache_len", "cuda_graph", "sync_every", "ignore_eos")


def generate(model, tokenizer, prompts, *, max_new_tokens: int,
             safety: Union[EssConfig, None, str] = "auto",
             sampling: SamplingParams = SamplingParams(),
             prefill: Optional[Sequence[str]] = None,
             stream: Optional[Callable[[int, List[Optional[int]], List[float]], None]] = None,
             stop: Optional[Sequence[str]] = None, backend: str = "auto",
             chat_template: bool = True, threads: Optional[int] = None,
             **kw) -> List[GenerationResult]:
    """Strategic decoding (docs/DESIGN.md §4) for a batch of user messages.

    Args:
        model, tokenizer: a Llama/Mistral/Qwen2 transformers model and its tokenizer, after
            ``safekern.attach`` (or ``load_safety``) unless ``safety`` is None.
        prompts: one prompt or a list of them, each in one of three forms (mixed freely):

            * a string: the user message, rendered with the chat template when the tokenizer
              has one (``chat_template=False``: ``BOS + message``); the query span is the
              message's tokens.
            * token ids (``list[int]``, vLLM's ``prompt_token_ids``): the whole prompt as the
              model reads it, template included; safekern only prepends [CLS]. The query span
              is exact when the ids are the chat template around a message (the tokens between
              the template's prefix and suffix ids, e.g. from
              ``tokenizer.apply_chat_template(msgs, add_generation_prompt=True)``); otherwise
              every token after a leading BOS.
            * a chat (``list[dict]`` with ``"role"``/``"content"``, transformers' format): system
              messages and earlier turns are welcome; the last message must be the user's, and
              it alone is the query span. Needs a tokenizer with a chat template.

            A bare ``list[int]`` or ``list[dict]`` is one prompt. Different lengths are
            right-padded.
        max_new_tokens: tokens to generate per sequence (>= 1).
        safety: the ``EssConfig``; None = plain decoding without the [CLS] token; ``"auto"``
            (default) = the operating point the loaded delta was measured at
            (``SafetyConfig.operating_point``), or ``EssConfig()`` (the paper's) when it
            records none.
        sampling: ``SamplingParams`` (default greedy); ``seed`` seeds one generator for the run;
            ``logprobs=k`` fills ``GenerationResult.logprobs``.
        prefill: per prompt a forced start of the response (the prefill attack): those tokens
            are response tokens from position P and the first evaluation covers them (rule 1).
        stream: ``stream(step, tokens, p_unsafe)`` after every step, with ``tokens[b]`` None for
            finished sequences and ``p_unsafe[b]`` NaN where not evaluated (syncs every step).
        stop: stop strings; a sequence ends at the first one (the text is cut before it).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"`` for the ops.
        threads: torch CPU threads for this call (restored after it); None leaves torch's
            setting. On a small shared CPU, 1 decodes fastest (BENCHMARKS.md, "Threads").
        kw: transformers-style sampling keywords (``do_sample``, ``temperature``, ``top_k``,
            ``top_p``, ``min_p``, ``seed``), mapped onto ``sampling`` by
            ``safekern.spec.sampling_from_keywords`` (``do_sample=False``: greedy;
            ``temperature > 0`` alone samples), and ``Engine`` options (``max_cache_len``,
            ``cuda_graph``, ``sync_every``, ``ignore_eos``).

    Returns:
        One ``GenerationResult`` per prompt (text, token_ids, finish_reason, trace, logprobs).

    A refusal forced after the response has begun (generated or prefilled tokens) starts on a
    new line: ``"\\n" + refusal_text``; one that opens the response is the text alone.
    """
    for name in kw:
        if name not in _ENGINE_OPTIONS + SAMPLING_KEYWORDS:
            raise TypeError(f"safekern.generate() got an unexpected keyword argument {name!r} "
                            f"(sampling: {', '.join(SAMPLING_KEYWORDS)} or "
                            f"sampling=SamplingParams(...); Engine options: "
                            f"{', '.join(_ENGINE_OPTIONS)})")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or
                                threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    sampling = sampling_from_keywords(sampling, **{k: kw.pop(k) for k in SAMPLING_KEYWORDS
                                                   if k in kw})
    engine = Engine(model, tokenizer, backend=backend, **kw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, safety=safety,
                               sampling=sampling, prefill=prefill, stream=stream, stop=stop,
                               chat_template=chat_template)
    finally:
        torch.set_num_threads(before)


__all__ = ["Engine", "generate", "GenerationResult", "TokenLogprob", "Trace", "SUPPORTED_ARCHS"]
