"""Real-request safety data (see README.md here): harmful requests (Do-Not-Answer and
StrongREJECT train, HarmBench held out), the project's benign and borderline prompts (hand-written,
templated, FreshQA), jailbreak templates, phrasing wrappers, prefill- and completion-attack
strings, GCG suffixes and the base model's own responses. Extracted data files only: no package
that ships them is imported."""
from ._loader import (GROUPS, SPLITS, completions, gcg_suffixes, jailbreak_templates, load,
                      phrasings, prefills, rephrase, responses, training_rows, wrap)
