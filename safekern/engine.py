"""Deprecated alias of ``safekern.engine``: moved to :mod:`safekern.runtime` (the batched
strategic-decoding engine). Every name is forwarded, with a DeprecationWarning, for one release.
"""
from ._checks import deprecated_alias

__getattr__, __dir__ = deprecated_alias(
    __name__, ("safekern.runtime.engine", "safekern.runtime.arch", "safekern.runtime.cache",
               "safekern.runtime.forward", "safekern.runtime.controller",
               "safekern.runtime.graph", "safekern.runtime.results"), "safekern.runtime")
