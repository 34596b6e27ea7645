"""The CUDA C++ backend (``csrc/``) of the decode-time ops: ``backend="cuda"``.

Kernels (framework-free CUDA, see the .cu files for the design):
  * ``ess_attention``: split-KV decode attention with the ESS masks, key bias and GQA, for
    up to ``MAX_DECODE_ROWS`` query rows per sequence (the token row and the [CLS] row).
  * ``head_sample``: LM head + safety score + ESS state update + greedy or temperature
    (Gumbel-max) sampling, and the emitted token's logprob (``logprobs=0``). top-k / top-p /
    min-p and top-k logprobs (``logprobs > 0``) are declined, so ``auto`` falls back.
    NaN/inf logits and NaN scores are flagged by the kernel into a ``(B,)`` int32 buffer and
    raise as on the other backends (``safekern.ops.head_sample.raise_non_finite``).

The compiled extension ``safekern._C`` (``pip install -e . --no-build-isolation`` with CUDA
torch and nvcc) registers ``torch.ops.safekern.cuda_*``; it is imported lazily, on the first call
that could use it. ``load_jit()`` builds the same sources with ``torch.utils.cpp_extension.load``
for development. Without either, ``can_run`` says how to build it and ``auto`` never picks cuda.
"""
from __future__ import annotations

import glob
import importlib
import os
from typing import Dict, List, Optional, Tuple

import torch

from .._checks import value_checks_enabled
from ..reference.attention import resolve_positions
from ..reference.sampling import Logprobs
from ..spec import POLICIES, SCHEDULES
from . import dispatch
from .head_sample import raise_non_finite

MAX_DECODE_ROWS = 16  # query rows per sequence: a decode kernel, no tensor cores
HEAD_DIMS = (32, 64, 128)  # sk_decode_attention_supports_head_dim in csrc
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "csrc")

_load_error: Optional[str] = None


def _ops_registered() -> bool:
    return hasattr(torch.ops, "safekern") and hasattr(torch.ops.safekern, "cuda_head_sample") and \
        hasattr(torch.ops.safekern, "cuda_ess_decode_attention")


def extension_error() -> Optional[str]:
    """``None`` when the compiled ops are loaded (importing ``safekern._C`` once), else why not."""
    global _load_error
    if _ops_registered():
        return None
    if _load_error is None:
        try:
            importlib.import_module("safekern._C")
        except ImportError as e:
            _load_error = (f"the CUDA extension safekern._C is not built ({e}); build it with "
                           "`pip install -e . --no-build-isolation` where CUDA torch and nvcc are "
                           "installed, or call safekern.ops.cuda_backend.load_jit()")
        else:
            _load_error = None if _ops_registered() else \
                "safekern._C imported but did not register torch.ops.safekern"
    return _load_error


def load_jit(verbose: bool = False) -> None:
    """Build ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) and register the ops.

    For development: no install step, rebuilt when a source changes. Targets the visible GPU
    unless ``TORCH_CUDA_ARCH_LIST`` says otherwise. No-op when the ops are already registered.
    """
    global _load_error
    if _ops_registered():
        return
    if not os.path.isdir(CSRC):
        # csrc/ sits beside the package in a source checkout; a wheel carries the extension it
        # built (setup.py), not its sources.
        raise FileNotFoundError(f"load_jit builds csrc/ of a source checkout, and there is none "
                                f"at {CSRC}; install with `pip install . --no-build-isolation` "
                                "where CUDA torch and nvcc are present to build safekern._C")
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "bindings.cpp")]
    load(name="safekern_C_jit", sources=sources, extra_include_paths=[CSRC],
         extra_cflags=["-O3"],
         extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
         is_python_module=False, verbose=verbose)
    _load_error = None


# --------------------------------------------------------------------------- ess_attention

def ess_attention_can_run(device: torch.device, dtype=None, head_dim=None, seqlen_q=None,
                          requires_grad=False, **ctx) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got {device.type})"
    if requires_grad:
        return "the cuda backend has no backward pass (inputs require grad)"
    if dtype not in DTYPES:
        return f"the cuda backend supports float16, bfloat16 and float32, not {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"the cuda backend has kernels for head_dim in {HEAD_DIMS}, not {head_dim}"
    if seqlen_q is not None and seqlen_q > MAX_DECODE_ROWS:
        return (f"the cuda kernel is a decode kernel (seqlen_q <= {MAX_DECODE_ROWS}, got "
                f"{seqlen_q}); prefill runs on triton")
    return extension_error()


