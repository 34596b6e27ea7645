"""The architecture view the engine decodes through: a Llama-family transformers model's own
modules (``embed_tokens``, ``layers[i]`` with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``; ``norm``, ``rotary_emb``, ``lm_head``), checked once,
with the shapes the forward needs and the RoPE table.
"""
from __future__ import annotations

import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


class Arch:
    """The modules of a Llama-family model, checked once; raises for what the engine lacks."""

    def __init__(self, model):
        cfg = getattr(model, "config", None)
        mtype = getattr(cfg, "model_type", None)
        if mtype not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {mtype!r} ({type(model).__name__}); the "
                             f"engine supports {SUPPORTED_ARCHS}")
        base = getattr(model, "model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb")
                   if not hasattr(base, n)]
        if missing or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} lacks the Llama-family modules "
                             f"{missing or ['lm_head']}")
        if getattr(model.lm_head, "bias", None) is not None:
            raise ValueError("an LM head with a bias is not supported by the engine")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") == "dynamic":
            raise ValueError("dynamic RoPE scaling depends on the running length and is not "
                             "supported by the engine (its RoPE table is precomputed)")
        if rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported by the engine")
        layer0 = base.layers[0]
        for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
            if not hasattr(layer0, name):
                raise ValueError(f"decoder layers lack {name!r}; not a Llama-family layer")
        for name in ("q_norm", "k_norm"):
            if hasattr(layer0.self_attn, name):
                raise ValueError(f"attention with {name} (e.g. Qwen3) is not supported")
        self.model, self.base, self.config = model, base, cfg
        self.layers = list(base.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = float(getattr(layer0.self_attn, "scaling", self.head_dim ** -0.5))
        self.max_positions = getattr(cfg, "max_position_embeddings", None)

    def check_length(self, L: int):
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        active = ("sliding_attention" in types) if types is not None else window is not None
        if active and window is not None and window < L:
            raise ValueError(f"sliding-window attention (window {window}) is active within the "
                             f"cache length {L}; the engine implements full attention only")

    def rope_table(self, L: int, device, dtype):
        pos = torch.arange(L, device=device)[None]
        dummy = torch.zeros(1, device=device, dtype=dtype)
        cos, sin = self.base.rotary_emb(dummy, pos)
        return cos[0], sin[0]                                            # (L, D) each


_Arch = Arch     # the name importers used before the split (safekern.runtime.engine._Arch)

__all__ = ["Arch", "SUPPORTED_ARCHS"]
