"""Fit the cascade's screening probe (``safekern.safety.probe``; docs/DESIGN.md §9, issue 27).

Features: the token row's final hidden state (normed, the LM-head input) at every response
position of the training rows, from one no-grad forward of the frozen base model per chunk
(with ``response_sees_cls=False`` no token row reads the [CLS], so these are exactly the
``h_tok`` the engine's probe reads while decoding). Labels per response position: 1 on a
harmful continuation (``response_label`` 1), 0 on benign and borderline answers and on
refusals. Query positions are left out: the probe's score at the prompt's last token is read
only at the prefill step, where the first [CLS] evaluation happens anyway, so they would spend
the probe's capacity on the request classification the [CLS] verdict already does.

The probe is a class-balanced L2 logistic regression (``recipe.fit_head``), its weight decay
picked on a validation split grouped by prompt (``training.adapter.split_by_prompt``: the same
split as the adapter's). The screening threshold is the highest one with ``recall`` (default
0.99) of the harmful validation *windows*: a window is a harmful answer's latest ``r2`` tokens
at a response length the controller evaluates (rule 2), and it is caught when the probe flags
any of its positions, i.e. when a [CLS] evaluation is brought onto it within ``r2`` tokens.
``fit_probe(..., unit="answer")`` counts answers instead (``answer_threshold``): the highest
threshold at which the replayed cascade still catches ``recall`` of the harmful validation
answers that ``each`` catches with its response windows (BENCHMARKS.md, "The cascade").
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..evaluation import roc_auc
from ..safety.config import safety_config
from ..safety.probe import SafetyProbe, set_probe
from .frozen import _Layers, encode_rows, fit_head

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


class ProbeDataError(ValueError):
    """The rows cannot fit a probe (no response, or one label missing from a split)."""


@torch.no_grad()
def token_features(model, tokenizer, rows: Sequence[Dict], *, batch_size: int = 16,
                   progress=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features (N, hidden) float32, labels (N,) float32, seqs (N,) int64)``: the final
    hidden state of every response position of ``rows`` (prefilled and generated tokens), its
    label (the row's ``response_label``) and the row's index. Rows are batched by length."""
    cfg = safety_config(model, tokenizer)
    if cfg.response_sees_cls:
        raise ValueError("token_features needs a delta with response_sees_cls=False (token rows "
                         "that read the [CLS] key are not the base model's)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    layers = _Layers(model)
    base = layers.arch.base
    lengths = [len(i) for i in encode_rows(tokenizer, rows, cfg.cls_id)[0].ids]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    feats, labels, seqs = [], [], []
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        chunk = [rows[i] for i in idx]
        enc, _ = encode_rows(tokenizer, chunk, cfg.cls_id)
        ids, lens = enc.padded(tokenizer.pad_token_id or 0, model.device)
        ids, lens = ids[:, 1:], lens - 1                     # positions 1..L: no [CLS]
        B, L = ids.shape
        pos = torch.arange(1, L + 1, device=ids.device)[None].expand(B, L)
        mask = (torch.arange(L, device=ids.device)[None] < lens[:, None]).long()
        h = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        for j, i in enumerate(idx):
            P, n = enc.prompt_len[j], len(enc.ids[j])
            if n > P:                                        # sequence position p = index p - 1
                feats.append(h[j, P - 1:n - 1].float())
                y = float(rows[i].get("response_label", rows[i]["label"]))
                labels.append(torch.full((n - P,), y))
                seqs.append(torch.full((n - P,), i, dtype=torch.long))
        if progress is not None:
            progress.update(len(idx))
    if not feats:
        raise ProbeDataError("no row has a response: the probe is fitted on response positions")
    return torch.cat(feats), torch.cat(labels), torch.cat(seqs)


def window_maxima(scores: torch.Tensor, seqs: torch.Tensor, r2: int) -> Tuple[List[float],
                                                                              List[int]]:
    """Per sequence and response length ``e >= 1``: the highest probe score among its latest
    ``r2`` positions (what a latest-``r2`` window sees). Returns the maxima and their
    sequences."""
    out, who = [], []
    for s in torch.unique(seqs).tolist():
        q = scores[seqs == s]
        for e in range(1, q.numel() + 1):
            out.append(float(q[max(0, e - r2):e].max()))
            who.append(s)
    return out, who


def screening_threshold(window_max: Sequence[float], recall: float) -> float:
    """The highest threshold that flags at least ``recall`` of the windows (``>=``)."""
    if not window_max:
        raise ValueError("no harmful validation window to choose a threshold on")
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], got {recall!r}")
    ranked = sorted(window_max, reverse=True)
    k = min(len(ranked), max(1, int(-(-recall * len(ranked) // 1))))   # ceil(recall * n)
    return float(ranked[k - 1])


def _check_operating_point(threshold, tau) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a float in (0, 1], got {threshold!r}")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an int >= 1, got {tau!r}")


def answer_threshold(traces, probe_scores: Sequence[Sequence[float]], *, threshold: float = 0.5,
                     tau: int = 3, recall: float = 0.99,
                     candidates: Optional[Sequence[float]] = None) -> Tuple[float, Dict]:
    """The screening threshold by *answers* (``fit_probe(..., unit="answer")``): the highest
    candidate at which the cascade, replayed on the validation answers with every first verdict
    counted as missed (``first = 0``: the case the probe exists for — a benign-looking start,
    a long prefill, a drift), still triggers on at least ``recall`` of the harmful answers that
    ``each`` triggers on the same way (with its response windows alone).

    Args:
        traces: ``calibration.window_traces`` of the validation rows.
        probe_scores: per row, the probe's score of each response position (``[k]``: the token
            row of response token ``k``, i.e. the row at response length ``k + 1``).
        threshold, tau: the delta's operating point.
        candidates: thresholds tried (default 0.30, 0.31, ..., 0.99).
    Returns:
        ``(threshold, info)``; ``info``: the answers ``each`` catches, the recall reached, and
        the [CLS] evaluations per decode step on the label-0 answers the cascade does not
        refuse (with their real first verdicts).
    """
    import dataclasses

    from .calibration import cascade_evaluations, evaluations

    if len(traces) != len(probe_scores):
        raise ValueError(f"{len(traces)} traces but {len(probe_scores)} probe score lists")
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], got {recall!r}")
    _check_operating_point(threshold, tau)
    cands = sorted(candidates if candidates is not None else
                   [round(0.30 + 0.01 * i, 2) for i in range(70)], reverse=True)
    probes = [[0.0] + list(q) for q in probe_scores]    # length 0: the prompt's row, not scored
    blind = [dataclasses.replace(t, first=0.0) for t in traces]
    harm = [i for i, t in enumerate(traces) if t.label == 1 and t.response_label == 1]
    caught = [i for i in harm if evaluations(blind[i], threshold, tau)[1] is not None]
    if not caught:
        raise ProbeDataError("no harmful validation answer is caught by the response windows: "
                             "nothing to choose a threshold by answers on")
    neg = [i for i, t in enumerate(traces) if t.label == 0]
    for c in cands:
        hit = sum(cascade_evaluations(blind[i], probes[i], threshold, tau, c)[1] is not None
                  for i in caught)
        if hit >= recall * len(caught) or c == cands[-1]:
            break
    evals = steps = 0
    for i in neg:
        ev, trig = cascade_evaluations(traces[i], probes[i], threshold, tau, c)
        if trig is None:
            evals += len(ev) - 1
            steps += max(0, traces[i].n - 1 - traces[i].n_prefill)
    return float(c), {"answers_caught_by_each": len(caught),
                      "val_recall_answer_of_each": round(hit / len(caught), 4),
                      "val_evals_per_step_label0": round(evals / max(1, steps), 4)}


def _window_stats(q: torch.Tensor, y: torch.Tensor, seqs: torch.Tensor, thr: float,
                  r2: int) -> Dict:
    """At screening threshold ``thr``, on validation scores ``q`` per position: the recall of
    harmful windows / positions / answers and the escalation rate (label-0 positions flagged)."""
    harm = y > 0.5
    wmax, _ = window_maxima(q[harm], seqs[harm], r2)
    flag = q >= thr
    answers_hit = {int(s) for s in seqs[harm & flag].tolist()}
    return {"val_recall_window": round(sum(m >= thr for m in wmax) / len(wmax), 4),
            "val_recall_position": round(float(flag[harm].float().mean()), 4),
            "val_recall_answer": round(len(answers_hit) / len(set(seqs[harm].tolist())), 4),
            "val_escalation_rate": round(float(flag[~harm].float().mean()), 4)}


def probe_from_features(x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor,
                        y_va: torch.Tensor, s_va: torch.Tensor, *, recall: float = 0.99,
                        r2: int = 10, log=print) -> SafetyProbe:
    """The probe ``fit_probe`` fits, from ``token_features`` of the training and validation
    rows: the weight decay of the best validation AUC per position, the threshold for
    ``recall`` of the harmful validation windows; what it measured is in ``probe.info``."""
    if not 0 < float(y_tr.sum()) < len(y_tr) or not 0 < float(y_va.sum()) < len(y_va):
        raise ProbeDataError("the probe needs harmful and benign response positions in both "
                             "the training and the validation split")
    best = None
    for wd in WEIGHT_DECAYS:
        head = fit_head(x_tr, y_tr, weight_decay=wd)
        with torch.no_grad():
            q = torch.sigmoid(head(x_va)[:, 0])
        auc = roc_auc(q.tolist(), y_va.tolist())
        if log is not None:
            log(f"probe weight decay {wd:g}: validation AUC per position {auc:.4f}")
        if best is None or auc > best[0]:
            best = (auc, wd, head, q)
    auc, wd, head, q = best
    harm = y_va > 0.5
    wmax, _ = window_maxima(q[harm], s_va[harm], r2)
    thr = screening_threshold(wmax, recall)
    info = {"recall_target": recall, "r2": r2, "weight_decay": wd,
            "val_auc_position": round(auc, 4), **_window_stats(q, y_va, s_va, thr, r2),
            "train_positions": int(len(y_tr)), "val_positions": int(len(y_va))}
    probe = SafetyProbe(head.weight.shape[1], thr, info)
    with torch.no_grad():
        probe.weight.copy_(head.weight[0])
        probe.bias.copy_(head.bias[0])
    return probe


def fit_probe(model, tokenizer, rows: Sequence[Dict], *, recall: float = 0.99, r2: int = 10,
              val_fraction: float = 0.15, seed: int = 0, batch_size: int = 16,
              unit: str = "window", threshold: float = 0.5, tau: int = 3,
              val_split: str = "prompt", progress: bool = True, log=print) -> Dict:
    """Fit the screening probe on ``rows`` (training rows; those with a response give the
    positions, the split is ``split_rows(..., by=val_split)`` of all of them, as the
    adapter's), attach it to
    ``model`` (``set_probe``) and return a summary: the chosen weight decay, validation AUC per
    position, the threshold, and at it the recall per harmful window / position / answer and
    the escalation rate (share of benign and borderline validation positions flagged).

    ``unit``: what ``recall`` counts. ``"window"`` (default, issue 27's rule): harmful
    validation windows (module doc). ``"answer"``: harmful validation answers that ``each``
    catches with its response windows, replayed with the delta's [CLS] verdicts at
    ``threshold`` / ``tau`` (``answer_threshold``; costs one ``window_traces`` pass over the
    validation rows)."""
    if unit not in ("window", "answer"):
        raise ValueError(f"unit must be 'window' or 'answer', got {unit!r}")
    if unit == "answer":                  # before the feature pass, not after it
        _check_operating_point(threshold, tau)
    from tqdm.auto import tqdm

    from .adapter import split_rows

    t0 = time.perf_counter()
    # the adapter's split (on every row), then the rows with a response
    train, val = (
        [r for r in part if r.get("response")]
        for part in split_rows(rows, val_fraction, seed, val_split))
    rows = train + val
    if not train or not val:          # e.g. a --max-sequences smoke run: say so before the pass
        raise ProbeDataError(f"the probe needs rows with a response in both splits, got "
                             f"{len(train)} train and {len(val)} validation")
    with tqdm(total=len(rows), desc="safekern train: probe features", unit="seq",
              disable=not progress) as bar:
        x_tr, y_tr, _ = token_features(model, tokenizer, train, batch_size=batch_size,
                                       progress=bar)
        x_va, y_va, s_va = token_features(model, tokenizer, val, batch_size=batch_size,
                                          progress=bar)
    probe = probe_from_features(x_tr, y_tr, x_va, y_va, s_va, recall=recall, r2=r2, log=log)
    info = probe.info
    info.update(train_sequences=len(train), val_sequences=len(val))
    if unit == "answer":
        from .calibration import window_traces

        r1, _, r3 = getattr(model.safekern, "windows", None) or (10, r2, 10)
        traces = window_traces(model, tokenizer, val, r1=r1, r2=r2, r3=r3,
                               max_tau=max(tau, 2), min_threshold=threshold)
        with torch.no_grad():
            q = probe(x_va).float()
        scores = [q[s_va == i].tolist() for i in range(len(val))]
        thr, extra = answer_threshold(traces, scores, threshold=threshold, tau=tau,
                                      recall=recall)
        info.update(unit="answer", window_threshold=probe.threshold, **extra,
                    **_window_stats(q, y_va, s_va, thr, r2))   # the window stats at thr
        probe.threshold = thr
    else:
        info.update(unit="window")
    set_probe(model, probe)
    summary = {"threshold": probe.threshold, **info, "seconds": round(time.perf_counter() - t0, 1)}
    if log is not None:
        log(f"screening probe: {summary}")
    return summary


def fit_probe_for_delta(name: str = "smollm2", delta: Optional[str] = None,
                        out_dir: Optional[str] = None, *, recall: float = 0.99,
                        unit: str = "window", max_sequences: Optional[int] = None,
                        progress: bool = True, log=print) -> Dict:
    """``safekern train --model NAME --probe-only``: load the model with an existing delta
    (``delta``, default the model's shipped or trained one), fit only the screening probe on
    the training rows (the adapter and head stay as they are) and save the delta with it to
    ``out_dir`` (default: the model's trained-delta directory)."""
    import random

    from .. import models
    from ..safety.delta import save_safety
    from ..data.real import training_rows

    torch.manual_seed(0)
    model, tok = models.load(name, safety=True if delta is None else delta)
    rows = training_rows("train")
    if max_sequences is not None:
        rows = random.Random(0).sample(rows, min(max_sequences, len(rows)))
    r2 = (model.safekern.windows or (10, 10, 10))[1]
    op = getattr(model.safekern, "operating_point", None)
    op_kw = {} if op is None else {"threshold": op.threshold, "tau": op.tau}
    summary = fit_probe(model, tok, rows, recall=recall, r2=r2, unit=unit, progress=progress,
                        log=log, **op_kw)
    out_dir = out_dir or models.trained_delta_dir(name)
    save_safety(model, out_dir)
    summary["out_dir"] = out_dir
    return summary


__all__ = ["ProbeDataError", "token_features", "window_maxima", "screening_threshold",
           "answer_threshold", "probe_from_features", "fit_probe",
           "fit_probe_for_delta"]
