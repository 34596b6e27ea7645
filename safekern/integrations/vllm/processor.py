"""The vLLM v1 logits processor of the ESS plugin: request bookkeeping and forced tokens.

vLLM builds it in every worker (entry point ``vllm.logits_processors``, installed with
safekern). For a model that is not an ESS checkpoint it does nothing. For an ESS model it
tracks which request sits in which row of the persistent batch (``update_state``), and forces
the token the ESS step chose (``apply``); the step itself runs in the model's forward
(``_controller.plan`` / ``commit`` around the [CLS] rows, ``_cls_forward``), because only there
are the hidden states and the KV cache at hand.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from . import _batch, request_options


class EssLogitsProcessor(LogitsProcessor):
    """Per-request ESS decisions inside vLLM's scheduler (see ``safekern.integrations.vllm``)."""

    @classmethod
    def validate_params(cls, sampling_params):
        request_options(sampling_params.extra_args, None)   # raises ValueError on bad keys

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.batch = _batch.BATCH
        self.batch.rows.clear()

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        model = _batch.MODEL
        if batch_update is None or model is None:
            return
        b = self.batch
        for row in batch_update.removed:
            b.remove(row)
        for row, params, prompt_ids, output_ids in batch_update.added:
            b.remove(row)                     # an added request may replace the row's occupant
            req = b.unpark(output_ids)
            if req is None:
                req = model.ess_request(params, prompt_ids, output_ids)
            if req is not None:
                b.rows[row] = req
        for a, c, how in batch_update.moved:
            b.move(a, c, swap=how == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        forced = [(r, q.force) for r, q in self.batch.rows.items()
                  if q.force is not None and r < logits.shape[0]]
        if forced:
            rows = torch.tensor([r for r, _ in forced], device=logits.device)
            toks = torch.tensor([t for _, t in forced], device=logits.device)
            logits[rows] = -float("inf")
            logits[rows, toks] = 0.0
            for r, _ in forced:               # one step's decision: never applied twice
                self.batch.rows[r].force = None
        return logits
