"""Batched strategic decoding over Llama-family transformers models (docs/DESIGN.md §2-§5):
the ``Engine`` and ``generate``.

The engine walks the model's own modules (``arch.py``) with its own preallocated KV cache
(``cache.py``): the prefill and the fused decode step, token and [CLS] rows in one pass
(``forward.py``); the controller glue and the fused C++ controller's references
(``controller.py``); the results (``results.py``); CUDA-graph capture (``graph.py``).
Attention goes through ``safekern.ess_attention`` and the step's tail through
``safekern.head_sample``, so the fastest registered backend runs. On CPU (float32) decode steps
run the projections and MLPs through ``safekern.ops.cpu.decode_linear`` /
``safekern.ops.cpu.linear``, which read each weight once for the token and [CLS] rows (MKL's
small-M sgemm does not); prefill keeps the model's own modules. A delta with a [CLS] adapter
(``safekern.safety.adapter``) adds its low-rank deltas to the [CLS] rows of both (column 0 of a
prefill, column 1 of a fused step) after the shared projections.

On CUDA the decode loop does not synchronise with the host: EOS/finished bookkeeping lives in
device tensors and "all finished?" is read every ``sync_every`` steps; the decode step can be
captured in a CUDA graph (``cuda_graph=True``, greedy sampling).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..ops import dispatch
from ..ops.cpu import controller as fused_controller
from ..ops.cpu.decode_linear import KernelLinears, ModuleLinears, decode_linears
from ..safety.prompts import encode_inputs
from ..spec import SAMPLING_KEYWORDS, EssConfig, SamplingParams, sampling_from_keywords
from . import controller, forward, results
from .arch import SUPPORTED_ARCHS, Arch
from .cache import KVCache
from .controller import resolve_safety
from .graph import capture_graph
from .results import GenerationResult, TokenLogprob, Trace

_Arch = Arch     # the name importers used before the split (safekern.training.frozen did)


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
        self.arch = Arch(model)
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

    # The pieces, one module each: functions of the engine, bound here as its methods.
    _forward = forward.forward
    _key_bias = forward.key_bias
    _prefill = forward.prefill
    _decode_step = forward.decode_step
    _sample = controller.sample
    _sample_fused = controller.sample_fused
    _capture_graph = capture_graph
    _emit_stream = results.emit_stream
    _all_stopped = results.all_stopped
    _results = results.results
    _logprobs = results.collect_logprobs
    _traces = results.collect_traces
    _eos_ids = results.eos_ids
    # The fused C++ controller's references (safekern.runtime.controller).
    _decode_rows_ref = staticmethod(controller.decode_rows_ref)
    _step_begin_ref = staticmethod(controller.step_begin_ref)
    _cls_layout_ref = staticmethod(controller.cls_layout_ref)
    _record_ref = staticmethod(controller.record_ref)
    _step_end_ref = staticmethod(controller.step_end_ref)

    def _slot_writer(self, slots: torch.Tensor):
        """``KVCache.slot_writer`` of this call's cache."""
        return self._cache.slot_writer(slots)

    def _flat_writer(self, flat: torch.Tensor):
        """``KVCache.flat_writer`` of this call's cache."""
        return self._cache.flat_writer(flat)

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
        self._cache = KVCache(a, B, need, dev, self.dtype)
        self._lengths = lengths
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
        results.allocate(self, B, max_new_tokens, sampling)      # the per-step output columns
        self._lm_w = self.model.lm_head.weight
        self._norm = a.base.norm
        self._prefill_linears, self._step_linears = self._modules, self._decode_linears
        self._probe = None
        if ess is not None:
            controller.setup_safety(self, enc, ess, lengths, max_new_tokens)
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
        controller.bind_controller(self, ess, sampling, head_backend)
        # The torch reference reads values on the host (e.g. "all rows greedy?"), which a CUDA
        # graph cannot capture: graphs need fast backends for both ops.
        self._graphable = head_backend != "torch" and all(b != "torch" for b, _ in attn.values())
        return ids, lengths

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
