"""Safety evaluation of an ESS model on held-out real requests (benchmarks/eval_safety.py,
``safekern demo --model``): ``judging`` (the documented keyword refusal judge and ROC AUC) and
``heldout`` (the held-out cases, generations per configuration, the summary row, the first
verdict's AUC, answer NLL); ``bench`` and ``bench_report`` (``safekern bench``: timing, then
targets, verdicts, table and plot) and ``bench_vllm`` (vLLM with the plugin). The judge's and
the held-out set's names are re-exported here (``from safekern.evaluation import judge``).
May import ``spec`` … ``integrations`` and ``data``; never ``training`` or ``cli``.
"""
from .heldout import (BENIGN_KINDS, HARMFUL_KINDS, Case, Outcome, answer_nll,
                      first_verdict_auc, heldout_cases, over_refusal_by_detail, run_config,
                      summarize)
from .judging import (COMPLIANCE_MARKERS, REFUSAL_PHRASES, attack_succeeded,
                      first_sentence, is_refusal, judge, roc_auc)

__all__ = ["judge", "is_refusal", "attack_succeeded", "first_sentence", "roc_auc",
           "REFUSAL_PHRASES", "COMPLIANCE_MARKERS", "HARMFUL_KINDS", "BENIGN_KINDS", "Case",
           "heldout_cases", "Outcome", "run_config", "summarize", "first_verdict_auc",
           "over_refusal_by_detail", "answer_nll"]
