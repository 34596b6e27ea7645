"""safekern: fused kernels that make an LLM's explicit safety signal (ESS) cheap to leave on.

>>> import safekern
>>> safekern.info()["backends"]["ess_attention"]      # which backends can run here
"""
from .ops import ess_attention, head_sample
from .reference.controller import plan_step
from .spec import EssConfig, EssState, SamplingParams
from ._info import info

__version__ = "0.1.0"

__all__ = ["ess_attention", "head_sample", "plan_step", "EssConfig", "EssState",
           "SamplingParams", "info", "__version__"]
