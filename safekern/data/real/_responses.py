"""Generate ``responses.jsonl``: the base model's own greedy answers to the train prompts.

``python -m safekern.data.real._responses [--model smollm2] [--per-group N]`` (CPU, ~10 min).

Rows (one per generation): ``key``, ``kind`` (``benign`` / ``borderline`` / ``harmful`` /
``prefill`` / ``refusal``), ``prompt``, ``prefill``, ``response``, ``label`` (the request: 1 =
harmful) and ``response_label`` (the response content: 1 = a harmful continuation, 0 = a benign
answer or a refusal). The base model has no alignment of its own: it answers harmful requests,
which is exactly the harmful-continuation data the [CLS] must learn to flag on response windows.
A response that reads as a refusal (``safekern.evaluation.is_refusal``) gets response_label 0.
``refusal`` rows are the model continuing the forced refusal prefix (first sentence only), in
its own voice.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch


def _jobs(per_group: int, seed: int = 0):
    from . import _loader as real

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


def main(argv=None):
    from ...engine import generate
    from ...evaluation import first_sentence, is_refusal
    from ...model import attach
    from ...models import load
    from ...spec import EssConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--per-group", type=int, default=240)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "responses.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from tqdm import tqdm

    model, tok = load(args.model)
    attach(model, tok)
    refusal = EssConfig().refusal_text
    jobs = _jobs(args.per_group)
    rows = []
    with tqdm(total=len(jobs), desc="responses", unit="seq") as bar:
        for b0 in range(0, len(jobs), args.batch):
            chunk = jobs[b0:b0 + args.batch]
            prefill = [refusal if k == "refusal" else pf for k, _, pf, _ in chunk]
            outs = generate(model, tok, [q for _, q, _, _ in chunk], max_new_tokens=args.new_tokens,
                            safety=None, prefill=prefill)
            for (kind, q, pf, y), o in zip(chunk, outs):
                if kind == "refusal":
                    resp, pf_out, z = refusal + first_sentence(o.text), "", 0
                else:
                    resp, pf_out = o.text, pf
                    z = 0 if y == 0 or is_refusal(pf + o.text) else 1
                rows.append({"key": f"{kind}:{q}", "kind": kind, "prompt": q, "prefill": pf_out,
                             "response": resp, "label": y, "response_label": z})
            bar.update(len(chunk))
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
