"""``safekern bench``'s targets, verdicts and report: the P1/P2 targets (docs/PERFORMANCE.md),
the noise of a ratio and the verdict it allows, the text table's headers and noise columns, and
the PNG plot. ``safekern.evaluation.bench`` times; this module judges and draws.
"""
from __future__ import annotations

import statistics
from typing import List

PAPER_BUDGET = 1.2          # paper: < 0.2x overhead with the annealing schedule
P1_TARGET = {"tiny": 1.15, "cpu": 1.25, "cuda": 1.05}   # docs/PERFORMANCE.md, P1
P1_OVERHEAD = 0.05          # implementation overhead budget (fraction of safety off)
P2_TARGET = {"cpu": 1.0, "cuda": 1.5}
P1_SCHEDULE = "each"

# The text table's headers: the CSV keeps the short names (scripts read them), a reader of the
# terminal gets words.
HEADERS = {"ms_per_token": "ms/token", "vs_off": "time vs safety off",
           "vs_off_cpu_time": "CPU time vs off", "evals_per_step": "[CLS] checks/token",
           "method_cost": "cost of the [CLS] row", "impl_overhead": "other overhead",
           "P1": "verdict", "engine_speedup": "engine speed-up", "P2": "verdict",
           "bare_step_ms": "bare step ms", "bare_step_cls_ms": "bare step + [CLS] ms"}


def ratio_noise(samples: List[float], base: List[float]) -> float:
    """Half the p20-p80 range of the per-round ratios ``samples[i] / base[i]`` (NaN with fewer
    than 2 rounds: no spread to measure)."""
    ratios = [a / b for a, b in zip(samples, base)]
    if len(ratios) < 2:
        return float("nan")
    q = statistics.quantiles(ratios, n=5, method="inclusive")
    return (q[3] - q[0]) / 2


def p1_verdict(ratio: float, impl_overhead: float, noise: float, target: float) -> str:
    """``"ok"``, ``"MISS"``, or ``"inconclusive"`` when the miss is within the noise (a NaN
    noise, from one repetition, cannot excuse a miss)."""
    miss = max(ratio - target, impl_overhead - P1_OVERHEAD)
    if miss <= 0:
        return "ok"
    return "inconclusive" if miss <= noise else "MISS"


def verdict_text(verdict: str, noise: float) -> str:
    """The verdict as the table prints it."""
    if verdict != "inconclusive":
        return verdict
    what = "the budget" if noise > P1_OVERHEAD else "the miss"
    return f"inconclusive: noise larger than {what}"


def p1_target(model: str, devtype: str) -> float:
    return P1_TARGET["cuda"] if devtype == "cuda" else \
        P1_TARGET["tiny"] if model == "tiny" else P1_TARGET["cpu"]


def _with_noise(rows, column: str):
    """Copies of ``rows`` whose ``column`` reads "1.12 ±0.03" and whose verdict is spelled out,
    for the text table."""
    out = []
    for r in rows:
        r = dict(r)
        noise = r.get(column + "_noise")
        if noise is not None:
            r[column] = f"{r[column]:.3g} ±{noise:.2f}" if noise == noise else \
                f"{r[column]:.3g} ±?"
        if "P1" in r:
            r["P1"] = verdict_text(r["P1"], noise)
        out.append(r)
    return out


def _plot(rows, p2_rows, batches, path, target, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib")
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.4),
                                  gridspec_kw={"width_ratios": [4, 1.3]})
    names = [r["provider"] for r in rows if r["batch"] == batches[0] and r["provider"] != "off"]
    width = 0.8 / len(batches)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, B in enumerate(batches):
        sel = {r["provider"]: r for r in rows if r["batch"] == B}
        xs = [j + i * width for j in range(len(names))]
        method = [1 + sel[n]["method_cost"] for n in names]
        total = [sel[n]["vs_off"] for n in names]
        c = colors[i % len(colors)]
        ax.bar(xs, method, width, color=c, label=f"batch {B}: safety off + method cost")
        ax.bar(xs, [t - m for t, m in zip(total, method)], width, bottom=method, color=c,
               alpha=0.35, hatch="//", label=f"batch {B}: + implementation overhead")
    ax.axhline(PAPER_BUDGET, color="gray", ls="--", label=f"paper budget {PAPER_BUDGET}x")
    ax.axhline(target, color="red", ls=":", label=f"P1 target {target}x (each)")
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("time per token / safety off")
    ax.set_ylim(0.9, max(1.4, max(r["vs_off"] for r in rows) * 1.08))
    ax.set_title("P1: strategic decoding vs safety off", fontsize=10)
    fig.legend(fontsize=7, loc="lower center", ncol=3, frameon=False)  # below: covers no bar
    ax2.bar([str(r["batch"]) for r in p2_rows], [r["engine_speedup"] for r in p2_rows],
            color="tab:gray")
    ax2.axhline(1.0, color="red", ls=":")
    ax2.set_xlabel("batch")
    ax2.set_ylabel("transformers time / engine time")
    ax2.set_title("P2: engine vs transformers", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
