"""Deprecated alias of ``safekern.recipe``: moved to :mod:`safekern.training` (the frozen-LM
recipe, safekern.training.frozen). Every name is forwarded, with a DeprecationWarning, for one
release.
"""
from ._checks import deprecated_alias

__getattr__, __dir__ = deprecated_alias(__name__, ("safekern.training.frozen", "safekern.training.real"), "safekern.training")
