"""The batched ESS controller (docs/DESIGN.md §4) on hand-written traces."""
import torch

from safekern.reference import forced_tokens, plan_step, update_state
from safekern.spec import BENIGN, NEVER, PENDING, REFUSING, SUSPECT, EssConfig, EssState

REFUSAL = [101, 102, 103]


def make_state(ess, P=(5,), Q=((2, 4),)):
    return EssState.create(list(P), [q[0] for q in Q], [q[1] for q in Q], REFUSAL, ess)


def step(state, ess, p, t):
    """One decode step for a batch-1 state: plan at t, verdict p (None = not evaluated)."""
    state.seq_len.fill_(t)
    win = plan_step(state, ess)
    ev = bool(state.evaluating[0])
    assert ev == (p is not None), f"t={t}: evaluating={ev}, trace says {p}"
    trig = update_state(state, ess, torch.tensor([float("nan") if p is None else p]))
    forced, tok = forced_tokens(state, ess)
    return win[0].tolist(), bool(trig[0]), (int(tok[0]) if forced[0] else None)


def test_each_schedule_suspect_rollback_and_tau_trigger():
    ess = EssConfig(schedule="each", tau=3, r1=10, r2=10, r3=10)
    s = make_state(ess)
    # t = 5: first evaluation at prefill: Q = [2, 4) and an empty response window
    assert step(s, ess, 0.1, 5) == ([[2, 4], [5, 5]], False, None)
    assert int(s.mode[0]) == BENIGN and int(s.next_eval[0]) == 1
    assert step(s, ess, 0.9, 6) == ([[0, 0], [5, 6]], False, None)      # rule 2, flag 1
    assert int(s.mode[0]) == SUSPECT and int(s.switch_step[0]) == 6
    assert step(s, ess, 0.9, 7) == ([[0, 0], [5, 7]], False, None)      # rule 3, flag 2
    assert step(s, ess, 0.2, 8)[1:] == (False, None)                    # benign -> rollback
    assert int(s.mode[0]) == BENIGN and int(s.flags[0]) == 0 and int(s.switch_step[0]) == -1
    assert step(s, ess, 0.6, 9)[1] is False                             # flag 1, S = 9
    assert step(s, ess, 0.5, 10)[1] is False                            # threshold counts
    win, trig, tok = step(s, ess, 0.99, 11)                             # flag 3 = tau
    assert trig and tok == 101 and win == [[0, 0], [5, 11]]
    assert int(s.mode[0]) == REFUSING and int(s.trigger_step[0]) == 11
    assert step(s, ess, None, 12) == ([[0, 0], [0, 0]], False, 102)     # not evaluated again
    assert step(s, ess, None, 13)[2] == 103
    assert step(s, ess, None, 14)[2] is None and not bool(s.finished[0])


def test_suspect_window_is_bounded_by_r3():
    ess = EssConfig(schedule="each", tau=3, r2=4, r3=2)
    s = make_state(ess, P=(10,), Q=((1, 9),))
    step(s, ess, 0.0, 10)
    for t in range(11, 20):
        step(s, ess, 0.0, t)
    assert step(s, ess, 0.9, 20)[0] == [[0, 0], [16, 20]]               # latest r2 = 4
    assert step(s, ess, 0.9, 21)[0] == [[0, 0], [16, 21]]               # [S - r2, min(S+r3, t))
    assert step(s, ess, 0.9, 23) == ([[0, 0], [16, 22]], True, 101)     # S + r3 = 22 < t


def test_first_evaluation_flag_triggers_at_once():
    ess = EssConfig(schedule="each", tau=3)
    s = make_state(ess)
    assert step(s, ess, 0.7, 5) == ([[2, 4], [5, 5]], True, 101)
    assert int(s.trigger_step[0]) == 5


def test_rule1_window_with_prefilled_response_and_first_at():
    ess = EssConfig(schedule="first", first_at=3, r1=10)
    s = make_state(ess, P=(8,), Q=((3, 6),))
    for t in (8, 9, 10):
        step(s, ess, None, t)                                           # n < first_at
    assert step(s, ess, 0.0, 11)[0] == [[3, 6], [8, 11]]                # Q ∪ [P, P + n)
    s2 = make_state(ess, P=(8,), Q=((3, 6),))
    s2.seq_len.fill_(8 + 25)                                            # 25 prefilled tokens
    assert plan_step(s2, ess)[0].tolist() == [[3, 6], [8, 18]]          # capped at r1


