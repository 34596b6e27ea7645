"""ESS attention speed: prefill TFLOP/s and decode GB/s, safekern vs the usual kernels.

Questions answered (docs/PERFORMANCE.md P3, P4):
  prefill  causal, bf16, head dim 128: safekern-triton (ESS on, ESS + key bias, ESS off) vs
           the reference, SDPA (flash / efficient), FlexAttention with the equivalent
           mask_mod + score_mod (block-mask build included, and without it), flash-attn.
  decode   KV cache ctx >= 8k, batch 1..64: the fused ESS step (token row + [CLS] row,
           windows, key bias) vs the same kernel with ESS off (one token row), SDPA,
           FlexAttention, flash_attn_with_kvcache, and the copy bandwidth ceiling.
  train    forward + backward (dq, dk, dv) of the prefill shapes: safekern (ESS + key bias,
           ESS off) vs the reference, FlexAttention (same mask_mod/score_mod), SDPA and
           flash-attn causal; TFLOP/s (3.5x the forward's causal FLOPs) and, on a GPU, the
           peak memory allocated by one step.

    python benchmarks/bench_attention.py            # GPU shapes (needs CUDA)
    python benchmarks/bench_attention.py --quick    # small CPU shapes, < 1 minute

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1): CPU numbers say the
script works, nothing about kernel speed. Timing: ``safekern.ops.timing.time_fn``
(``triton.testing.do_bench`` on GPU, perf_counter medians on CPU); decode on GPU is timed
inside a CUDA graph (``do_bench_cudagraph``) as the engine runs it, falling back to do_bench
for a provider that cannot be captured. safekern is called through its launcher, as the
engine does (the public function adds value checks that synchronise with the GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # before safekern defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safekern.ops.attention_triton import _attention_triton, _ess_attention_fwd_op  # noqa: E402
from safekern.ops.timing import environment, format_table, time_fn, write_csv  # noqa: E402
from safekern.reference import ess_attention_ref  # noqa: E402


def i32(x, device):
    return torch.tensor(x, dtype=torch.int32, device=device)


def ess_metadata(B: int, L: int, Hq: int, device, *, decode: bool):
    """A realistic ESS call: prompt = first quarter, [CLS] windows = query span + latest 10."""
    P = max(2, L // 4)
    rs = i32([P] * B, device)
    cls_windows = i32([[[1, P], [max(P, L - 10), L]]] * B, device)
    key_bias = torch.zeros(B, 1, L, device=device)
    key_bias[:, :, 0] = 0.5  # boosts the [CLS] key for response rows
    if decode:  # token row at t-1 and the [CLS] re-evaluation row
        q_pos = i32([[L - 1, 0]] * B, device)
    else:
        q_pos = torch.arange(L, dtype=torch.int32, device=device)[None].expand(B, L).contiguous()
    return dict(q_pos=q_pos, response_start=rs, cls_windows=cls_windows), key_bias


def flex_providers(q, k, v, meta, key_bias, device) -> Dict[str, Callable]:
    """FlexAttention with the ESS visibility as mask_mod and the key bias as score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Lq, Hq, D = q.shape
    Lk = k.shape[1]
    q_pos, rs, cw = meta["q_pos"], meta["response_start"], meta["cls_windows"]
    seqlens = torch.full((B,), Lk, dtype=torch.int32, device=device)
    W = cw.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_pos[b, q_idx]
        normal = (pos > 0) & (kv_idx <= pos) & ((kv_idx > 0) | (pos >= rs[b]))
        cls = kv_idx == 0
        for w in range(W):
            cls = cls | ((kv_idx >= cw[b, w, 0]) & (kv_idx < cw[b, w, 1]))
        return (kv_idx < seqlens[b]) & (normal | ((pos == 0) & cls))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + key_bias[b, 0, kv_idx]

    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" \
        else flex_attention
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def build():
        return create_block_mask(mask_mod, B, None, Lq, Lk, device=device)

    block_mask = build()

    def run(bm):
        return flex(qt, kt, vt, score_mod=score_mod, block_mask=bm, enable_gqa=True)

    return {"flex_incl_mask_build": lambda: run(build()), "flex": lambda: run(block_mask)}


