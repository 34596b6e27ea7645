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


def _gguf(path, payload: bytes):
    path.write_bytes(payload)
    return str(path)


def test_cache_key_follows_the_content_not_the_install(tmp_path):
    """Two environments installing the same GGUF (different mtimes) share one cache entry; a
    GGUF that differs anywhere in the hashed blocks, even at the same size, gets its own."""
    blob = os.urandom(3 * (1 << 20) + 12345)
    a = _gguf(tmp_path / "a.gguf", blob)
    b = _gguf(tmp_path / "b.gguf", blob)
    os.utime(b, (1, 1))
    assert models._cache_key(a) == models._cache_key(b)
    mid = len(blob) // 2
    for at in (0, mid, len(blob) - 1):
        changed = _gguf(tmp_path / "c.gguf", blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:])
        assert models._cache_key(changed) != models._cache_key(a), at
    assert models._cache_key(_gguf(tmp_path / "small.gguf", b"GGUF")).startswith("v2-4-")


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    from safekern.cli import main

    pkg = tmp_path / "site" / "safekern_fake_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    gguf = _gguf(pkg / "fake.gguf", b"GGUF" + os.urandom(1000))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.MODELS, "fake", models.ModelSpec("fake", "safekern_fake_models",
                                                                "fake.gguf", "pip install x", ""))
    monkeypatch.setattr(models, "is_available", lambda name: None)
    monkeypatch.setenv("SAFEKERN_CACHE", str(tmp_path / "cache"))
    assert main(["cache", "--list"]) == 0 and "empty" in capsys.readouterr().out
    current = os.path.join(models.cache_root(), f"fake-{models._cache_key(gguf)}")
    stale = os.path.join(models.cache_root(), "fake-v1-1004-1796472628")
    for d in (current, stale):
        os.makedirs(d)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(b"x" * (3 << 20))
    entries = {e.name: e for e in models.cache_entries()}
    assert entries[os.path.basename(current)].current and \
        not entries[os.path.basename(stale)].current
    assert entries[os.path.basename(stale)].bytes == 3 << 20
    assert main(["cache", "--list"]) == 0
    out = capsys.readouterr().out
    assert f"{os.path.basename(current)}  3 MiB  in use" in out and "stale" in out
    assert main(["cache", "--clear"]) == 0
    assert "removed 2 cached model(s)" in capsys.readouterr().out
    assert models.cache_entries() == [] and os.path.isdir(models.cache_base())
