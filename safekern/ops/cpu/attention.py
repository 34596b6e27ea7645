"""ESS attention for CPU decode steps as one C++ call per layer (issue 11).

``decode_attention(q, k, v, ...)`` computes ``safekern.reference.ess_attention_ref`` for a few
fp32 query rows (``Lq <= MAX_ROWS``) against a KV cache: the ESS visibility rules are read as key
ranges straight from ``q_pos`` / ``seqlens_k`` / ``response_start`` / ``cls_windows`` instead of
a dense ``(B, Lq, Lk)`` mask (the torch path builds one per forward, ~20 small ops), and each
``(batch row, KV head)`` reads its visible keys once for its query heads (no SDPA transposes or
GQA expansion). A row's result does not depend on the other rows, so a decode step's token row
is bitwise the same with and without a [CLS] row beside it.

The ``torch`` backend of ``safekern.ess_attention`` takes it for CPU fp32 inference calls with
``seqlen_q <= MAX_ROWS`` when the C++ extension is available (it is built with
``safekern.ops.cpu.linear``; ``SAFEKERN_CPU_LINEAR=0`` disables both), and falls back to the
reference whenever the op flags a non-finite logit or output, so the NaN rules stay the
reference's. ``tests/test_cpu_attention.py`` checks it against the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import linear as cpu_linear

MAX_ROWS = 8          # query rows per sequence; above it (prefill) SDPA's tiled kernel is faster


def unavailable_reason() -> Optional[str]:
    """None when the op can run, else why not (the ``cpu_linear`` extension's reason)."""
    return cpu_linear.unavailable_reason()


def can_take(q: torch.Tensor) -> bool:
    """Does a call with this ``q`` go to the C++ op (CPU, fp32, ``Lq <= MAX_ROWS``, built)?"""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.dim() == 4
            and q.shape[1] <= MAX_ROWS and (cpu_linear._loaded or unavailable_reason() is None))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
                     causal: bool, q_pos: torch.Tensor, seqlens_k: torch.Tensor,
                     response_start: Optional[torch.Tensor] = None,
                     cls_windows: Optional[torch.Tensor] = None,
                     key_bias: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """``(o (B, Lq, Hq, D), lse (B, Hq, Lq), bad)``; ``bad``: a logit was NaN or ``+inf`` or an
    output element is not finite (then ``o``/``lse`` are not the reference's: run it instead).

    Inputs as ``ess_attention``'s, already resolved: int32 ``q_pos (B, Lq)`` and
    ``seqlens_k (B,)``, values in range (the public function validates them); ``q``/``k``/``v``
    float32 CPU tensors with a unit-stride head dim (other strides are read as they are)."""
    if not cpu_linear._loaded:
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"the CPU decode attention cannot run: {why}")
    return torch.ops.safekern_cpu.ess_decode_attention(
        q, k, v, float(softmax_scale), bool(causal), q_pos, seqlens_k, response_start,
        cls_windows, key_bias)
