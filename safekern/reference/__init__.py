"""Pure-PyTorch oracle of every safekern op. Runs on any device. May import ``spec`` and
``_checks`` only: nothing from ``ops`` or above (docs/DESIGN.md §6)."""
from .attention import default_q_pos, ess_attention_ref, ess_visibility, resolve_positions
from .controller import NUM_WINDOWS, escalate, forced_tokens, plan_step, update_state
from .sampling import (Logprobs, filter_logits_ref, head_sample_ref, logprobs_ref, make_generator,
                       probe_score_ref, safety_score_ref, sample_ref)

__all__ = [
    "default_q_pos", "ess_attention_ref", "ess_visibility", "resolve_positions",
    "NUM_WINDOWS", "plan_step", "update_state", "escalate", "forced_tokens",
    "safety_score_ref", "probe_score_ref", "filter_logits_ref", "sample_ref", "head_sample_ref",
    "make_generator",
    "Logprobs", "logprobs_ref",
]
