"""Trains a tiny ESS model a few steps with EssTrainer; run plain or under torchrun (gloo, CPU).

    python tests/dist_train_script.py OUT.pt --batch-size 4
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train_script.py OUT.pt --batch-size 2
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train_script.py OUT.pt --batch-size 2 --fsdp

``--fsdp`` shards the model with FSDP2 (``fully_shard`` per decoder layer, then the root) and
runs the recipe's loss in a plain loop with the Trainer's optimizer settings: accelerate only
offers FSDP on accelerators, not on gloo/CPU processes.

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
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()

    from transformers import TrainerCallback, TrainingArguments

    from safekern.data import load_split
    from safekern.training.trainer import EssCollator, EssForTraining, EssTrainer
    from tiny_ess import make_tiny_ess_model  # beside this script

    model, tok = make_tiny_ess_model(seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_rows = args.steps * args.batch_size * args.grad_accum * world
    rows = load_split("train")[:n_rows]

    if args.fsdp:
        return train_fsdp(model, tok, rows, args)
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
    _teardown()


def _teardown():
    """Nobody tears gloo down while another rank is still saving or in a collective, and the
    process group is destroyed before the interpreter exits: left to interpreter shutdown, a
    gloo worker thread is destroyed while joinable and the rank aborts ("terminate called
    without an active exception", SIGABRT; seen in CI with transformers 5.6 / accelerate 1.3)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_fsdp(model, tok, rows, args):
    """The EssTrainer update (AdamW, constant lr 1e-3, no decay, no clipping, LM term over the
    global token count) on an FSDP2-sharded EssForTraining; sequential rows as the Trainer
    shards them (rank r takes the r-th ``batch_size`` rows of each global batch)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from safekern.training.trainer import EssCollator, EssForTraining, compute_loss

    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapped = EssForTraining(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(wrapped)
    assert all(isinstance(m, FSDPModule) for m in [wrapped, *model.model.layers])
    assert all(isinstance(p, DTensor) for p in wrapped.parameters())
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, weight_decay=0.0)
    collate = EssCollator(tok)
    per_step = args.batch_size * world
    losses = []
    for step in range(args.steps):
        global_rows = rows[step * per_step:(step + 1) * per_step]
        batch = collate(global_rows[rank * args.batch_size:(rank + 1) * args.batch_size])
        labels = collate(global_rows)["labels"]
        count = (labels[:, 1:] != -100).sum()
        # FSDP averages gradients over ranks: the LM sum over the global count times world
        loss, _ = compute_loss(wrapped, batch, cls_weight=0.1, num_items_in_batch=count,
                               lm_scale=float(world))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    params = torch.cat([p.full_tensor().detach().float().flatten() for p in wrapped.parameters()])
    if rank == 0:
        torch.save({"losses": losses, "params": params}, args.out)
    _teardown()


if __name__ == "__main__":
    main()
