"""Integrations with model libraries. Each submodule imports its library lazily.

``safekern.integrations.hf``: ``attn_implementation="safekern"`` for transformers models.
"""
