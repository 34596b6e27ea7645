"""The vLLM plugin's controller glue (``safekern.integrations.vllm._controller``) against the
reference controller, without vLLM: ``plan`` / ``commit`` / ``escalate`` over Python
``Request``s must give, step by step, the states, verdicts and forced tokens of one batched
``EssState`` run through ``plan_step`` / ``update_state`` / ``forced_tokens`` / ``escalate``.
``plan`` skips (does not pack) a request that is idle at a step; these tests are what say that
skipping it changes nothing."""
import random

import pytest
import torch

from safekern.integrations.vllm import _batch, _controller
from safekern.reference.controller import escalate, forced_tokens, plan_step, update_state
from safekern.spec import EssConfig, EssState

REFUSAL = [7, 11, 13, 17]
FIELDS = ("mode", "flags", "switch_step", "next_eval", "interval", "forced_idx",
          "trigger_step")


@pytest.mark.parametrize("ess", [
    EssConfig(schedule="each", policy="high", tau=2),
    EssConfig(schedule="annealing", policy="medium", tau=2),
    EssConfig(schedule="periodic", period=3, policy="high"),
    EssConfig(schedule="cascade", policy="high", tau=2),
    EssConfig(schedule="cascade", policy="medium", cascade_net=True),
    EssConfig(schedule="first", policy="low", first_at=2),
], ids=lambda e: e.label)
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_commit_escalate_equal_the_reference_controller(ess, seed):
    rng = random.Random(seed)
    B, steps = 6, 40
    prompts = [rng.randint(8, 20) for _ in range(B)]
    starts = [rng.randint(1, 3) for _ in range(B)]
    reqs = {}
    for r in range(B):
        lay = _batch.Layout(prompt_len=prompts[r] + 1, query_start=starts[r] + 1,
                            query_end=prompts[r] - 2)
        reqs[r] = _batch.Request(ess=ess, layout=lay, n_prompt=prompts[r], output=[],
                                 refusal_ids=REFUSAL, refusal_skip=1, eos_id=2)
    st = EssState.create([reqs[r].layout.prompt_len for r in range(B)],
                         [reqs[r].layout.query_start for r in range(B)],
                         [reqs[r].layout.query_end for r in range(B)], REFUSAL, ess,
                         refusal_skip=1)
    w, b = torch.ones(1), torch.zeros(1)
    idle_steps = 0
    for step in range(steps):
        # unsafe scores mostly low, with bursts, so every mode and the probe are exercised
        p = torch.tensor([rng.random() ** (3 if rng.random() < 0.7 else 0.3)
                          for _ in range(B)], dtype=torch.float32)
        h = torch.tensor([[rng.uniform(-3, 3)] for _ in range(B)], dtype=torch.float32)
        seq_lens = [reqs[r].n_prompt + len(reqs[r].output) for r in range(B)]

        # the plugin
        pl = _controller.plan(reqs, seq_lens)
        planned = {r for items, *_ in pl.groups for r, _ in items}
        _controller.commit(pl, p[pl.rows] if pl.rows else None)
        _controller.escalate(pl, h, w, b[0], 0.5)

        # the reference, every row packed at every step
        active = ~st.finished & ~((st.mode == 3) & (st.forced_idx < 0))
        idle_steps += sum(bool(active[r]) and r not in planned for r in range(B))
        st.seq_len.copy_(torch.tensor(seq_lens, dtype=torch.int32) + 1)
        plan_step(st, ess)
        st.evaluating &= active
        assert sorted(pl.rows) == torch.nonzero(st.evaluating).flatten().tolist(), step
        before_finished = st.finished.clone()
        update_state(st, ess, p)
        forced, toks = forced_tokens(st, ess)
        forced &= active
        escalate(st, ess, torch.sigmoid(h.float() @ w + b), 0.5)

        for r in range(B):
            q = reqs[r]
            for f in FIELDS:
                assert getattr(q, f) == int(getattr(st, f)[r]), (step, r, f)
            if before_finished[r]:
                assert q.force == q.eos_id
            elif forced[r]:
                assert q.force == int(toks[r]), (step, r)
            else:
                assert q.force is None, (step, r)
            assert q.finished == bool(st.finished[r])
            q.output.append(q.force if q.force is not None else 100 + step)
    if ess.schedule in ("annealing", "periodic", "cascade", "first"):
        assert idle_steps > 0          # the fast path was taken (it is what is under test)
