"""Real-request safety data (see README.md here): harmful requests (Do-Not-Answer train,
HarmBench held out), the project's benign and borderline prompts, prefill-attack strings, GCG
suffixes and the base model's own responses. Extracted data files only: no package that ships
them is imported."""
from ._loader import (GROUPS, SPLITS, gcg_suffixes, load, prefills, responses,  # noqa: F401
                      training_rows)
