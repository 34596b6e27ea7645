"""Deprecated alias of ``safekern.train``: moved to :mod:`safekern.training` (the full-model
Trainer recipe, safekern.training.trainer, and its collator, safekern.training.collate). Every
name is forwarded, with a DeprecationWarning, for one release.
"""
from ._checks import deprecated_alias

__getattr__, __dir__ = deprecated_alias(__name__, ("safekern.training.trainer",
                                                   "safekern.training.collate"),
                                        "safekern.training")
