"""Deprecated alias of ``safekern.model``: moved to :mod:`safekern.safety` (attach, the delta
format, prompt encoding). Every name is forwarded, with a DeprecationWarning, for one release.
"""
from ._checks import deprecated_alias

__getattr__, __dir__ = deprecated_alias(
    __name__, ("safekern.safety.attach", "safekern.safety.config", "safekern.safety.prompts",
               "safekern.safety.delta"), "safekern.safety")
