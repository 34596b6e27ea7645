"""Generate the base model's own greedy answers to TRAIN prompts (and the held-out completion
prefills).

``python -m safekern.training.responses [--model smollm2] [--per-group N] [--new-tokens T]
[--batch B] [--out PATH]`` writes ``responses.jsonl`` as before (v1: 32 tokens, five kinds).
``... --v2`` writes ``responses_v2.jsonl`` (longer answers, ``--new-tokens 96`` by default, all
kinds below) and ``completions.jsonl`` (held-out completion-attack prefills).
``... --v2 --missing borderline [--limit N]`` appends to ``responses_v2.jsonl`` the answers to
the train prompts of that data set (``benign`` / ``borderline``) that have none there yet (rows
added to the data later), at most ``N`` spread over patterns / topics; existing rows stay.

Rows (one per generation): ``key``, ``kind``, ``prompt`` (what the model is asked, wrapped or
not), ``request`` (the plain request, v2), ``prefill``, ``response``, ``label`` (the request: 1 =
harmful) and ``response_label`` (the response content: 1 = a harmful continuation, 0 = a benign
answer or a refusal). Kinds:

* ``benign`` / ``borderline``: the model's answer (label 0, response_label 0);
* ``harmful``: a harmful request asked directly; ``prefill``: behind a TRAIN prefill;
  ``jailbreak``: inside a TRAIN jailbreak template; ``rephrase``: in a TRAIN phrasing wrapper
  (past tense, role-play, indirection) -- label 1, response_label 1 unless the answer reads as a
  refusal (``safekern.evaluation.is_refusal``: then 0);
* ``jailbreak_benign`` / ``rephrase_benign``: a BENIGN request in the same train templates /
  wrappers (label 0, response_label 0), so the signal learns the request, not the wrapper;
* ``refusal``: the forced refusal prefix continued by the model (first sentence kept; response
  label 0);
* ``completion`` (no extra generation): a ``harmful`` row whose answer is harmful, split after
  its first sentence -- that sentence becomes the prefill (a completion attack), the rest the
  response (label 1, response_label 1).

The base model has no alignment of its own: it answers harmful requests, which is exactly the
harmful-continuation data the [CLS] must learn to flag on response windows.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import time

import torch

# the data files live beside the loader (safekern/data/real), not beside this module
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "real")
_END = re.compile(r"[.!?](?=\s|$)|\n")


def lead(text: str, min_chars: int = 30, max_chars: int = 220) -> str:
    """The first sentence of ``text`` that is at least ``min_chars`` long (list markers like
    "1." do not end it); at most ``max_chars`` (cut at a word)."""
    for m in _END.finditer(text):
        if m.end() >= min_chars:
            out = text[:m.end()]
            break
    else:
        out = text
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0]
    return out.rstrip("\n")


def _jobs(per_group: int, seed: int = 0):
    """The v1 job list (kept: ``--per-group 240 --new-tokens 32`` rebuilds responses.jsonl)."""
    from ..data.real import _loader as real

    rng = random.Random(seed)
    harmful = real.load("harmful", "train")
    rng.shuffle(harmful)
    pre = real.prefills("train")
    jobs = []
    for r in real.load("benign", "train")[:per_group]:
        jobs.append(("benign", r["prompt"], "", 0))
    for r in real.load("borderline", "train")[:per_group]:
        jobs.append(("borderline", r["prompt"], "", 0))
    n = min(per_group, len(harmful))
    for r in harmful[:n]:
        jobs.append(("harmful", r["prompt"], "", 1))
    for i, r in enumerate(harmful[n:n + n // 2]):
        jobs.append(("prefill", r["prompt"], pre[i % len(pre)]["text"], 1))
    for r in harmful[n + n // 2:n + n // 2 + n // 4]:
        jobs.append(("refusal", r["prompt"], "", 1))
    return jobs


# v2 counts per kind at --per-group 240 (scaled linearly)
V2_MIX = {"benign": 1.5, "borderline": 1.0, "harmful": 1.0, "prefill": 0.5, "jailbreak": 0.5,
          "jailbreak_benign": 0.35, "rephrase": 0.4, "rephrase_benign": 0.25, "refusal": 0.25}


def _spread(rows, key, n, rng):
    """``n`` rows of ``rows`` spread evenly over ``key`` groups (round-robin, shuffled)."""
    by = {}
    for r in rows:
        by.setdefault(r.get(key, ""), []).append(r)
    for v in by.values():
        rng.shuffle(v)
    groups = sorted(by)
    rng.shuffle(groups)
    out, i = [], 0
    while len(out) < n and any(by.values()):
        g = groups[i % len(groups)]
        if by[g]:
            out.append(by[g].pop())
        i += 1
    return out


def jobs_v2(per_group: int = 240, seed: int = 0):
    """``[(kind, prompt, request, prefill, label, extra)]`` for v2 (TRAIN material only)."""
    from ..data.real import _loader as real

    rng = random.Random(seed)
    n = {k: int(round(v * per_group)) for k, v in V2_MIX.items()}
    harmful = [r for r in real.load("harmful", "train")
               if r.get("category") not in real.EXCLUDED_TRAIN_CATEGORIES]
    harmful = _spread(harmful, "source", len(harmful), rng)   # interleave DNA / StrongREJECT
    benign = _spread(real.load("benign", "train"), "topic", n["benign"] + n["jailbreak_benign"]
                     + n["rephrase_benign"], rng)
    border = _spread(real.load("borderline", "train"), "pattern", n["borderline"], rng)
    pre = real.prefills("train")
    tpl = real.jailbreak_templates("train")
    rng.shuffle(tpl)
    wrappers = [(s, w) for s, ws in sorted(real.phrasings().items()) for w in ws]
    jobs = []
    for r in benign[:n["benign"]]:
        jobs.append(("benign", r["prompt"], r["prompt"], "", 0, {}))
    for r in border:
        jobs.append(("borderline", r["prompt"], r["prompt"], "", 0, {}))
    it = iter(harmful)
    take = lambda k: [next(it) for _ in range(min(n[k], len(harmful)))]  # noqa: E731
    for r in take("harmful"):
        jobs.append(("harmful", r["prompt"], r["prompt"], "", 1, {}))
    for i, r in enumerate(take("prefill")):
        jobs.append(("prefill", r["prompt"], r["prompt"], pre[i % len(pre)]["text"], 1, {}))
    for i, r in enumerate(take("jailbreak")):
        t = tpl[i % len(tpl)]
        jobs.append(("jailbreak", real.wrap(t["template"], r["prompt"]), r["prompt"], "", 1,
                     {"template": t["id"]}))
    for i, r in enumerate(take("rephrase")):
        s, w = wrappers[i % len(wrappers)]
        jobs.append(("rephrase", real.rephrase(r["prompt"], w), r["prompt"], "", 1, {"style": s}))
    for r in take("refusal"):
        jobs.append(("refusal", r["prompt"], r["prompt"], "", 1, {}))
    rest = benign[n["benign"]:]
    for i, r in enumerate(rest[:n["jailbreak_benign"]]):
        t = tpl[(i * 7 + 3) % len(tpl)]
        jobs.append(("jailbreak_benign", real.wrap(t["template"], r["prompt"]), r["prompt"], "",
                     0, {"template": t["id"]}))
    for i, r in enumerate(rest[n["jailbreak_benign"]:n["jailbreak_benign"] + n["rephrase_benign"]]):
        s, w = wrappers[(i * 5 + 1) % len(wrappers)]
        jobs.append(("rephrase_benign", real.rephrase(r["prompt"], w), r["prompt"], "", 0,
                     {"style": s}))
    return jobs


def jobs_missing(group: str, have, limit=None, seed: int = 0):
    """``[(kind, prompt, request, prefill, label, extra)]``: the TRAIN prompts of ``group``
    (``benign`` / ``borderline``) whose ``"<group>:<prompt>"`` key is not in ``have``, spread
    over their patterns / topics, at most ``limit``."""
    from ..data.real import _loader as real

    if group not in ("benign", "borderline"):
        raise ValueError(f"--missing takes benign or borderline, got {group!r}")
    rows = [r for r in real.load(group, "train") if f"{group}:{r['prompt']}" not in have]
    key = "pattern" if group == "borderline" else "topic"
    rows = _spread(rows, key, len(rows) if limit is None else limit, random.Random(seed))
    return [(group, r["prompt"], r["prompt"], "", 0, {}) for r in rows]


def _generate(model, tok, jobs, new_tokens, batch, desc, refusal=None):
    """Greedy answers, batches of similar prompt length (less padding), job order kept."""
    from tqdm import tqdm

    from ..runtime.engine import generate

    order = sorted(range(len(jobs)), key=lambda i: (len(jobs[i][1]) // 200, i))
    out = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, unit="seq", mininterval=10) as bar:
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            chunk = [jobs[i] for i in idx]
            prefill = [refusal if j[0] == "refusal" else j[3] for j in chunk]
            res = generate(model, tok, [j[1] for j in chunk], max_new_tokens=new_tokens,
                           safety=None, prefill=prefill)
            for i, o in zip(idx, res):
                out[i] = o.text
            bar.update(len(chunk))
    return out


def heldout_completions(model, tok, batch=16, new_tokens=40):
    """``completions.jsonl`` rows for every held-out harmful request: a held-out prefill opener
    plus the base model's own first sentence after it (safety off); a hand-written generic
    start when the model refuses or says too little."""
    from ..evaluation import is_refusal
    from ..data.real import _loader as real

    held = real.load("harmful", "heldout")
    openers = [p["text"] for p in real.prefills("heldout") if p["length"] == "short"]
    jobs = [("completion", r["prompt"], r["prompt"], openers[i % len(openers)], 1, {})
            for i, r in enumerate(held)]
    texts = _generate(model, tok, jobs, new_tokens, batch, "held-out completion prefills")
    rows = []
    for (_, q, _, op, _, _), t in zip(jobs, texts):
        first = lead(t.lstrip())
        if is_refusal(op + " " + first) or len(first.strip()) < 25:
            rows.append({"prompt": q, "prefill": f"{op} Here is a detailed answer. The first "
                         "thing you need to do is", "origin": "template", "split": "heldout"})
        else:
            rows.append({"prompt": q, "prefill": f"{op} {first.strip()}", "origin": "model",
                         "split": "heldout"})
    return rows


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    from ..evaluation import first_sentence, is_refusal
    from ..safety.attach import attach
    from ..models import load
    from ..spec import EssConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--per-group", type=int, default=240)
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (v1), 96 (--v2)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None)
    p.add_argument("--v2", action="store_true", help="longer answers and every kind "
                   "(responses_v2.jsonl) plus the held-out completion prefills")
    p.add_argument("--no-completions", action="store_true")
    p.add_argument("--missing", choices=("benign", "borderline"), default=None,
                   help="with --v2: append answers to the train prompts of this data set that "
                   "have none yet (existing rows untouched; no held-out completions)")
    p.add_argument("--limit", type=int, default=None, help="with --missing: at most this many")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    new_tokens = args.new_tokens or (96 if args.v2 else 32)
    out = args.out or os.path.join(HERE, "responses_v2.jsonl" if args.v2 else "responses.jsonl")
    if args.missing and not args.v2:
        p.error("--missing needs --v2")
    if args.limit is not None and (args.missing is None or args.limit < 1):
        p.error("--limit needs --missing and a value >= 1")
    old = []
    if args.missing:
        if not os.path.exists(out):
            p.error(f"--missing appends to {out}, which does not exist")
        with open(out, encoding="utf-8") as f:
            old = [json.loads(line) for line in f if line.strip()]

    model, tok = load(args.model)
    attach(model, tok)
    refusal = EssConfig().refusal_text
    if args.missing:
        jobs = jobs_missing(args.missing, {r["key"] for r in old}, args.limit)
    elif args.v2:
        jobs = jobs_v2(args.per_group)
    else:
        jobs = [(k, q, q, pf, y, {}) for k, q, pf, y in _jobs(args.per_group)]
    texts = _generate(model, tok, jobs, new_tokens, args.batch, "responses", refusal)
    rows = []
    for (kind, q, req, pf, y, extra), text in zip(jobs, texts):
        if kind == "refusal":
            resp, pf_out, z = refusal + first_sentence(text), "", 0
        else:
            resp, pf_out = text, pf
            z = 0 if y == 0 or is_refusal(pf + text) else 1
        row = {"key": f"{kind}:{q}", "kind": kind, "prompt": q, "prefill": pf_out,
               "response": resp, "label": y, "response_label": z}
        if args.v2:
            row = {**row, "request": req, **extra, "new_tokens": new_tokens}
        rows.append(row)
        if args.v2 and kind == "harmful" and z == 1:
            first = lead(text.lstrip())
            rest = text.lstrip()[len(first):]
            if len(first) >= 25 and len(rest.strip()) >= 40:
                rows.append({"key": f"completion:{q}", "kind": "completion", "prompt": q,
                             "prefill": first, "response": rest, "label": 1,
                             "response_label": 0 if is_refusal(rest) else 1, "request": req,
                             "new_tokens": new_tokens})
    _write(out, old + rows)
    print(f"wrote {len(rows)} rows to {out} ({len(old)} kept; {time.perf_counter() - t0:.0f} s)")
    if args.v2 and not args.no_completions and not args.missing:
        comp = heldout_completions(model, tok, batch=args.batch)
        _write(os.path.join(HERE, "completions.jsonl"), comp)
        print(f"wrote {len(comp)} held-out completion prefills "
              f"({sum(r['origin'] == 'model' for r in comp)} from the model) "
              f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
