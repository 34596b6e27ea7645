"""``safekern bench``: what strategic decoding costs, per token, on a real transformers model.

Question: how much slower is a decode step with ESS on (each schedule) than the same engine with
safety off (P1), and how does the engine with safety off compare with transformers ``generate``
(P2)? Providers run A/B interleaved in one process (CPU: medians of ``time.perf_counter``;
CUDA: synchronised wall time of whole ``generate`` calls, also medians). Random weights: time,
not quality, is measured; EOS is ignored so every run decodes the same number of tokens.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List

import torch

PAPER_BUDGET = 1.2          # paper: < 0.2x overhead with the annealing schedule
P1_TARGET = {"cpu": 1.10, "cuda": 1.05}
P2_TARGET = {"cpu": 1.0, "cuda": 1.5}

SHAPES = {
    "tiny": {},
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
}


def schedules():
    """The ESS configurations compared with safety off (the paper's ablation)."""
    from .spec import EssConfig

    return {"each": EssConfig(schedule="each"), "periodic(10)": EssConfig(schedule="periodic"),
            "annealing": EssConfig(schedule="annealing"), "first": EssConfig(schedule="first")}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """The embedded default tokenizer and a random-weight Llama of ``shape``, attached."""
    import transformers

    from .model import attach
    from .tiny import build_tokenizer, tiny_llama_config

    tok = build_tokenizer()
    over = dict(SHAPES[shape])
    vocab = over.pop("vocab_size", len(tok))
    torch.manual_seed(0)
    cfg = tiny_llama_config(max(vocab, len(tok)), "llama", **over)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    attach(model, tok)
    # A benign-leaning head: a random one may flag at the first evaluation, and a triggered
    # sequence is never evaluated again, which would understate every schedule's cost.
    with torch.no_grad():
        model.safety_head.bias.fill_(-8.0)
    return model, tok


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
    time (with one torch thread on a shared, loaded CPU, CPU time is the steadier measure of
    the work done; wall time is what PERFORMANCE.md asks for, so both are reported)."""
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
            {k: statistics.median(v) for k, v in cpu.items()})


def _hf_generate(model, tok, prompts, new_tokens, cache):
    from .model import encode_prompts

    enc = encode_prompts(tok, prompts)
    L = min(enc.lengths)           # equal lengths: transformers would need left padding
    ids = torch.tensor([x[:L] for x in enc.ids], device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if cache:
        kw["cache_implementation"] = cache
    return lambda: model.generate(ids, **kw)


def run(args) -> int:
    """Entry point of ``safekern bench`` (see ``safekern.cli``)."""
    from tqdm import tqdm

    from .benchmarking import environment, format_table, write_csv
    from .engine import Engine
    from .model import encode_prompts

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.shape == "llama3-8b" and device.type == "cpu":
        raise SystemExit("--shape llama3-8b is a GPU benchmark (~32 GB of fp32 weights on CPU); "
                         "use --device cuda, or --shape small on a CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batches = args.batch or ([1] if args.quick else [1, 4]) if device.type == "cpu" else \
        args.batch or [1, 16, 64]
    prompt_tokens = args.prompt_tokens or (1024 if device.type == "cuda" else 64)
    new_tokens = args.new_tokens or (256 if device.type == "cuda" else (32 if args.quick else 64))
    reps = args.reps or (3 if args.quick else 15)
    model, tok = build(args.shape, device, dtype)
    env = environment(device)
    need = max(encode_prompts(tok, make_prompts(tok, 1, prompt_tokens)).lengths) + 1 + new_tokens
    engine = Engine(model, tok, backend=args.backend, max_cache_len=need + 8,
                    cuda_graph=device.type == "cuda", ignore_eos=True)
    ess = schedules()
    providers = ["off"] + list(ess) + ["transformers"]
    rows = []
    with tqdm(total=len(batches) * len(providers) * (reps + 1), desc="safekern bench",
              unit="run", disable=args.no_progress) as bar:
        for B in batches:
            prompts = make_prompts(tok, B, prompt_tokens)
            fns = {"off": lambda: engine.generate(prompts, max_new_tokens=new_tokens,
                                                  safety=None)}
            for name, cfg in ess.items():
                fns[name] = (lambda c: lambda: engine.generate(prompts, max_new_tokens=new_tokens,
                                                               safety=c))(cfg)
            fns["transformers"] = _hf_generate(model, tok, prompts, new_tokens,
                                               "static" if device.type == "cuda" else None)
            bar.set_postfix(batch=B)
            med, cpu = _interleaved(fns, reps, device, bar)
            off = med["off"]
            for name in providers:
                ms = med[name] / new_tokens * 1e3
                row = {"shape": args.shape, "batch": B, "prompt": prompt_tokens,
                       "new_tokens": new_tokens, "provider": name, "ms_per_token": ms,
                       "vs_off": med[name] / off}
                if device.type == "cpu":
                    row["vs_off_cpu_time"] = cpu[name] / cpu["off"]
                if name in ess:
                    row["P1"] = "ok" if row["vs_off"] <= P1_TARGET[device.type] else "MISS"
                if name == "transformers":
                    row["engine_speedup"] = med[name] / off
                    row["P2"] = "ok" if row["engine_speedup"] >= P2_TARGET[device.type] else "MISS"
                rows.append(row)
    cols = ["batch", "provider", "ms_per_token", "vs_off", "vs_off_cpu_time", "P1",
            "engine_speedup", "P2"]
    print(f"\n{env['device']} | torch {env['torch']} | shape {args.shape} | prompt "
          f"~{prompt_tokens} tokens | {new_tokens} new tokens | backend {args.backend} | "
          f"median of {reps} | {torch.get_num_threads()} torch threads")
    print(format_table(rows, cols))
    print(f"vs_off: time per token relative to the same engine with safety off. Paper budget "
          f"{PAPER_BUDGET:.2f}x (annealing); P1 target <= {P1_TARGET[device.type]:.2f}x "
          f"({device.type}, schedule each). engine_speedup: transformers generate time / engine "
          f"(safety off) time; P2 target >= {P2_TARGET[device.type]:.1f}x. P1/P2 are judged on "
          f"wall time; vs_off_cpu_time is the same ratio in process CPU time.")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"engine_{args.shape}_{device.type}")
    print("csv:", write_csv(stem + ".csv", rows, env))
    png = _plot(rows, batches, stem + ".png", device.type)
    if png:
        print("plot:", png)
    return 0


def _plot(rows, batches, path, devtype):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["provider"] for r in rows if r["batch"] == batches[0]]
    width = 0.8 / len(batches)
    for i, B in enumerate(batches):
        vals = [r["vs_off"] for r in rows if r["batch"] == B]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"batch {B}")
    ax.axhline(PAPER_BUDGET, color="gray", ls="--", label="paper budget 1.2x")
    ax.axhline(P1_TARGET[devtype], color="red", ls=":", label=f"P1 target {P1_TARGET[devtype]}x")
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("time per token / safety off")
    ax.set_title(f"ESS strategic decoding overhead ({devtype})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
