"""The decode step's tail: LM head + safety head + ESS decision + sampling (docs/PERFORMANCE.md P5).

Providers, side by side in one run:
  safekern_triton   safekern.head_sample(backend="triton"): safety score + ESS state update +
                    LM head + sampling; greedy/temperature fold the LM head into a Gumbel-max
                    over vocab tiles (2 launches), top-k/top-p add a pivot search per row.
  torch             matmul + separate safety head (sigmoid) + softmax + sort-based top-k/top-p
                    + multinomial (or argmax), what a plain PyTorch decode loop does.
  cublas+flashinfer matmul + separate safety head + flashinfer's sampling-from-logits kernels
                    (only when flashinfer is importable).
Cases: greedy, temperature 0.8, top-p 0.9, top-k 50 + top-p 0.9. Batch 1..256, vocab 32000
and 128256, hidden 4096, bf16 on GPU.

    python benchmarks/bench_head_sample.py            # GPU shapes (needs CUDA)
    python benchmarks/bench_head_sample.py --quick    # CPU, < 1 minute

On CPU the torch path is timed at the real hidden size with fp32; the Triton kernels run in the
interpreter (TRITON_INTERPRET=1) and are timed only at a tiny shape to show the script path
works: CPU numbers say nothing about GPU kernel speed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # before safekern defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safekern import EssConfig, EssState, SamplingParams, head_sample  # noqa: E402
from safekern.ops.timing import environment, format_table, time_fn, write_csv  # noqa: E402

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
}


def _safety_and_logits(h, W, h_cls, w_safe, T: float):
    """The unfused stages every baseline shares: a separate safety head, the LM-head GEMM and
    the temperature (greedy keeps raw logits)."""
    p_unsafe = torch.sigmoid(h_cls.float() @ w_safe.float())
    logits = (h @ W.t()).float()
    return p_unsafe, (logits if T == 0 else logits / T)


def torch_path(h, W, h_cls, w_safe, case: dict, gen) -> Callable:
    """The unfused baseline: every stage its own kernel(s), sort-based top-p."""
    T, k, p = case.get("temperature", 0.0), case.get("top_k", 0), case.get("top_p", 1.0)

    def run():
        p_unsafe, logits = _safety_and_logits(h, W, h_cls, w_safe, T)
        if T == 0:
            return logits.argmax(-1), p_unsafe
        if k > 0:
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sp = sorted_logits.softmax(-1)
            drop = (sp.cumsum(-1) - sp) >= p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1), p_unsafe
    return run


def flashinfer_path(h, W, h_cls, w_safe, case: dict) -> Optional[Callable]:
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return None
    T, k, p = case.get("temperature", 0.0), case.get("top_k", 0), case.get("top_p", 1.0)

    def run():
        p_unsafe, logits = _safety_and_logits(h, W, h_cls, w_safe, T)
        if T == 0:
            return logits.argmax(-1), p_unsafe
        if k > 0 and p < 1:
            return fs.top_k_top_p_sampling_from_logits(logits, k, p), p_unsafe
        if p < 1:
            return fs.top_p_sampling_from_probs(torch.softmax(logits, -1), p), p_unsafe
        return fs.sampling_from_probs(torch.softmax(logits, -1)), p_unsafe
    return run


def safekern_path(h, W, h_cls, w_safe, case: dict, device) -> Callable:
    """Every row evaluates the [CLS] score each step (schedule ``each``); threshold 1.0 keeps
    every row BENIGN, so each call does the same work."""
    B = h.shape[0]
    ess = EssConfig(schedule="each", threshold=1.0)
    state = EssState.create([8] * B, [1] * B, [7] * B, [1, 2, 3], ess, device=device)
    state.evaluating.fill_(True)
    sp = SamplingParams(**case, seed=0)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    return lambda: head_sample(h, W, h_cls=h_cls, safety_weight=w_safe, state=state, ess=ess,
                               sampling=sp, rng_state=rng, backend="triton")


def bench(device, dtype, batches, vocabs, hidden, cases, reps, triton_max_elems) -> List[dict]:
    rows = []
    os.environ.setdefault("SAFEKERN_SKIP_VALUE_CHECKS", "1")  # no host syncs in the timed loop
    for V in vocabs:
        g = torch.Generator(device=device).manual_seed(0)
        W = (torch.randn(V, hidden, device=device, generator=g) / hidden ** 0.5).to(dtype)
        w_safe = (torch.randn(hidden, device=device, generator=g) / hidden ** 0.5).to(dtype)
        for B in batches:
            h = torch.randn(B, hidden, device=device, generator=g).to(dtype)
            h_cls = torch.randn(B, hidden, device=device, generator=g).to(dtype)
            for name in cases:
                case = CASES[name]
                providers: Dict[str, Callable] = {
                    "torch": torch_path(h, W, h_cls, w_safe, case, g)}
                fi = flashinfer_path(h, W, h_cls, w_safe, case)
                if fi is not None:
                    providers["cublas+flashinfer"] = fi
                if device.type == "cuda" or V * hidden * B <= triton_max_elems:
                    providers["safekern_triton"] = safekern_path(h, W, h_cls, w_safe, case,
                                                                 device)
                res = {}
                for pname, fn in providers.items():
                    res[pname] = time_fn(fn, device=device, warmup=1, reps=reps)["ms"]
                lm_bytes = V * hidden * W.element_size()
                for pname, ms in res.items():
                    rows.append({"vocab": V, "hidden": hidden, "batch": B, "case": name,
                                 "provider": pname, "ms": ms,
                                 "lm_head_GBps": lm_bytes / (ms * 1e-3) / 1e9,
                                 "speedup_vs_torch": res["torch"] / ms})
                print(f"V={V} B={B} {name}: " +
                      ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()), flush=True)
    return rows


def plot(rows: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    keys = sorted({(r["vocab"], r["case"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, (V, case) in zip(axes[0], keys):
        sel = [r for r in rows if r["vocab"] == V and r["case"] == case]
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["batch"], r["ms"]) for r in sel if r["provider"] == prov)
            ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"V={V} {case}", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.suptitle(environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                 ["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CPU run (< 1 minute)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out/head_sample")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.quick:
        rows = bench(device, torch.bfloat16, [1, 2, 4, 8, 16, 32, 64, 128, 256],
                     [32000, 128256], 4096, list(CASES), args.reps or 20, 0)
    else:
        if device.type != "cuda":
            print("CPU: torch path at hidden 4096 (fp32); safekern_triton only at the tiny "
                  "shape, in the Triton interpreter (not a speed measurement)")
        rows = bench(device, torch.float32, [1, 8], [32000], 4096, ["greedy", "top_p"],
                     args.reps or 3, 0)
        rows += bench(device, torch.float32, [4], [111], 64, list(CASES), args.reps or 3,
                      10**6)
    cols = ["vocab", "hidden", "batch", "case", "provider", "ms", "lm_head_GBps",
            "speedup_vs_torch"]
    print(format_table(rows, cols))
    print("csv:", write_csv(args.out + ".csv", rows, environment(device)))
    png = plot(rows, args.out + ".png")
    if png:
        print("plot:", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
