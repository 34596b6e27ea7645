"""Batched strategic decoding over a model's own modules (``generate``, ``Engine``), one
responsibility a module: ``arch`` (the architecture view of a transformers model), ``cache``
(the KV cache and RoPE table), ``forward`` (the decoder forward, prefill and the fused decode
step), ``controller`` (the glue to the safety controller, with the reference twins of the fused
C++ controller), ``graph`` (CUDA-graph capture), ``results`` (what ``generate`` returns) and
``engine`` (the ``Engine`` and ``generate``). Rank 5: may import ``spec``, ``_checks``,
``data``, ``reference``, ``ops``, ``safety`` and ``models``; never ``integrations``,
``evaluation``, ``training`` or ``cli``.
"""
from .engine import Engine, GenerationResult, TokenLogprob, Trace, generate

__all__ = ["generate", "Engine", "GenerationResult", "TokenLogprob", "Trace"]
