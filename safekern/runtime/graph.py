"""CUDA-graph capture of the engine's decode step (``Engine(cuda_graph=True)``, greedy sampling,
non-reference backends): the step reads and writes only device tensors, so one capture over
the full cache length replays every step.
"""
from __future__ import annotations

import warnings

import torch


def capture_graph(eng):
    """Capture ``_decode_step`` over the full cache length; None if capture fails."""
    tensors = [eng._tok, eng._done, eng._step_idx, eng._out_tok, eng._out_emit,
               eng._reason_refusal, eng._nonfinite]
    if eng._sampling.logprobs is not None:
        tensors += [eng._out_lp, eng._out_top_ids, eng._out_top_lp]
    if eng._ess is not None:
        tensors += eng.state.tensors() + [
            eng._out_p, eng._out_ev, eng._out_t, eng._logit]
    saved = [t.clone() for t in tensors]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eng._decode_step(eng.Lmax)                                  # warm-up (allocator)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(tensors, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eng._decode_step(eng.Lmax)
    except RuntimeError as e:  # e.g. a backend that synchronises (the torch reference)
        warnings.warn(f"CUDA-graph capture of the decode step failed ({e}); running eagerly")
        graph = None
    # Warm-up and capture touched the state; the [CLS]/token cache writes they made are
    # recomputed identically by the first real step, so restoring the small tensors suffices.
    for t, s in zip(tensors, saved):
        t.copy_(s)
    return graph
