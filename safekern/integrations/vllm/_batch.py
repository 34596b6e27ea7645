"""The ESS state of every request in one vLLM worker process: where its query and response sit
(``Layout``), its controller state and trace (``Request``), and vLLM's persistent batch as the
logits processor last saw it (``Batch``: row -> request, preempted requests parked).

Two vLLM extension points share it (docs/DESIGN.md "Serving with vLLM"):

* the logits processor (``processor.EssLogitsProcessor``) sees requests join, leave and move
  in vLLM's persistent batch (``BatchUpdate``) with their ``SamplingParams``, and forces the
  refusal tokens in ``apply(logits)``;
* the ESS model (``model.EssLlamaForCausalLM`` and friends) runs, inside vLLM's forward
  context, the step of every ESS request: the controller (``_controller``: the reference
  controller's windows, verdict and forced tokens) and one [CLS] row per evaluating request
  through every layer (``_cls_forward``).

Nothing here imports vLLM. Positions: the state is kept in safekern's layout (docs/DESIGN.md §2:
[CLS] at index 0, so ``P``, ``t``, windows count it), and vLLM's sequence has no [CLS], so a
safekern index ``j >= 1`` is vLLM position ``j - 1``.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ...spec import PENDING, EssConfig

MAX_TRACES = 10000   # traces kept in the worker (oldest dropped)
MAX_PARKED = 4096    # requests kept after leaving the batch (preempted ones come back)


@dataclass
class Layout:
    """Where a vLLM prompt's query and response sit, in safekern indices ([CLS] = 0)."""

    prompt_len: int      # P: the response (prefilled assistant text included) starts here
    query_start: int
    query_end: int


def prompt_layout(ids: List[int], prefix_ids: List[int], suffix_ids: List[int],
                  bos_id: Optional[int]) -> Layout:
    """The layout of a vLLM prompt (token ids, no [CLS]).

    A chat prompt is ``prefix + query + suffix [+ prefilled assistant text]`` (vLLM's
    ``continue_final_message``): the query is what lies between the template prefix and the
    *last* occurrence of the suffix (the generation prompt), the response starts after it.
    Anything else counts as untemplated: the query is every token after a leading BOS and the
    response starts after the prompt — exactly ``safekern.safety.encode_token_ids``.
    """
    n = len(ids)
    qs = len(prefix_ids) if prefix_ids and ids[:len(prefix_ids)] == prefix_ids else None
    if qs is not None and suffix_ids:
        m = len(suffix_ids)
        for j in range(n - m, qs - 1, -1):
            if ids[j:j + m] == suffix_ids:
                return Layout(j + m + 1, qs + 1, j + 1)
    start = 1 if bos_id is not None and n and ids[0] == bos_id else 0
    return Layout(n + 1, start + 1, n + 1)


@dataclass
class Request:
    """One ESS request in the persistent batch (or parked while preempted)."""

    ess: EssConfig
    layout: Layout
    n_prompt: int                 # len(prompt_token_ids) as vLLM holds them
    output: list                  # vLLM's live list of this request's output token ids
    refusal_ids: List[int]
    refusal_skip: int
    eos_id: Optional[int]
    trace_id: Optional[str] = None
    mode: int = PENDING
    flags: int = 0
    switch_step: int = -1
    next_eval: int = 0
    interval: int = 1
    forced_idx: int = -1
    trigger_step: int = -1
    finished: bool = False
    force: Optional[int] = None   # the token apply() forces at this step (None = free)
    trace: dict = field(default_factory=lambda: {"eval_steps": [], "eval_lengths": [],
                                                 "p_unsafe": [], "trigger_step": None,
                                                 "action": None})

    def __post_init__(self):
        self.interval, self.next_eval = self.ess.anneal_start, self.ess.first_at


class Batch:
    """vLLM's persistent batch as the logits processor last saw it: row -> Request."""

    def __init__(self):
        self.rows: Dict[int, Request] = {}
        # Requests that left the batch without finishing (preemption) come back with the same
        # output list: keyed by id() of that list, which stays alive while it is held here.
        self.parked: "collections.OrderedDict[int, Request]" = collections.OrderedDict()
        self.traces: "collections.OrderedDict[str, dict]" = collections.OrderedDict()

    def remove(self, row: int):
        req = self.rows.pop(row, None)
        if req is not None:
            self.parked[id(req.output)] = req
            self.save(req)
            while len(self.parked) > MAX_PARKED:
                self.parked.popitem(last=False)

    def unpark(self, output: list) -> Optional[Request]:
        req = self.parked.pop(id(output), None)
        return req if req is not None and req.output is output else None

    def move(self, a: int, b: int, swap: bool):
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if swap and rb is not None:
            self.rows[a] = rb

    def save(self, req: Request):
        """Write the trace to ``$SAFEKERN_VLLM_TRACE_DIR/<trace_id>.json`` when the operator set
        that directory (the channel that also works behind ``vllm serve``); rewritten at every
        verdict of a traced request and when it leaves the batch."""
        d = os.environ.get("SAFEKERN_VLLM_TRACE_DIR")
        if d and req.trace_id is not None:
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in req.trace_id)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, name[:200] + ".json")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"trace_id": req.trace_id, **req.trace,
                           "output_len": len(req.output)}, f)
            os.replace(tmp, path)     # a reader never sees a half-written file

    def record(self, req: Request):
        if req.trace_id is not None:
            self.traces[req.trace_id] = req.trace
            self.traces.move_to_end(req.trace_id)
            while len(self.traces) > MAX_TRACES:
                self.traces.popitem(last=False)
            self.save(req)


BATCH = Batch()
MODEL = None   # the ESS model of this process (set when vLLM builds it)


__all__ = ["BATCH", "Batch", "Layout", "Request", "prompt_layout"]
