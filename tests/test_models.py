"""The offline pretrained-model loader (safekern.models)."""
import os

import pytest
import torch

from safekern import models

REASON = models.is_available("smollm2")
needs_smollm2 = pytest.mark.skipif(REASON is not None, reason=f"SmolLM2 not installed: {REASON}")


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.load("nope")


def test_missing_package_names_the_install_command(monkeypatch):
    spec = models.ModelSpec("fake", "safekern_no_such_pkg", "x.gguf", "pip install fake-pkg", "")
    monkeypatch.setitem(models.MODELS, "fake", spec)
    assert "pip install fake-pkg" in models.is_available("fake")
    with pytest.raises(ModuleNotFoundError, match="pip install fake-pkg"):
        models.load("fake")


@needs_smollm2
def test_smollm2_loads_cached_and_matches_transformers(tmp_path, monkeypatch):
    import time

    import safekern

    monkeypatch.setenv("SAFEKERN_CACHE", str(tmp_path))
    model, tok = models.load("smollm2")
    cached = models.local_dir("smollm2")
    assert cached.startswith(str(tmp_path)) and os.path.isfile(os.path.join(cached,
                                                                            "model.safetensors"))
    t0 = time.perf_counter()
    model, tok = models.load("smollm2")                    # from the cache: no GGUF decode
    assert time.perf_counter() - t0 < 15
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.padding_side == "right"
    prompt = "What is the capital of France?"
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    out = safekern.generate(model, tok, [prompt], max_new_tokens=8, safety=None)[0]
    assert out.token_ids == ref
    assert "Paris" in out.text
    safekern.attach(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert torch.isfinite(model.safety_head.weight).all()