def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _ess_attention_cuda(q, k, v, *, softmax_scale, causal, q_pos, seqlens_k, response_start,
                        cls_windows, key_bias, return_lse):
    B, Lq, _, D = q.shape
    q_pos, seqlens_k = resolve_positions(q_pos, seqlens_k, B, Lq, k.shape[1], q.device)
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    o, lse = torch.ops.safekern.cuda_ess_decode_attention(
        _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v), q_pos.contiguous(),
        seqlens_k.contiguous(), None if response_start is None else response_start.contiguous(),
        None if cls_windows is None else cls_windows.contiguous(), key_bias, scale, causal, 0)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------- head_sample

def head_sample_can_run(device: torch.device, dtype=None, vocab=None, sampling=None,
                        **ctx) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got {device.type})"
    if dtype not in DTYPES:
        return f"the cuda backend supports float16, bfloat16 and float32, not {dtype}"
    if vocab is not None and vocab >= 2**31 - 1:
        return f"vocab {vocab} exceeds int32 token ids"
    if sampling is not None and sampling.logprobs:
        return ("the cuda backend computes the sampled token's logprob only (logprobs=0); "
                f"top-{sampling.logprobs} logprobs need the triton or torch backend")
    if sampling is not None:
        # Filters are off only for these values; a per-row tensor would need a host sync to
        # tell, so tensors are declined outright.
        off = {"top_k": lambda x: x == 0 or (vocab is not None and x >= vocab),
               "top_p": lambda x: x == 1.0, "min_p": lambda x: x == 0.0}
        for name, is_off in off.items():
            x = getattr(sampling, name)
            if isinstance(x, torch.Tensor):
                return f"the cuda backend does not take per-row {name} tensors"
            if not is_off(x):
                return (f"the cuda backend samples greedily or with temperature only "
                        f"({name}={x} needs the triton or torch backend)")
    return extension_error()


