"""Train an ESS model with ``safekern.training.trainer.EssTrainer`` (docs/TRAINING.md).

    python examples/train_ess.py --tiny --max-steps 20 --out /tmp/ess_tiny      # CPU smoke run
    python examples/train_ess.py --model /models/Llama-2-7b-chat-hf --data rows.jsonl --bf16
    torchrun --nproc_per_node 8 examples/train_ess.py --model PATH --data rows.jsonl --bf16
    accelerate launch --config_file examples/fsdp.yaml examples/train_ess.py --model PATH ...

``--model`` is a local Llama/Mistral/Qwen2 checkpoint (no downloads); ``--tiny`` builds the
embedded tiny Llama from scratch instead. ``--data`` is JSON lines in the format of
docs/TRAINING.md (default: the embedded train split). Writes ``OUT/final``: the base checkpoint
(``save_pretrained``, loadable with ``from_pretrained``) and the ESS delta in
``OUT/final/safety`` (``safekern.load_safety`` restores it).
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, TrainingArguments

import safekern
from safekern.data import corpus, load_split
from safekern.integrations.hf import apply_safekern
from safekern.models.tiny import build_tokenizer, tiny_llama_config
from safekern.training.trainer import EssCollator, EssForTraining, EssTrainer, save_tiny


def load_base(args):
    """``(model, tokenizer)`` before ``attach``."""
    if args.tiny:
        tok = build_tokenizer(corpus("train"), vocab_size=1024)
        return LlamaForCausalLM(tiny_llama_config(len(tok) + 1)), tok   # +1: room for [CLS]
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local checkpoint directory (Llama, Mistral, Qwen2)")
    src.add_argument("--tiny", action="store_true", help="the embedded tiny Llama, from scratch")
    p.add_argument("--data", help="JSON-lines training rows (default: the embedded train split)")
    p.add_argument("--phase", default="alignment", choices=["alignment", "pretraining"])
    p.add_argument("--cls-weight", type=float, default=0.1,
                   help="lambda of L_lm + lambda * L_cls (paper: 0.1 or 0.01 in alignment)")
    p.add_argument("--out", default="ess_out", help="output directory")
    p.add_argument("--batch-size", type=int, default=4, help="rows per device and step")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs (when --max-steps is -1)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and mixed precision")
    args = p.parse_args()

    model, tok = load_base(args)
    tok.padding_side = "right"                     # [CLS] must sit at index 0
    safekern.attach(model, tok)                    # [CLS] token (embeddings resized) + head
    apply_safekern(model)                          # the phase masks reach every layer
    model.config.attention_dropout = 0.0
    if args.data:
        with open(args.data) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = load_split("train")

    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        num_train_epochs=args.epochs, max_steps=args.max_steps, bf16=args.bf16,
        remove_unused_columns=False,               # the collator's ESS metadata must survive
        save_strategy="no", logging_steps=10, report_to=[], dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available())     # CPU runs (torchrun) then use gloo
    trainer = EssTrainer(model=EssForTraining(model), args=targs, train_dataset=rows,
                         data_collator=EssCollator(tok, phase=args.phase,
                                                   max_length=args.max_length),
                         cls_weight=args.cls_weight)
    trainer.train()

    # Gather the full weights (DDP, FSDP or one process alike) and save from rank 0 only.
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        final = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        safekern.attach(final, tok)                # the tokenizer already has [CLS]: same ids
        final.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
        out = save_tiny(final, tok, os.path.join(args.out, "final"))
        print(f"saved the model to {out} and the ESS delta to {os.path.join(out, 'safety')}")
    # torchrun: tear the process group down before the interpreter does (left to interpreter
    # exit, a gloo worker thread can abort the rank: "terminate called without an active
    # exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
