"""Trains a tiny ESS model a few steps with EssTrainer; run plain or under torchrun (gloo, CPU).

    python tests/dist_train_script.py OUT.pt --batch-size 4
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train_script.py OUT.pt --batch-size 2

Same seeds, sequential sampling and the same global batch in every configuration, so the loss
per step and the final parameters must agree (tests/test_train.py compares them). Rank 0 saves
``{"losses": [...], "params": flat fp32 vector}``.
"""
import argparse
import os
import tempfile

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    from transformers import TrainerCallback, TrainingArguments

    from safekern.data import load_split
    from safekern.train import EssCollator, EssForTraining, EssTrainer
    from tiny_ess import make_tiny_ess_model  # beside this script

    model, tok = make_tiny_ess_model(seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_rows = args.steps * args.batch_size * args.grad_accum * world
    rows = load_split("train")[:n_rows]

    losses = []

    class Record(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        remove_unused_columns=False, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, train_sampling_strategy="sequential", max_grad_norm=0.0)
    trainer = EssTrainer(model=EssForTraining(model), args=targs, train_dataset=rows,
                         data_collator=EssCollator(tok), cls_weight=0.1, callbacks=[Record()])
    trainer.train()
    if trainer.is_world_process_zero():
        params = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
        torch.save({"losses": losses, "params": params}, args.out)


if __name__ == "__main__":
    main()
