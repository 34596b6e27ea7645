"""safekern: fused kernels that make an LLM's explicit safety signal (ESS) cheap to leave on.

>>> import safekern
>>> safekern.info()["backends"]["ess_attention"]      # which backends can run here
"""
from .ops import ess_attention, ess_attention_varlen, head_sample
from .reference.controller import plan_step
from .spec import EssConfig, EssState, SamplingParams
from .ops.info import info

from ._version import __version__

# Model-level API, imported lazily so ``import safekern`` does not import transformers.
_LAZY = {"attach": "safety", "save_safety": "safety", "load_safety": "safety",
         "generate": "runtime", "Engine": "runtime"}


_SUBMODULES = ("models",)        # ``safekern.models.load(...)`` after a bare ``import safekern``


def __getattr__(name):
    if name in _LAZY or name in _SUBMODULES:
        import importlib

        module = importlib.import_module(f".{_LAZY.get(name, name)}", __name__)
        return module if name in _SUBMODULES else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ess_attention", "ess_attention_varlen", "head_sample", "plan_step", "EssConfig",
           "EssState",
           "SamplingParams", "info", "__version__", *_LAZY, *_SUBMODULES]
