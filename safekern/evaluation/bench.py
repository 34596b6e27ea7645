"""``safekern bench``: what strategic decoding costs, per token, on a transformers model.

Questions: (P1) how much slower is decoding with ESS on (each schedule) than the same engine
with safety off, and how much of that is the *method* (the [CLS] row's own forward pass) versus
the *implementation* (everything else: controller, masks, slot writes, traces)? (P2) how does
the engine with safety off compare with transformers ``generate``?

Providers run A/B interleaved in one process (CPU: medians of ``time.perf_counter``; CUDA:
synchronised wall time of whole ``generate`` calls, also medians). EOS is ignored so every run
decodes the same number of tokens; the safety head is biased benign so every schedule keeps its
evaluation cadence.

Method cost, per schedule: ``evals_per_step * (t_row - t_tok) / t_off_step``, where ``t_tok``
and ``t_row`` are bare decode steps (forward + final norm + LM head + argmax, no controller, no
bookkeeping) without and with the [CLS] row (plus its safety score), timed interleaved at the
run's middle context, and ``evals_per_step`` comes from the schedule's traces. Implementation
overhead = ``vs_off - 1 - method cost``.

Noise: per repetition, each provider's time over the safety-off time of the same round (the
rounds are interleaved, so a change of load hits both); half the p20-p80 range of those ratios
is printed as ``±`` beside the ratio. A P1 miss smaller than that noise is reported as
inconclusive, not as a MISS.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from .bench_report import (HEADERS, P1_OVERHEAD, P1_SCHEDULE, P1_TARGET, P2_TARGET,
                           PAPER_BUDGET, _plot, _with_noise, p1_target, p1_verdict,
                           ratio_noise, verdict_text)

SHAPES = {
    "tiny": {},
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
}
MODELS = ("tiny", "smollm2")


def schedules(cascade: bool = False):
    """The ESS configurations compared with safety off (the paper's ablation), and with
    ``cascade`` (a delta with a screening probe) the cascade (issue 27): its evaluations are
    those the delta's probe asks for on the generated text."""
    from ..spec import EssConfig

    out = {"each": EssConfig(schedule="each"), "periodic(10)": EssConfig(schedule="periodic"),
           "annealing": EssConfig(schedule="annealing"), "first": EssConfig(schedule="first")}
    if cascade:
        out["cascade"] = EssConfig(schedule="cascade")
    return out


def _benign_head(model):
    # A head that flags would stop a sequence's evaluations (a triggered sequence is never
    # evaluated again) and understate every schedule's cost: a constant benign verdict, same work.
    with torch.no_grad():
        model.safety_head.weight.zero_()
        model.safety_head.bias.fill_(-8.0)
    return model


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """The embedded default tokenizer and a random-weight Llama of ``shape``, attached."""
    import transformers

    from ..safety.attach import attach
    from ..models.tiny import build_tokenizer, tiny_llama_config

    tok = build_tokenizer()
    over = dict(SHAPES[shape])
    vocab = over.pop("vocab_size", len(tok))
    torch.manual_seed(0)
    cfg = tiny_llama_config(max(vocab, len(tok)), "llama", **over)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    attach(model, tok)
    return _benign_head(model), tok


def build_real(name: str, device: torch.device, dtype: torch.dtype):
    """A pretrained model (a ``safekern.models`` name or a local checkpoint) with its ESS delta
    (``models.default_delta``: the shipped one, or what ``safekern train --model PATH`` wrote),
    so its [CLS] adapter is timed, and a benign-leaning head (a verdict that triggers would stop a
    sequence's evaluations and understate every schedule's cost). Without a delta: a fresh
    [CLS] and head (no adapter)."""
    from .. import models
    from ..safety.attach import attach

    if not models.is_local(name):
        why = models.is_available(name)
        if why is not None:
            raise SystemExit(f"--model {name} is not installed here: {why}")
    delta = models.default_delta(name)
    model, tok = models.load(name, dtype=dtype, device=device, safety=delta or False)
    status(f"safekern bench: ESS delta {delta or 'none (a fresh [CLS] and head, no adapter)'}")
    if delta is None:
        torch.manual_seed(0)
        attach(model, tok)
    return _benign_head(model), tok


def make_prompts(tok, batch: int, prompt_tokens: int) -> List[str]:
    """``batch`` user messages of about ``prompt_tokens`` tokens (byte-level: 1 char ~ 1 token)."""
    words = "the quick brown fox jumps over a lazy dog while safety kernels keep watch "
    base = (words * (prompt_tokens // len(words) + 1))[:prompt_tokens]
    return [base[i % 7:] + base[:i % 7] for i in range(batch)]


def _timer(device):
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _interleaved(fns: Dict[str, callable], reps: int, device, progress):
    """Round-robin A/B timing: per provider the median wall time and the median process CPU
    time (on a shared, loaded CPU, CPU time is the steadier measure of the work done; wall
    time is what docs/PERFORMANCE.md asks for, so both are reported)."""
    now = _timer(device)
    for f in fns.values():                                               # warm-up
        f()
        progress.update(1)
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            c0, t0 = time.process_time(), now()
            f()
            wall[k].append(now() - t0)
            cpu[k].append(time.process_time() - c0)
            progress.update(1)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()}, wall)


def status(message: str) -> None:
    """One line on stderr (the table goes to stdout): what a silent wait is doing."""
    print(message, file=sys.stderr, flush=True)


def _hf_generate(model, tok, prompts, new_tokens, cache):
    from ..safety.prompts import encode_prompts

    enc = encode_prompts(tok, prompts)
    L = min(enc.lengths)           # equal lengths: transformers would need left padding
    ids = torch.tensor([x[:L] for x in enc.ids], device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if cache:
        kw["cache_implementation"] = cache
    return lambda: model.generate(ids, **kw)


def bare_steps(engine, prompts, new_tokens: int):
    """``{"token": fn, "token+cls": fn}``: one bare decode step each, without and with the
    [CLS] row, at the middle context of a ``new_tokens`` run (the method, nothing else).

    Both run the engine's own forward (same linear path and attention backend as ``generate``)
    + final norm + LM head + argmax on the token row; ``token+cls`` adds the [CLS] row at
    ``q_pos = 0`` over a rule-2 window and its safety score. No controller, no bookkeeping."""
    from ..reference.sampling import safety_score_ref

    e = engine
    e.generate(prompts, max_new_tokens=new_tokens, safety=schedules()[P1_SCHEDULE])
    t = e._lengths + new_tokens // 2                                     # tokens in the cache
    kv_len = int(t.max())
    zero = torch.zeros_like(t)
    tok = e._tok[:, None]
    pos1 = (t - 1).long()[:, None]
    ids2 = e._ids2                                   # (token, [CLS]) per sequence
    pos2 = torch.stack([t - 1, zero], 1).long()
    q_pos2 = torch.stack([t - 1, zero], 1).int()
    windows = torch.stack([torch.stack([zero, zero], -1),
                           torch.stack([torch.maximum(e.state.prompt_len, t - 10), t], -1)],
                          1).int()

    write1, write2 = e._slot_writer(pos1), e._slot_writer(pos2)      # the engine's writes

    def head(h_tok):
        return e._head_fn(h_tok, e._lm_w, h_cls=None, safety_weight=None, safety_bias=None,
                          state=None, ess=None, sampling=e._sampling, generator=None)

    def token():
        x = e._forward(tok, pos1, (t - 1)[:, None], kv_len, write1, e._attn_fns[1],
                       dict(seqlens_k=t), e._decode_linears)
        return head(e._norm(x[:, 0]))

    # The score as cheaply as the engine can take it: its prepared (hidden,) head when the
    # fused controller runs (safety_score_ref's casts and 2-class fold done once), else the
    # reference. A costlier score here would count as method and flatter the overhead.
    prepared = getattr(e, "_score_wb", None) if e._fused_ctl else None

    def score(h_cls):
        if prepared is None:
            return safety_score_ref(h_cls, e._sw, e._sb)
        _, w, b = prepared
        return torch.sigmoid(h_cls @ w + b)

    def token_cls():
        x = e._forward(ids2, pos2, q_pos2, kv_len, write2, e._attn_fns[2],
                       dict(seqlens_k=t, response_start=e.state.prompt_len,
                            cls_windows=windows), e._step_linears)   # + adapter
        h = e._norm(x)
        return head(h[:, 0]), score(h[:, 1])

    return {"token": torch.inference_mode()(token), "token+cls": torch.inference_mode()(token_cls)}


def _evals_per_step(results, new_tokens: int) -> float:
    """Mean [CLS] evaluations per decode step (prefill, step 0, excluded)."""
    n = [sum(1 for s in r.trace.eval_steps if s > 0) for r in results]
    return sum(n) / len(n) / max(new_tokens - 1, 1)



def run(args) -> int:
    """Entry point of ``safekern bench`` (see ``safekern.cli``)."""
    from tqdm import tqdm

    from ..ops.timing import environment, format_table, write_csv
    from ..runtime.engine import Engine
    from ..safety.prompts import encode_prompts
    from ..ops.cpu import linear as cpu_linear

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    model_name = args.model
    shape = args.shape if model_name == "tiny" else model_name
    threads = args.threads if args.threads is not None else (1 if shape == "tiny" else 2)
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    on_cpu = device.type == "cpu"
    # --quick only changes defaults: a value the user gave wins.
    batches = args.batch or ([1, 4] if on_cpu and not args.quick else [1] if on_cpu else
                             [1, 16, 64])
    prompt_tokens = args.prompt_tokens or (64 if on_cpu else 1024)
    new_tokens = args.new_tokens or (256 if not on_cpu else 32 if args.quick else 64)
    reps = args.reps or (3 if args.quick else 15)
    if on_cpu:
        t0 = time.perf_counter()
        status("safekern bench: preparing the C++ decode kernels (compiled once per machine and "
               "kernel version, ~20-60 s the first time)...")
        why = cpu_linear.unavailable_reason()
        status(f"safekern bench: C++ kernels {'ready' if why is None else 'unavailable: ' + why}"
               f" ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    status(f"safekern bench: loading model {shape}...")
    model, tok = build(shape, device, dtype) if model_name == "tiny" else \
        build_real(model_name, device, dtype)
    status(f"safekern bench: model {shape} loaded ({time.perf_counter() - t0:.0f} s); timing "
           f"{len(batches)} batch size(s) x {reps} reps")
    env = environment(device)
    need = max(encode_prompts(tok, make_prompts(tok, 1, prompt_tokens)).lengths) + 1 + new_tokens
    engine = Engine(model, tok, backend=args.backend, max_cache_len=need + 8,
                    cuda_graph=device.type == "cuda", ignore_eos=True)
    from ..safety.probe import probe_of

    ess = schedules(cascade=probe_of(model) is not None)
    wanted = getattr(args, "schedules", None)
    if wanted:
        missing = [s for s in wanted if s not in ess]
        if missing:
            raise SystemExit(f"--schedules: {missing[0]!r} is not timed here (known: "
                             f"{', '.join(ess)}; cascade needs a delta with a probe)")
        ess = {s: ess[s] for s in wanted}
    providers = ["off"] + list(ess) + ["transformers"]
    target = p1_target(shape, device.type)
    rows, p2_rows = [], []
    load0 = os.getloadavg()[0]
    runs_per_batch = len(providers) * (reps + 1) + len(ess) + 2 * (2 * reps + 1)
    with tqdm(total=len(batches) * runs_per_batch, desc="safekern bench", unit="run",
              disable=args.no_progress) as bar:
        for B in batches:
            prompts = make_prompts(tok, B, prompt_tokens)
            bar.set_postfix(batch=B)
            fns = {"off": lambda: engine.generate(prompts, max_new_tokens=new_tokens,
                                                  safety=None)}
            evals = {}
            for name, cfg in ess.items():
                fns[name] = (lambda c: lambda: engine.generate(prompts, max_new_tokens=new_tokens,
                                                               safety=c))(cfg)
                evals[name] = _evals_per_step(fns[name](), new_tokens)
                bar.update(1)
            fns["transformers"] = _hf_generate(model, tok, prompts, new_tokens,
                                               "static" if device.type == "cuda" else None)
            med, cpu, samples = _interleaved(fns, reps, device, bar)
            step, _, _ = _interleaved(bare_steps(engine, prompts, new_tokens), 2 * reps, device,
                                      bar)
            row_cost = step["token+cls"] - step["token"]
            off = med["off"]
            for name in ["off", *ess]:
                ratio = med[name] / off
                row = {"model": shape, "batch": B, "provider": name,
                       "ms_per_token": med[name] / new_tokens * 1e3, "vs_off": ratio}
                if name in ess:
                    row["vs_off_noise"] = ratio_noise(samples[name], samples["off"])
                if on_cpu:
                    row["vs_off_cpu_time"] = cpu[name] / cpu["off"]
                if name in ess:
                    # + 0.0: no evaluations times a negative row cost (noise) is -0.0,
                    # which the table would print as "-0".
                    method = evals[name] * row_cost * (new_tokens - 1) / off + 0.0
                    row.update(evals_per_step=evals[name], method_cost=method,
                               impl_overhead=ratio - 1 - method)
                if name == P1_SCHEDULE:
                    row["P1"] = p1_verdict(ratio, row["impl_overhead"], row["vs_off_noise"],
                                           target)
                rows.append(row)
            speedup = med["transformers"] / off
            p2_rows.append({"model": shape, "batch": B, "provider": "transformers",
                            "ms_per_token": med["transformers"] / new_tokens * 1e3,
                            "engine_speedup": speedup,
                            "engine_speedup_noise": ratio_noise(samples["transformers"],
                                                                samples["off"]),
                            "P2": "ok" if speedup >= P2_TARGET[device.type] else "MISS",
                            "bare_step_ms": step["token"] * 1e3,
                            "bare_step_cls_ms": step["token+cls"] * 1e3})
    cores = os.cpu_count()
    load1 = os.getloadavg()[0]
    where = (f"{env['device']}" if device.type == "cuda" else
             f"{env['device']}, {torch.get_num_threads()} torch thread(s)")
    lin = engine._decode_linears
    linear_path = (f"{lin.describe()} (cpu_linear {cpu_linear.isa()})" if
                   engine.cpu_linear_reason is None else "modules")
    controller = ("fused C++" if engine.cpu_controller_reason is None else "reference") \
        if device.type == "cpu" else "head_sample backend"
    print(f"\nmodel {shape} | {where} | torch {env['torch']} | prompt ~{prompt_tokens} tokens | "
          f"{new_tokens} new tokens | backend {args.backend} | median of {reps} | load average "
          f"{load0:.1f} -> {load1:.1f} on {cores} cores\n"
          f"linear path: {linear_path} | controller: {controller}")
    if on_cpu and max(load0, load1) > cores:
        print(f"note: the box was loaded (load average above its {cores} cores): wall times are "
              "noisy; 'CPU time vs off' counts only this process's work")
    print("\nStrategic decoding (ESS on, per re-evaluation schedule) vs the same engine with "
          "safety off:")
    print(format_table(_with_noise(rows, "vs_off"),
                       ["batch", "provider", "ms_per_token", "vs_off", "vs_off_cpu_time",
                        "evals_per_step", "method_cost", "impl_overhead", "P1"], HEADERS))
    print(f"time vs safety off: wall time per token with ESS / without (± noise: half the "
          f"p20-p80 spread of the per-round ratios). cost of the [CLS] row: its own forward "
          f"pass, what the method costs; other overhead: the rest (controller, masks, "
          f"bookkeeping). The paper's budget is {PAPER_BUDGET:.1f}x (annealing). verdict "
          f"({P1_SCHEDULE} only): ok when time vs safety off <= {target:.2f}x and other overhead "
          f"<= {P1_OVERHEAD:.2f}; inconclusive when a miss is smaller than the noise.")
    if engine.cpu_linear_reason is not None and device.type == "cpu":
        print(f"cpu_linear not used: {engine.cpu_linear_reason}")
    print("\nThe engine (safety off) vs transformers generate:")
    print(format_table(_with_noise(p2_rows, "engine_speedup"),
                       ["batch", "provider", "ms_per_token", "engine_speedup", "P2",
                        "bare_step_ms", "bare_step_cls_ms"], HEADERS))
    print(f"engine speed-up: transformers time / engine time, target >= "
          f"{P2_TARGET[device.type]:.1f}x. bare step: one decode step's forward + LM head, "
          f"without and with the [CLS] row (no controller).")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"engine_{shape}_{device.type}")
    env = {**env, "torch_threads": str(torch.get_num_threads()), "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "reps": reps, "linear_path": linear_path,
           "controller": controller, "loadavg_1min_start": f"{load0:.2f}",
           "loadavg_1min": f"{load1:.2f}"}
    print("csv:", write_csv(stem + ".csv", rows + p2_rows, env))
    title = (f"{shape}, {device.type} ({torch.get_num_threads()} thr), prompt ~{prompt_tokens}, "
             f"{new_tokens} new tokens")
    png = _plot(rows, p2_rows, batches, stem + ".png", target, title)
    if png:
        print("plot:", png)
    return 0


# The targets and verdicts live in bench_report; they stay importable from here.
__all__ = ["run", "build", "build_real", "make_prompts", "schedules", "bare_steps", "status",
           "SHAPES", "MODELS", "PAPER_BUDGET", "P1_TARGET", "P1_OVERHEAD", "P2_TARGET",
           "P1_SCHEDULE", "HEADERS", "ratio_noise", "p1_verdict", "verdict_text", "p1_target"]
