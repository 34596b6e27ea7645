"""attn_implementation="safekern" against transformers' own sdpa, on tiny Llama/Mistral/Qwen2."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402
from transformers import masking_utils  # noqa: E402

from safekern.integrations import hf  # noqa: E402
from safekern.ops import dispatch  # noqa: E402

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
B, L, P = 3, 13, 5            # batch, padded length, prompt length ([CLS] at 0 + 4 tokens)
LENGTHS = (13, 9, 6)          # uneven: rows 1 and 2 are padded


def tiny_config(arch, **over):
    # initializer_range 0.2 (not 0.02) so attention visibly moves the logits: a wrong mask
    # must show up as a large error, not hide below the tolerance.
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
              initializer_range=0.2, pad_token_id=0)
    kw.update(over)
    return CONFIGS[arch](**kw)


def make_pair(arch, dtype, **over):
    """(sdpa model, safekern model) with identical weights, in eval mode."""
    hf.register()
    cfg = tiny_config(arch, **over)
    torch.manual_seed(0)
    # from_config writes attn_implementation into the config it gets: one copy per model.
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    sk = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="safekern")
    sk.load_state_dict(ref.state_dict())
    return ref.to(dtype).eval(), sk.to(dtype).eval()


def batch(padding_side="right", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        if padding_side == "right":
            mask[b, :n] = 1
        else:
            mask[b, L - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def test_register_is_idempotent_and_registers_both_interfaces():
    hf.register()
    hf.register()
    assert transformers.AttentionInterface._global_mapping["safekern"] is hf.safekern_attention
    assert masking_utils.AttentionMaskInterface._global_mapping["safekern"] is hf.safekern_mask


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_sdpa_on_padded_batch(arch, dtype, padding_side):
    ref, sk = make_pair(arch, dtype)
    ids, mask = batch(padding_side)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = sk(ids, attention_mask=mask).logits
    valid = mask.bool()
    err = (got - want)[valid].abs().max().item()
    assert err <= tol(dtype) * max(1.0, want.abs().max().item()), err
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_greedy_generate_with_kv_cache_matches_sdpa(arch, padding_side):
    # float64 so argmax ties cannot flip a token. Right-padded generate leaves padding holes
    # between the prompt and the new tokens; left padding puts them first: both must be exact.
    ref, sk = make_pair(arch, torch.float64)
    ids, mask = batch(padding_side, seed=2)
    args = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **args)
        got = sk.generate(ids, **args)
    assert got.shape == want.shape == (B, L + 6)
    assert torch.equal(got, want)


def test_apply_safekern_and_set_attn_implementation_switch_an_existing_model():
    ref, sk = make_pair("llama", torch.float64)
    ids, mask = batch()
    other = copy.deepcopy(ref)
    assert hf.apply_safekern(other) is other
    assert other.config._attn_implementation == "safekern"
    third = copy.deepcopy(ref)
    third.set_attn_implementation("safekern")
    with torch.no_grad():
        want = sk(ids, attention_mask=mask).logits
        assert torch.equal(other(ids, attention_mask=mask).logits, want)
        assert torch.equal(third(ids, attention_mask=mask).logits, want)


def test_no_dense_mask_is_built(monkeypatch):
    """The attention function sees None or the 2-D padding mask; the dense builders never run."""
    _, sk = make_pair("qwen2", torch.float32)
    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return hf.safekern_attention(module, query, key, value, attention_mask, **kw)

    def dense_builder_called(*a, **k):
        raise AssertionError("a dense (B, 1, Lq, Lk) mask was built")

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "safekern", spy)
    for name in ("sdpa", "eager"):
        monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, name,
                            dense_builder_called)
    ids, mask = batch()
    with torch.no_grad():
        sk(ids, attention_mask=mask)
        sk(ids)
        sk.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen[:2] == [(B, L)] * 2                     # padded prefill: the 2-D mask itself
    assert seen[2:4] == [None] * 2                      # nothing padded: no mask at all
    assert seen[-1] == (B, L + 1)                       # decode step: (B, keys in the cache)
    assert all(s is None or len(s) == 2 for s in seen)


def test_unpadded_forward_needs_no_mask_and_matches_sdpa():
    ref, sk = make_pair("mistral", torch.float64)
    ids, _ = batch()
    with torch.no_grad():
        err = (sk(ids).logits - ref(ids).logits).abs().max().item()
    assert err <= 1e-10


# ------------------------------------------------------------------------------ ESS metadata

def ess_batch():
    ids, mask = batch()
    response_start = torch.full((B,), P, dtype=torch.int32)
    cls_swapped = ids.clone()
    cls_swapped[:, 0] = (ids[:, 0] + 7) % 125 + 3        # another [CLS] token embedding
    return ids, mask, response_start, cls_swapped


def test_ess_prompt_rows_ignore_cls_and_response_rows_read_it():
    _, sk = make_pair("llama", torch.float64)
    ids, mask, rs, swapped = ess_batch()
    with torch.no_grad():
        a = sk(ids, attention_mask=mask, response_start=rs).logits
        b = sk(swapped, attention_mask=mask, response_start=rs).logits
        plain_a = sk(ids, attention_mask=mask).logits
        plain_b = sk(swapped, attention_mask=mask).logits
    diff = (a - b).abs().amax(dim=-1)                    # (B, L)
    for bi, n in enumerate(LENGTHS):
        assert torch.all(diff[bi, 1:P] == 0), diff[bi]   # prompt rows: exactly independent
        assert torch.all(diff[bi, P:n] > 1e-6), diff[bi]  # response rows see the [CLS]
    # Control: without ESS metadata it is plain causal attention, prompt rows read key 0.
    assert torch.all((plain_a - plain_b).abs().amax(dim=-1)[:, 1:P] > 1e-6)


def test_ess_cls_windows_change_only_the_cls_row():
    _, sk = make_pair("llama", torch.float64)
    ids, mask, rs, _ = ess_batch()
    windows = torch.tensor([[[1, P]], [[2, 4]], [[1, 3]]], dtype=torch.int32)   # (B, 1, 2)
    attn_out = []
    hook = sk.model.layers[0].self_attn.register_forward_hook(
        lambda mod, args, out: attn_out.append(out[0]))
    with torch.no_grad():
        a = sk(ids, attention_mask=mask, response_start=rs).logits
        b = sk(ids, attention_mask=mask, response_start=rs, cls_windows=windows).logits
    hook.remove()
    first = (attn_out[0] - attn_out[1]).abs().amax(dim=-1)   # first attention layer
    assert torch.all(first[:, 0] > 1e-6)
    assert torch.all(first[:, 1:] == 0)
    diff = (a - b).abs().amax(dim=-1)
    assert torch.all(diff[:, 0] > 1e-6)
    assert torch.all(diff[:, 1:P] == 0)   # prompt rows never read the [CLS]; response rows
    # read key 0, whose K/V in layer 2 come from the re-evaluated [CLS] row (docs/DESIGN.md §3).


def test_ess_kwargs_reach_every_layer_and_key_bias_applies(monkeypatch):
    _, sk = make_pair("qwen2", torch.float64)
    ids, mask, rs, _ = ess_batch()
    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append((module.layer_idx, kw.get("response_start") is rs,
                     kw.get("key_bias") is not None))
        return hf.safekern_attention(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "safekern", spy)
    key_bias = torch.zeros(B, 1, L, dtype=torch.float32)
    key_bias[:, :, 0] = 3.0                              # boost the [CLS] key
    with torch.no_grad():
        a = sk(ids, attention_mask=mask, response_start=rs).logits
        b = sk(ids, attention_mask=mask, response_start=rs, key_bias=key_bias).logits
    assert seen == [(0, True, False), (1, True, False), (0, True, True), (1, True, True)]
    diff = (a - b).abs().amax(dim=-1)
    assert torch.all(diff[:, 1:P] == 0)                  # rows that do not see key 0
    for bi, n in enumerate(LENGTHS):
        assert torch.all(diff[bi, P:n] > 1e-6)


def test_training_backward_matches_sdpa():
    ref, sk = make_pair("llama", torch.float64)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ref, sk):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=1e-8)


# -------------------------------------------------------------------------------- errors

def test_sliding_window_shorter_than_sequence_raises():
    _, sk = make_pair("mistral", torch.float32, sliding_window=8)
    ids, mask = batch()
    with pytest.raises(NotImplementedError, match="sliding_window"):
        sk(ids, attention_mask=mask)
    with torch.no_grad():                                # fits in the window: exact, allowed
        sk(ids[:, :8], attention_mask=mask[:, :8])


def test_unsupported_features_raise():
    _, sk = make_pair("llama", torch.float32, attention_dropout=0.1)
    ids, mask = batch()
    sk.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        sk(ids, attention_mask=mask)
    sk.eval()
    packed = torch.cat([torch.arange(6), torch.arange(7)])[None].expand(B, L)
    with pytest.raises(NotImplementedError, match="packed"):
        sk(ids, position_ids=packed, use_cache=False)
    with pytest.raises(NotImplementedError, match="Static"):
        sk.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                    cache_implementation="static")
    dense = torch.zeros(B, 1, L, L)
    with pytest.raises(ValueError, match="4-D|2-D"):
        sk(ids, attention_mask=dense)
    ids_l, mask_l = batch("left")
    with pytest.raises(ValueError, match="right-padded"):
        sk(ids_l, attention_mask=mask_l, response_start=torch.full((B,), P, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_bias"):
        sk(ids_l, attention_mask=mask_l, key_bias=torch.zeros(1, 1, L))
    with pytest.raises(TypeError, match="response_start"):
        sk(ids, attention_mask=mask, response_start=[P] * B)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.apply_safekern(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="soft-capping"):
        hf._check_config(type("Cfg", (), {"attn_logit_softcapping": 50.0})())


def test_missing_transformers_says_what_to_install(monkeypatch):
    import importlib
    real = importlib.import_module

    def no_transformers(name, *a, **k):
        if name.startswith("transformers"):
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)

    monkeypatch.setattr(hf, "_registered", False)
    monkeypatch.setattr(importlib, "import_module", no_transformers)
    with pytest.raises(ImportError, match="pip install"):
        hf.register()


def test_transformers_below_the_floor_says_which_version(monkeypatch):
    import sys

    monkeypatch.setattr(hf, "_registered", False)
    # sys.modules' entry, not this module's `transformers`: transformers swaps in another
    # module object once a model class has been imported.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.3.0")
    with pytest.raises(ImportError, match=r"transformers>=5\.6\.2.*found 5\.3\.0"):
        hf.register()


# ------------------------------------------------------------------------- triton backend

TRITON_HEAD_DIM = 32          # a head dim the Triton kernels must support (docs/DESIGN.md §3)


def _triton_reason():
    avail = dispatch.available("ess_attention", device=torch.device("cpu"), dtype=torch.float32,
                               head_dim=TRITON_HEAD_DIM, seqlen_q=L, seqlen_k=L,
                               requires_grad=False)
    if "triton" not in avail:
        return "no triton backend registered for ess_attention yet"
    return avail["triton"]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_sdpa_parity_with_triton_backend(arch, monkeypatch):
    reason = _triton_reason()
    if reason is not None:
        pytest.skip(f"triton backend cannot run here: {reason}")
    monkeypatch.setenv("SAFEKERN_BACKEND", "triton")
    ref, sk = make_pair(arch, torch.float32, head_dim=TRITON_HEAD_DIM)
    for side in ("right", "left"):
        ids, mask = batch(side)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = sk(ids, attention_mask=mask).logits
            gen_want = ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                    pad_token_id=0)
            gen_got = sk.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
        valid = mask.bool()
        err = (got - want)[valid].abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), (side, err)
        assert torch.equal(gen_got, gen_want), side