def _safety_head_f32(safety_weight, safety_bias,
                     device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The head as ``(Dm,)`` fp32 weight and ``(1,)`` fp32 bias, as safety_score_ref computes it."""
    w = safety_weight.to(device=device, dtype=torch.float32)
    b = None
    if safety_bias is not None:
        b = torch.as_tensor(safety_bias).to(device=device, dtype=torch.float32)
    if w.dim() == 2:  # two-class head: softmax(Wh + b)[1] == sigmoid((W1 - W0) h + b1 - b0)
        w = w[1] - w[0]
        b = None if b is None else b[1] - b[0]
    return w.contiguous(), None if b is None else b.reshape(1)


def _seed_tensor(sampling, generator, device) -> torch.Tensor:
    temp = sampling.temperature
    if not isinstance(temp, torch.Tensor) and temp == 0:
        # Greedy: no noise is drawn, and like the reference the generator is not advanced.
        return torch.zeros(1, dtype=torch.int64, device=device)
    if generator is not None:  # stays on the device: CUDA-graph capturable
        return torch.randint(0, 2**62, (1,), generator=generator, device=device)
    if sampling.seed is not None:
        return torch.tensor([sampling.seed], dtype=torch.int64).to(device)
    return torch.randint(0, 2**62, (1,), device=device)


_STATE_ORDER = ("prompt_len", "seq_len", "mode", "flags", "switch_step", "next_eval", "interval",
                "forced_idx", "trigger_step", "evaluating", "finished", "refusal_ids")


def _head_sample_cuda(h_tok, lm_head_weight, *, h_cls, safety_weight, safety_bias, state, ess,
                      sampling, generator, nonfinite=None, probe_weight=None, probe_bias=None,
                      probe_threshold=None, probe_out=None):
    """``nonfinite``: optional ``(B,)`` int32 buffer the kernel ORs flags into (1: a NaN/inf
    logit, 2: a NaN score of a row that scored), without a host sync; the caller checks it at
    its own sync points (``raise_non_finite``), as for the Triton backend. Without it the flags
    are read here after the launch (one host read, skipped while value checks are off: CUDA-graph
    capture, ``SAFEKERN_SKIP_VALUE_CHECKS=1``, ``no_value_checks()``) and raise as the
    reference; with the checks off a flagged row's token stays in ``[0, V)`` and a NaN score
    counts as benign. The cascade's probe (``probe_weight`` ...) runs in the finalize kernel on
    the token rows, after the state update; ``probe_out`` receives its scores."""
    dev, B = h_tok.device, h_tok.shape[0]
    check_here = nonfinite is None
    if check_here:
        nonfinite = torch.zeros(B, dtype=torch.int32, device=dev)
    temp = sampling.temperature
    if isinstance(temp, torch.Tensor):
        temperature = temp.to(device=dev, dtype=torch.float32).contiguous()
    else:
        temperature = torch.full((B,), float(temp), dtype=torch.float32, device=dev)
    w = b = None
    if h_cls is not None:
        w, b = _safety_head_f32(safety_weight, safety_bias, dev)
        h_cls = _unit_stride_last(h_cls)
    state_list: List[torch.Tensor] = []
    cfg = dict(threshold=0.5, tau=1, policy=0, schedule=0, period=1, anneal_stop=0,
               anneal_growth=1.0)
    if state is not None:
        state_list = [getattr(state, name) for name in _STATE_ORDER]
        cfg = dict(threshold=ess.threshold, tau=ess.tau, policy=POLICIES.index(ess.policy),
                   schedule=5 if ess.schedule == "cascade" and ess.cascade_net else
                   SCHEDULES.index(ess.schedule), period=ess.period,
                   anneal_stop=ess.anneal_stop, anneal_growth=ess.anneal_growth)
    probe = ()
    if probe_weight is not None and state is not None:
        pb = torch.as_tensor(0.0 if probe_bias is None else probe_bias, device=dev)
        probe = (probe_weight.to(device=dev, dtype=torch.float32).contiguous(),
                 pb.to(torch.float32).reshape(1), float(probe_threshold), probe_out)
    tokens, p_unsafe, token_lp = torch.ops.safekern.cuda_head_sample(
        _unit_stride_last(h_tok), _unit_stride_last(lm_head_weight), h_cls, w, b, temperature,
        _seed_tensor(sampling, generator, dev), state_list,
        0 if state is None else state.refusal_skip, float(cfg["threshold"]), cfg["tau"],
        cfg["policy"], cfg["schedule"], cfg["period"], cfg["anneal_stop"],
        float(cfg["anneal_growth"]), sampling.logprobs is not None, nonfinite, *probe)
    if check_here and value_checks_enabled():
        raise_non_finite(nonfinite)
    if sampling.logprobs is None:
        return tokens, p_unsafe
    return tokens, p_unsafe, Logprobs(token_lp, torch.zeros(B, 0, dtype=torch.int64, device=dev),
                                      torch.zeros(B, 0, device=dev))


# --------------------------------------------------------------------------- auto order

# Backends ``auto`` tries first, per (op, shape bucket), from side-by-side GPU measurements.
# EMPTY ON PURPOSE: no GPU has run these kernels yet. scripts/gpu_check.sh runs
# benchmarks/bench_attention.py and bench_head_sample.py with the cuda backend on an H100; a
# bucket gets ("cuda", "triton") only where cuda measured faster, with the CSV it came from
# cited here. Until then ``auto`` prefers triton and cuda runs only when asked for.
AUTO_TABLE: Dict[Tuple[str, str], Tuple[str, ...]] = {}


def shape_bucket(op: str, **ctx) -> str:
    """Coarse shape class of a call: the key of ``AUTO_TABLE`` together with the op."""
    if op == "ess_attention":
        lq, lk = ctx.get("seqlen_q") or 1, ctx.get("seqlen_k") or 0
        rows = "decode" if lq <= 2 else ("multi" if lq <= MAX_DECODE_ROWS else "prefill")
        keys = "short" if lk <= 1024 else ("medium" if lk <= 8192 else "long")
        return f"{rows}/{keys}/d{ctx.get('head_dim')}"
    batch, vocab = ctx.get("batch") or 1, ctx.get("vocab") or 0
    return f"b{'<=8' if batch <= 8 else ('<=64' if batch <= 64 else '>64')}/" \
           f"v{'<=32k' if vocab <= 32768 else '>32k'}"


def _auto_order(op: str):
    def order(device: torch.device, **ctx) -> List[str]:
        if device.type != "cuda":
            return ["torch"]
        return list(AUTO_TABLE.get((op, shape_bucket(op, **ctx)), ("triton",)))
    return order


dispatch.register("ess_attention", "cuda", _ess_attention_cuda, ess_attention_can_run)
dispatch.register("head_sample", "cuda", _head_sample_cuda, head_sample_can_run)
dispatch.set_auto_order("ess_attention", _auto_order("ess_attention"))
dispatch.set_auto_order("head_sample", _auto_order("head_sample"))

__all__ = ["load_jit", "extension_error", "shape_bucket", "AUTO_TABLE", "MAX_DECODE_ROWS"]
