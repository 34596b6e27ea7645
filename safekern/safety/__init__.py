"""The safety delta on a transformers causal LM: ``attach`` (the [CLS] token, the safety head),
the [CLS] adapter (``adapter``), the cascade's screening probe (``probe``), the delta's files
(``save_safety`` / ``load_safety``) and the prompt encoding that puts the [CLS] in place.

May import ``spec``, ``reference`` and ``ops`` only: never the engine, training, evaluation or
the integrations (they all build on this).
"""
from .prompts import EncodedPrompts, encode_inputs, encode_prompts
from .config import SafetyConfig, safety_config
from .attach import attach
from .delta import load_safety, save_safety

__all__ = ["attach", "save_safety", "load_safety", "SafetyConfig", "EncodedPrompts",
           "encode_prompts", "encode_inputs", "safety_config"]
