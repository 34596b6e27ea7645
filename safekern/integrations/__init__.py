"""Integrations with model libraries. Each submodule imports its library lazily.

``safekern.integrations.hf``: ``attn_implementation="safekern"`` for transformers models;
``safekern.integrations.vllm``: the vLLM plugin and ``safekern serve``. May import ``spec`` …
``runtime`` (and ``data``); never ``evaluation``, ``training`` or ``cli``.
"""
