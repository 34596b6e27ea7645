"""vLLM model classes for ESS checkpoints (``export_for_vllm``): vLLM's own Llama / Mistral /
Qwen2 classes plus the [CLS] embedding, the safety head and the per-step ESS pass.

Imported by vLLM's ``ModelRegistry`` (lazily, ``register()``), never by safekern itself.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from . import _batch, _cls_forward, _controller, request_options

_WEIGHTS = ("ess_cls_embedding", "ess_head_weight", "ess_head_bias")
_PROBE = ("ess_probe_weight", "ess_probe_bias")   # the cascade's screening probe (version 3)


def _read_meta(path: str) -> dict:
    file = os.path.join(path, "safety.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no safety.json: not a checkpoint written by "
                                "safekern.integrations.vllm.export_for_vllm")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != "safekern-vllm":
        raise ValueError(f"{file}: not a safekern vLLM checkpoint (format "
                         f"{meta.get('format')!r}); write it with export_for_vllm")
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 3:
        raise ValueError(f"{file}: format version {version!r} is not one this plugin reads "
                         "(1 to 3): upgrade safekern, or re-export with this version")
    probe = meta.get("probe")
    if probe is not None and (version < 3 or not isinstance(probe, dict) or isinstance(
            probe.get("threshold"), bool) or not isinstance(probe.get("threshold"), (int, float))
            or not 0 <= probe["threshold"] <= 1):
        raise ValueError(f"{file}: 'probe' must be {{\"threshold\": a float in [0, 1]}} in a "
                         f"format version 3 checkpoint, got {probe!r} (version {version})")
    if meta.get("adapter") is not None and version < 2:
        raise ValueError(f"{file}: 'adapter' needs format version 2, the file says {version}")
    if meta.get("response_sees_cls", True):
        raise ValueError(f"{file}: response_sees_cls=True (the paper's layout) needs the [CLS] "
                         "key inside vLLM's attention; the plugin serves response_sees_cls=False")
    if meta.get("cls_position") not in ("zero", "last"):
        raise ValueError(f"{file}: cls_position must be 'zero' or 'last', got "
                         f"{meta.get('cls_position')!r}")
    return meta


class _EssMixin:
    """What every ESS model class adds to its vLLM base class."""

    def _ess_init(self, vllm_config):
        pc = vllm_config.parallel_config
        if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
            raise NotImplementedError("the safekern vLLM plugin runs with tensor and pipeline "
                                      "parallel size 1")
        if vllm_config.speculative_config is not None:
            raise NotImplementedError("the safekern vLLM plugin does not support speculative "
                                      "decoding (one sampled row per request per step)")
        if vllm_config.device_config.device_type != "cpu":
            raise NotImplementedError(
                "the safekern vLLM plugin reads the [CLS] windows from vLLM's CPU_ATTN KV cache "
                "layout; other devices/attention backends are not supported yet")
        mc = vllm_config.model_config
        self.ess_meta = meta = _read_meta(mc.model)
        H = mc.hf_config.hidden_size
        nc = int(meta["num_classes"])
        self.ess_cls_embedding = nn.Parameter(torch.zeros(H, dtype=mc.dtype),
                                              requires_grad=False)
        self.ess_head_weight = nn.Parameter(torch.zeros(nc, H), requires_grad=False)
        self.ess_head_bias = nn.Parameter(torch.zeros(nc), requires_grad=False)
        self.ess_probe = None
        if meta.get("probe") is not None:         # the cascade's screening probe (version 3)
            self.ess_probe_weight = nn.Parameter(torch.zeros(H), requires_grad=False)
            self.ess_probe_bias = nn.Parameter(torch.zeros(1), requires_grad=False)
            self.ess_probe = float(meta["probe"]["threshold"])
        self._ess_plan = None
        self.ess_adapter = None
        if meta.get("adapter") is not None:      # the [CLS] adapter (format version 2)
            at, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
            inter = mlp.down_proj.input_size
            sizes = {"q_proj": (H, at.q_size), "k_proj": (H, at.kv_size),
                     "v_proj": (H, at.kv_size), "o_proj": (at.q_size, H),
                     "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}
            self.ess_adapter = _cls_forward.AdapterDeltas(
                meta["adapter"], sizes, len(self.model.layers), mc.dtype,
                self.ess_cls_embedding.device, os.path.join(mc.model, "safety.json"))
        self._ess_default = {"ess": meta["ess"],
                             "enabled_by_default": meta.get("enabled_by_default", False)}
        self._ess_path = mc.model
        self._ess_configs = {}
        mode = os.environ.get("SAFEKERN_VLLM_CLS", "fused")
        if mode not in ("fused", "two-pass"):
            raise ValueError(f"SAFEKERN_VLLM_CLS must be 'fused' or 'two-pass', got {mode!r}")
        self._ess_fused = mode == "fused"
        _batch.MODEL = self

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        self._ess_plan = None
        rows = _batch.BATCH.rows
        md = _cls_forward.forward_metadata(self) if rows else None
        if md is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                   **kwargs)
        seq_lens, block_table = md
        with torch.no_grad():
            pl = _controller.plan(rows, seq_lens)
            p = None
            if pl and self._ess_fused and not kwargs:
                out, p = _cls_forward.fused_forward(self, input_ids, positions, inputs_embeds,
                                                    pl, block_table)
            else:
                out = super().forward(input_ids, positions, intermediate_tensors,
                                      inputs_embeds, **kwargs)
                if pl:
                    p = _cls_forward.cls_pass(self, pl, block_table)
            _controller.commit(pl, p)
            self._ess_plan = pl if pl.cascade else None
        return out

    def compute_logits(self, hidden_states, *args, **kwargs):
        """vLLM's logits of the sampled rows; first the cascade's probe on those rows (the
        token rows' final hidden states, one per batch row), for this step's plan."""
        pl, self._ess_plan = self._ess_plan, None
        if pl is not None and self.ess_probe is not None:
            with torch.no_grad():
                _controller.escalate(pl, hidden_states, self.ess_probe_weight,
                                     self.ess_probe_bias[0], self.ess_probe)
        return super().compute_logits(hidden_states, *args, **kwargs)

    def load_weights(self, weights):
        ess, adapter = {}, {}

        def base():
            for name, w in weights:
                if name in _WEIGHTS or name in _PROBE:
                    ess[name] = w
                elif name.startswith("ess_adapter."):
                    adapter[name] = w
                else:
                    yield name, w

        loaded = set(super().load_weights(base()))
        where = os.path.join(self._ess_path, "model.safetensors")
        if self.ess_adapter is not None:
            self.ess_adapter.load(adapter, where)
        elif adapter:
            raise ValueError(f"{where} holds [CLS] adapter tensors ({sorted(adapter)[0]!r}, ...) "
                             "but safety.json has no 'adapter': re-export with export_for_vllm")
        names = _WEIGHTS + (_PROBE if self.ess_probe is not None else ())
        if self.ess_probe is None and any(n in ess for n in _PROBE):
            raise ValueError(f"{where} holds the screening probe but safety.json has no 'probe': "
                             "re-export with export_for_vllm")
        for name in names:
            p = getattr(self, name)
            if name not in ess and name == "ess_head_bias":
                loaded.add(name)                       # a head without bias: stays 0
                continue
            if name not in ess:
                raise ValueError(f"{self._ess_path}: model.safetensors has no {name!r} (write "
                                 "the checkpoint with export_for_vllm)")
            w = ess[name].reshape(p.shape) if ess[name].numel() == p.numel() else None
            if w is None:
                raise ValueError(f"{self._ess_path}: {name} has shape "
                                 f"{tuple(ess[name].shape)}, expected {tuple(p.shape)}")
            p.data.copy_(w.to(p.dtype))
            loaded.add(name)
        return loaded

    # -- per request
    def ess_request(self, params, prompt_ids, output_ids):
        """The ``_batch.Request`` of a request joining the batch, or None (plain vLLM)."""
        ess, trace_id = request_options(params.extra_args, self._ess_default)
        if ess is None:
            return None
        if ess.schedule == "cascade" and self.ess_probe is None:
            raise ValueError("safekern: schedule 'cascade' needs a checkpoint with the screening "
                             "probe (export a delta that has one); this one has none")
        key = repr(ess)
        ess = self._ess_configs.setdefault(key, ess)   # equal configs share one controller
        meta = self.ess_meta
        ids = list(prompt_ids or [])
        if not ids:
            raise ValueError("safekern: a request with ESS on needs prompt token ids")
        layout = _batch.prompt_layout(ids, meta["template_prefix_ids"],
                                        meta["template_suffix_ids"], meta["bos_id"])
        ref = meta["refusal"]
        refusal, skip = ((ref["ids"], ref["skip"]) if ess.refusal_text == ref["text"] else
                         _refusal_ids(self._ess_path, ess.refusal_text))
        return _batch.Request(ess=ess, layout=layout, n_prompt=len(ids), output=output_ids,
                                refusal_ids=list(refusal), refusal_skip=int(skip),
                                eos_id=meta["eos_id"], trace_id=trace_id)


@lru_cache(maxsize=64)
def _refusal_ids(path: str, text: str):
    from transformers import AutoTokenizer

    from ...safety.prompts import refusal_token_ids

    ids, skip = refusal_token_ids(AutoTokenizer.from_pretrained(path), text)
    return tuple(ids), skip


class EssLlamaForCausalLM(_EssMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ess_init(vllm_config)


class EssMistralForCausalLM(_EssMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ess_init(vllm_config)


class EssQwen2ForCausalLM(_EssMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ess_init(vllm_config)
