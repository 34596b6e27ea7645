"""Batched strategic decoding over a model's own modules (``generate``, ``Engine``): the
architecture view, the KV cache, prefill and the fused decode step, the glue to the safety
controller (with the reference twins of the fused C++ controller) and the results.

May import ``spec``, ``reference``, ``ops`` and ``safety``: never training, evaluation, the
integrations or the CLI.
"""
from .engine import Engine, GenerationResult, TokenLogprob, Trace, generate

__all__ = ["generate", "Engine", "GenerationResult", "TokenLogprob", "Trace"]