def test_schedules_evaluate_at_the_right_steps():
    def eval_steps(ess, n_steps=40):
        s = make_state(ess, P=(4,), Q=((1, 3),))
        steps = []
        for n in range(n_steps):
            s.seq_len.fill_(4 + n)
            plan_step(s, ess)
            if bool(s.evaluating[0]):
                steps.append(n)
            update_state(s, ess, torch.tensor([0.0]))
        return steps

    assert eval_steps(EssConfig(schedule="first")) == [0]
    assert eval_steps(EssConfig(schedule="each"), 6) == [0, 1, 2, 3, 4, 5]
    assert eval_steps(EssConfig(schedule="periodic", period=10)) == [0, 10, 20, 30]
    assert eval_steps(EssConfig(schedule="annealing", anneal_start=1, anneal_growth=2.0,
                                anneal_stop=20)) == [0, 1, 3, 7, 15]
    assert eval_steps(EssConfig(schedule="annealing", anneal_start=2, anneal_growth=1.5,
                                anneal_stop=30)) == [0, 2, 5, 9, 15, 24]


def test_suspect_evaluates_every_step_even_when_periodic():
    ess = EssConfig(schedule="periodic", period=10, tau=2)
    s = make_state(ess)
    step(s, ess, 0.0, 5)                                                # n = 0
    for t in range(6, 15):
        step(s, ess, None, t)
    assert step(s, ess, 0.8, 15)[1] is False                            # n = 10: flag 1
    assert step(s, ess, 0.1, 16)[1] is False                            # SUSPECT: evaluated
    assert int(s.next_eval[0]) == 21                                    # back to periodic
    assert step(s, ess, None, 17)[1] is False


def test_policies_low_medium_high():
    low = EssConfig(policy="low")
    s = make_state(low)
    assert step(s, low, 0.9, 5) == ([[2, 4], [5, 5]], True, None)       # record only
    assert int(s.mode[0]) == REFUSING and step(s, low, None, 6)[1:] == (False, None)
    high = EssConfig(policy="high")
    s = make_state(high)
    assert step(s, high, 0.9, 5)[2] == 101
    assert step(s, high, None, 6)[2] == 102 and not bool(s.finished[0])
    assert step(s, high, None, 7)[2] == 103 and bool(s.finished[0])


def test_tau_one_triggers_on_first_flag_after_benign():
    ess = EssConfig(tau=1)
    s = make_state(ess)
    step(s, ess, 0.0, 5)
    assert step(s, ess, 0.95, 6)[1:] == (True, 101)


def test_batched_rows_are_independent():
    ess = EssConfig(schedule="periodic", period=2, tau=2)
    s = EssState.create([5, 7, 3], [1, 1, 1], [4, 6, 2], REFUSAL, ess)
    s.seq_len.copy_(torch.tensor([5, 8, 3], dtype=torch.int32))        # row 1: n = 1 prefilled
    win = plan_step(s, ess)
    assert s.evaluating.tolist() == [True, True, True]
    assert win[1].tolist() == [[1, 6], [7, 8]]
    update_state(s, ess, torch.tensor([0.1, 0.2, 0.9]))
    assert s.mode.tolist() == [BENIGN, BENIGN, REFUSING]
    assert s.next_eval.tolist() == [2, 3, 0] and s.forced_idx.tolist() == [-1, -1, 0]
    s.seq_len.add_(1)
    plan_step(s, ess)
    assert s.evaluating.tolist() == [False, False, False]
    s.seq_len.add_(1)                                                   # n = 2 and 3
    plan_step(s, ess)
    assert s.evaluating.tolist() == [True, True, False]


def test_first_schedule_never_again():
    ess = EssConfig(schedule="first")
    s = make_state(ess)
    step(s, ess, 0.1, 5)
    assert int(s.next_eval[0]) == NEVER and int(s.mode[0]) != PENDING