def sdpa_providers(q, k, v, causal) -> Dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = {}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                     ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                      enable_gqa=True)
        out[name] = fn
    return out


def flash_attn_providers(q, k, v, decode: bool) -> Dict[str, Callable]:
    try:
        import flash_attn
    except ImportError:
        return {}
    if decode:
        return {"flash_attn_kvcache": lambda: flash_attn.flash_attn_with_kvcache(
            q, k, v, causal=True)}
    return {"flash_attn": lambda: flash_attn.flash_attn_func(q, k, v, causal=True)}


def _graph_ms(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn)
    except Exception:  # noqa: BLE001  (not capturable, e.g. a host sync inside)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn)


def measure(providers: Dict[str, Callable], device, reps: int,
            graph: bool = False) -> Dict[str, Optional[float]]:
    """``{name: ms or None}``; a provider that cannot run on this device prints why."""
    res = {}
    for name, fn in providers.items():
        try:
            fn()
            if graph and device.type == "cuda":
                res[name] = _graph_ms(fn)
            else:
                res[name] = time_fn(fn, device=device, warmup=0, reps=reps)["ms"]  # fn() warmed up
        except Exception as e:  # noqa: BLE001  (a baseline missing on this device/shape)
            print(f"  skip {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            res[name] = None
    return res


def bench_prefill(device, dtype, shapes, Hq, Hkv, D, reps, ref_max_bytes) -> List[dict]:
    rows = []
    for B, L in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, L, Hq, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=g)
        meta, kb = ess_metadata(B, L, Hq, device, decode=False)
        providers = {
            "safekern_ess_off": lambda: _attention_triton(q, k, v),
            "safekern_ess": lambda: _attention_triton(q, k, v, **meta),
            "safekern_ess_bias": lambda: _attention_triton(q, k, v, key_bias=kb, **meta),
        }
        if B * Hq * L * L * 4 * 3 <= ref_max_bytes:  # the dense reference needs (L, L) scores
            providers["reference"] = lambda: ess_attention_ref(q, k, v, key_bias=kb, **meta)
        providers.update(sdpa_providers(q, k, v, causal=True))
        providers.update(flex_providers(q, k, v, meta, kb, device))
        providers.update(flash_attn_providers(q, k, v, decode=False))
        print(f"prefill B={B} L={L}")
        flops = 4 * B * Hq * D * L * L / 2  # causal: half of the score matrix
        for name, ms in measure(providers, device, reps).items():
            if ms is not None:
                rows.append({"bench": "prefill", "provider": name, "batch": B, "seqlen": L,
                             "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12})
    return rows


def bench_decode(device, dtype, ctxs, batches, Hq, Hkv, D, reps) -> List[dict]:
    rows = []
    for ctx in ctxs:
        for B in batches:
            g = torch.Generator(device=device).manual_seed(1)
            k = torch.randn(B, ctx, Hkv, D, device=device, dtype=dtype, generator=g)
            v = torch.randn(B, ctx, Hkv, D, device=device, dtype=dtype, generator=g)
            q2 = torch.randn(B, 2, Hq, D, device=device, dtype=dtype, generator=g)
            q1 = q2[:, :1]
            meta, kb = ess_metadata(B, ctx, Hq, device, decode=True)
            providers = {
                "safekern_ess_off": lambda: _attention_triton(q1, k, v),
                "safekern_ess": lambda: _attention_triton(q2, k, v, key_bias=kb, **meta),
                "reference": lambda: ess_attention_ref(q2, k, v, key_bias=kb, **meta),
            }
            providers.update(sdpa_providers(q1, k, v, causal=False))
            providers.update(flex_providers(q2, k, v, meta, kb, device))
            providers.update(flash_attn_providers(q1, k, v, decode=True))
            print(f"decode B={B} ctx={ctx}")
            kv_bytes = 2 * B * ctx * Hkv * D * k.element_size()
            res = measure(providers, device, reps, graph=True)
            for name, ms in res.items():
                if ms is not None:
                    rows.append({"bench": "decode", "provider": name, "batch": B, "seqlen": ctx,
                                 "ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9})
            if res.get("safekern_ess") and res.get("safekern_ess_off"):
                rows.append({"bench": "decode", "provider": "ess_on/ess_off", "batch": B,
                             "seqlen": ctx, "ratio": res["safekern_ess"] / res["safekern_ess_off"]})
    return rows


def _fwd_bwd(fwd, leaves, do):
    """One training step of an attention provider: forward, then dq, dk, dv."""
    def step():
        torch.autograd.grad(fwd(*leaves), leaves, do)
    return step


def _peak_mb(fn, device) -> Optional[float]:
    """Peak memory one call allocates beyond what is live before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_train(device, dtype, shapes, Hq, Hkv, D, reps, ref_max_bytes) -> List[dict]:
    """Forward + backward. safekern runs its training path (the autograd custom op, i.e.
    forward kernel + backward kernels), without the public function's value checks."""
    rows = []
    for B, L in shapes:
        g = torch.Generator(device=device).manual_seed(2)
        q = torch.randn(B, L, Hq, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=g)
        do = torch.randn(B, L, Hq, D, device=device, dtype=dtype, generator=g)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        meta, kb = ess_metadata(B, L, Hq, device, decode=False)
        scale = D ** -0.5

        def safekern(ess, bias):
            m = meta if ess else dict(q_pos=None, response_start=None, cls_windows=None)
            return lambda q, k, v: _ess_attention_fwd_op(
                q, k, v, m["q_pos"], None, m["response_start"], m["cls_windows"],
                kb if bias else None, scale, True)[0]

        fwds = {"safekern_ess_off": safekern(False, False),
                "safekern_ess_bias": safekern(True, True)}
        if B * Hq * L * L * 4 * 6 <= ref_max_bytes:  # scores, probabilities and their grads
            fwds["reference"] = lambda q, k, v: ess_attention_ref(q, k, v, key_bias=kb, **meta)
        providers = {name: _fwd_bwd(f, leaves, do) for name, f in fwds.items()}
        # SDPA and FlexAttention return (B, H, L, D): back to the (B, L, H, D) of do
        for name, fn in {**sdpa_providers(q, k, v, causal=True),
                         **flex_providers(q, k, v, meta, kb, device)}.items():
            providers[name] = _fwd_bwd(lambda *_, fn=fn: fn().transpose(1, 2), leaves, do)
        for name, fn in flash_attn_providers(q, k, v, decode=False).items():
            providers[name] = _fwd_bwd(lambda *_, fn=fn: fn(), leaves, do)
        print(f"train (fwd+bwd) B={B} L={L}")
        flops = 3.5 * 4 * B * Hq * D * L * L / 2  # causal forward x (1 + 2.5 for the backward)
        for name, ms in measure(providers, device, reps).items():
            if ms is not None:
                row = {"bench": "train", "provider": name, "batch": B, "seqlen": L, "ms": ms,
                       "tflops": flops / (ms * 1e-3) / 1e12}
                peak = _peak_mb(providers[name], device)
                if peak is not None:
                    row["peak_mb"] = peak
                rows.append(row)
    return rows


def targets(rows: List[dict]) -> List[dict]:
    """The docs/PERFORMANCE.md ratios: P3 (prefill vs FA2 and FlexAttention), P4 (decode vs copy
    bandwidth; ESS on vs off is already a row per shape)."""
    out = []
    by = {(r["bench"], r["provider"], r.get("batch"), r.get("seqlen")): r for r in rows}
    copy = next((r["gbps"] for r in rows if r["bench"] == "copy"), None)
    for (bench, prov, B, L), r in by.items():
        if bench in ("prefill", "train") and prov in ("safekern_ess_off", "safekern_ess_bias"):
            fa2 = by.get((bench, "flash_attn", B, L)) or by.get((bench, "sdpa_flash", B, L))
            flex = by.get((bench, "flex_incl_mask_build", B, L))
            if fa2 and prov == "safekern_ess_off":
                out.append({"bench": f"P3 {bench}", "provider": f"{prov}/{fa2['provider']}",
                            "batch": B, "seqlen": L, "ratio": r["tflops"] / fa2["tflops"]})
            if flex and prov == "safekern_ess_bias":
                out.append({"bench": f"P3 {bench}", "provider": f"{prov}/flex", "batch": B,
                            "seqlen": L, "ratio": r["tflops"] / flex["tflops"]})
        if bench == "decode" and prov == "safekern_ess" and copy:
            out.append({"bench": "P4", "provider": "safekern_ess/copy_bw", "batch": B,
                        "seqlen": L, "ratio": r["gbps"] / copy})
    return out


def copy_bandwidth(device, reps) -> dict:
    x = torch.empty(256 * 2**20 if device.type == "cuda" else 16 * 2**20, dtype=torch.uint8,
                    device=device)
    y = torch.empty_like(x)
    ms = time_fn(lambda: y.copy_(x), device=device, reps=reps)["ms"]
    return {"bench": "copy", "provider": "copy_", "ms": ms, "gbps": 2 * x.numel() / ms / 1e6}


def plot(rows: List[dict], path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, bench, metric, xkey in ((axes[0], "prefill", "tflops", "seqlen"),
                                    (axes[1], "decode", "gbps", "batch")):
        sel = [r for r in rows if r["bench"] == bench and metric in r]
        ctx = max((r["seqlen"] for r in sel), default=None)
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r[xkey], r[metric]) for r in sel if r["provider"] == prov
                         and (bench == "prefill" or r["seqlen"] == ctx))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xlabel(xkey if bench == "prefill" else f"batch (ctx {ctx})")
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s (K+V bytes)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(bench)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU shapes (< 1 minute)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default="bench_out/attention")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.quick:
        dtype, Hq, Hkv, D = torch.bfloat16, 32, 8, 128
        prefill_shapes = [(4, 4096), (2, 8192), (1, 16384)]
        ctxs, batches = [8192, 32768], [1, 8, 64]
        reps, ref_max = args.reps or 100, 8 * 2**30
    else:  # the interpreter is slow: tiny shapes, fp32 (CPU bf16 matmuls are emulated)
        dtype, Hq, Hkv, D = (torch.float32, 2, 1, 64) if device.type == "cpu" \
            else (torch.bfloat16, 32, 8, 128)
        prefill_shapes = [(1, 64), (1, 128)]
        ctxs, batches = [512], [1, 2]
        reps, ref_max = args.reps or 2, 2**30
        # eager FlexAttention on CPU warns that it materialises the scores: expected here
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"dtype {dtype}  Hq {Hq} Hkv {Hkv} D {D}"
          + ("  [CPU: Triton runs in the interpreter]" if device.type == "cpu" else ""))
    rows = bench_prefill(device, dtype, prefill_shapes, Hq, Hkv, D, reps, ref_max)
    rows += bench_decode(device, dtype, ctxs, batches, Hq, Hkv, D, reps)
    rows += bench_train(device, dtype, prefill_shapes, Hq, Hkv, D, reps, ref_max)
    rows.append(copy_bandwidth(device, reps))
    rows += targets(rows)
    print(format_table(rows, ["bench", "provider", "batch", "seqlen", "ms", "tflops", "gbps",
                              "peak_mb", "ratio"]))
    print("csv:", write_csv(args.out + ".csv", rows, env))
    print("plot:", plot(rows, args.out + ".png", f"ess_attention on {env['device']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
