"""``safekern train --model NAME``: the whole run on a pretrained model — load, attach, train
(the linear head on the frozen [CLS] row, or the [CLS] adapter), calibrate the operating point
on the validation split, fit the cascade's screening probe, save the delta.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Dict, Optional, Sequence

import torch

from ..data.real import training_rows
from ..safety.delta import save_safety
from ..spec import EssConfig
from .adapter import VAL_SPLITS
from .frozen import train_frozen


def train_real(name: str = "smollm2", out_dir: Optional[str] = None, *,
               response_windows: bool = False, cls_position: str = "last", rank: int = 16,
               epochs: Optional[int] = None, max_minutes: Optional[float] = None,
               max_sequences: Optional[int] = None, progress: bool = True,
               features_cache: Optional[str] = None, calibrate: bool = True,
               probe: bool = True, lr: Optional[float] = None, probe_unit: str = "window",
               val_split: str = "prompt", seed: int = 0, log=print) -> Dict:
    """``safekern train --model NAME``: load the model, attach, train, save the delta only.

    ``rank > 0``: the [CLS] adapter recipe (``safekern.training.adapter``), on every window kind;
    ``rank == 0``: the linear head on the frozen [CLS] row (query windows unless
    ``response_windows``). The delta records the operating point ``DEFAULT_OPERATING_POINT``,
    with an adapter its threshold and tau chosen on the validation split
    (``calibrate_operating_point``; ``calibrate=False`` keeps 0.5 and 3), and with ``probe``
    the cascade's screening probe fitted on the same rows and split
    (``safekern.training.probe_fit.fit_probe``; the token rows are the frozen model's, so it does not
    depend on the adapter).
    ``name``: a ``safekern.models`` key or a local checkpoint (directory or ``.gguf``);
    ``max_sequences``: train on a seeded sample of this many sequences (smoke runs);
    ``lr``: the adapter's learning rate (the head's is ``3 * lr``; default the recipe's);
    ``val_split``: the validation split of the adapter, its calibration and the probe
    (``safekern.training.adapter.split_rows``: ``"prompt"`` or ``"pattern"``);
    ``seed``: the adapter recipe's seed (initialisation, window sampling and order, and which
    prompts the validation split holds); 0 is the shipped recipe's.
    """
    from .. import models
    from ..safety.attach import attach

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    if lr is not None and (rank == 0 or isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not lr > 0):
        raise ValueError(f"lr must be a positive number and needs rank > 0 (the adapter "
                         f"recipe), got lr={lr!r}, rank={rank}")
    if probe_unit not in ("window", "answer"):
        raise ValueError(f"probe_unit must be 'window' or 'answer', got {probe_unit!r}")
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {val_split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if seed != 0 and rank == 0:
        raise ValueError(f"seed applies to the adapter recipe (rank > 0), got seed={seed}, "
                         "rank=0")
    if val_split != "prompt" and rank == 0:
        raise ValueError(f"val_split applies to the adapter recipe (rank > 0), got "
                         f"val_split={val_split!r}, rank=0")
    if probe_unit != "window" and (rank == 0 or not probe):
        raise ValueError("probe_unit applies to the screening probe, which the adapter recipe "
                         f"(rank > 0, probe=True) fits; got rank={rank}, probe={probe}")
    torch.manual_seed(seed)
    model, tok = models.load(name)
    attach(model, tok, response_sees_cls=False, cls_position=cls_position)
    rows = training_rows("train")
    if max_sequences is not None:
        import random

        rows = random.Random(0).sample(rows, min(max_sequences, len(rows)))
    if rank == 0:
        summary = train_frozen(model, tok, rows, response_windows=response_windows,
                               progress=progress, features_cache=features_cache, log=log)
    else:
        from .adapter import AdapterRecipe, split_rows, train_adapter

        kw = {} if epochs is None else {"epochs": epochs}
        if lr is not None:
            kw.update(lr=float(lr), head_lr=3.0 * float(lr))
        max_seconds = None if max_minutes is None else 60.0 * max_minutes
        rc = AdapterRecipe(rank=rank, alpha=2.0 * rank, val_split=val_split, seed=seed,
                           max_seconds=max_seconds, **kw)
        summary = train_adapter(model, tok, rows, rc, progress=progress, log=log)
        op = DEFAULT_OPERATING_POINT
        if calibrate:
            op, summary["calibration"] = calibrate_operating_point(
                model, tok, split_rows(rows, rc.val_fraction, rc.seed, rc.val_split)[1], rc,
                log=log)
        model.safekern.operating_point = op
        if probe:
            from .probe_fit import ProbeDataError, fit_probe

            try:
                summary["probe"] = fit_probe(model, tok, rows, r2=rc.r2,
                                             val_fraction=rc.val_fraction, seed=rc.seed,
                                             unit=probe_unit, threshold=op.threshold,
                                             tau=op.tau, val_split=rc.val_split,
                                             progress=progress, log=log)
            except ProbeDataError as e:          # e.g. a --max-sequences smoke run
                summary["probe"] = {"skipped": str(e)}
                if log is not None:
                    log(f"screening probe not fitted (the delta has none): {e}")
    out_dir = out_dir or default_delta_dir(name)
    save_safety(model, out_dir)
    summary["out_dir"] = out_dir
    return summary


# The operating point a trained adapter delta records (``generate(safety="auto")``): every-step
# evaluation, and a refusal that stops (``high``) and ends as a sentence, so a forced refusal
# is never followed by the frozen model drifting back into compliance.
DEFAULT_OPERATING_POINT = EssConfig(schedule="each", policy="high",
                                    refusal_text="Sorry, I can't help with that.")


def calibrate_operating_point(model, tokenizer, val_rows: Sequence[Dict], rc=None, *,
                              max_miss: float = 0.02, log=print):
    """``(EssConfig, summary)``: ``DEFAULT_OPERATING_POINT`` with the threshold and tau that
    ``safekern.training.calibration.calibrate`` picks on ``val_rows`` for the recipe's windows."""
    from .calibration import calibrate

    t0 = time.perf_counter()
    w = dict(r1=10, r2=10, r3=10) if rc is None else dict(r1=rc.r1, r2=rc.r2, r3=rc.r3)
    chosen, table = calibrate(model, tokenizer, val_rows, max_miss=max_miss, **w)
    op = dataclasses.replace(DEFAULT_OPERATING_POINT, threshold=chosen["threshold"],
                             tau=chosen["tau"], **w)
    if log is not None:
        log("calibration (validation split; false = label-0 rows flagged, miss = harmful "
            "answers never flagged):")
        for r in table:
            log(f"  threshold {r['threshold']:.2f} tau {r['tau']}: false {r['false']:.3f} "
                f"miss {r['miss']:.3f}" + ("   <- chosen" if r is chosen else ""))
    degenerate = chosen["false"] >= DEGENERATE_FALSE
    if degenerate:
        warnings.warn(
            f"calibration: the best operating point (threshold {chosen['threshold']:.2f}, tau "
            f"{chosen['tau']}) still refuses {100 * chosen['false']:.0f}% of the benign and "
            f"borderline validation rows (miss {100 * chosen['miss']:.0f}%): this delta does "
            f"not separate harmful from benign requests and would refuse most benign use. Do "
            f"not ship it; check the training loss and the validation AUCs logged above.",
            RuntimeWarning, stacklevel=2)
    return op, {"chosen": chosen, "table": table, "rows": len(val_rows),
                "seconds": round(time.perf_counter() - t0, 1), "degenerate": degenerate}


# A calibrated point that still flags at least this share of label-0 validation rows is a
# delta that does not separate the classes (measured: Qwen2.5-Coder-1.5B after a degenerate
# training, AUC 0.50, was calibrated to threshold 0.5 / tau 1 with every benign row flagged).
DEGENERATE_FALSE = 0.5


def default_delta_dir(name: str) -> str:
    """Where ``safekern train --model NAME`` writes by default (the shipped delta is read-only)."""
    from ..models import trained_delta_dir

    return trained_delta_dir(name)


__all__ = ["train_real", "calibrate_operating_point", "default_delta_dir",
           "DEFAULT_OPERATING_POINT", "DEGENERATE_FALSE"]
