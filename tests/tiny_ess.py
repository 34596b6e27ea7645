"""The tiny ESS model the training tests and tests/dist_train_script.py share, and the small
random chat checkpoint of the local-checkpoint tests."""
import torch


def make_tiny_ess_model(seed: int):
    """A 2-layer GQA Llama with [CLS] + safety head attached and safekern attention, and its BPE
    tokenizer learnt from the embedded train split; ``torch.manual_seed(seed)`` first."""
    from transformers import LlamaForCausalLM

    from safekern.data import corpus
    from safekern.integrations.hf import apply_safekern
    from safekern.safety.attach import attach
    from safekern.models.tiny import build_tokenizer, tiny_llama_config

    torch.manual_seed(seed)
    tok = build_tokenizer(corpus("train"), vocab_size=384)
    model = LlamaForCausalLM(tiny_llama_config(len(tok) + 1, hidden_size=64,
                                               intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1))
    attach(model, tok)
    apply_safekern(model)
    return model, tok


def save_random_qwen2(path):
    """A small random Qwen2 chat model (2 layers, GQA) and its BPE tokenizer saved to ``path``
    like any transformers checkpoint (``torch.manual_seed(0)`` first); returns the model and
    the tokenizer."""
    from transformers import AutoModelForCausalLM

    from safekern.data import corpus
    from safekern.models.tiny import build_tokenizer, tiny_llama_config

    torch.manual_seed(0)
    tok = build_tokenizer(corpus("train"), vocab_size=384)
    cfg = tiny_llama_config(len(tok), arch="qwen2", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
