"""The embedded default: a tokenizer and tiny model configs built offline, no hub downloads.

Used by ``safekern bench``, ``safekern train --tiny``/``demo`` and the tests. The tokenizer is
byte-level BPE: with no corpus it has only the 256 byte tokens (every string encodes), with a
corpus it learns merges from it (``tokenizers`` trainer, offline).
"""
from __future__ import annotations

from typing import Iterable, Optional

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast`` with a chat template and BOS/EOS/PAD tokens.

    Args:
        corpus: texts to learn BPE merges from; None = bytes only.
        vocab_size: target vocabulary size when learning merges (>= 256 + specials).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if corpus is not None else len(alphabet) + len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else [""], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="right", chat_template=CHAT_TEMPLATE)


def tiny_llama_config(vocab_size: int, arch: str = "llama", **overrides):
    """A small Llama-family config (GQA 4:1) with random-weight-friendly defaults.

    Args:
        vocab_size: the tokenizer's ``len(tokenizer)`` (after [CLS] is added, attach resizes).
        arch: ``"llama"``, ``"mistral"`` or ``"qwen2"``.
        overrides: any config field (hidden_size, num_hidden_layers, ...).
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"arch must be one of {tuple(classes)}, got {arch!r}")
    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=344,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return classes[arch](**kw)
