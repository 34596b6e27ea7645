"""Is the CUDA backend faster than Triton on decode shapes? (fills cuda_backend.AUTO_TABLE)

One question, both decode-time ops, providers side by side in one run (GPU only):
  * ess_attention, fused decode step (token row + [CLS] row, windows, key bias), bf16,
    Hq=32, Hkv=8, D=128: cuda, triton, cuda with the ESS features off (P4: <= 3% slower),
    and the device-to-device copy of the same K/V bytes (the bandwidth ceiling).
  * head_sample, vocab 128256, hidden 4096, bf16, greedy and temperature 0.8: cuda, triton,
    torch (matmul + softmax + multinomial), against the LM-head read at copy bandwidth.
Writes ``<out>/cuda_decode.csv`` (one row per shape x provider, with the AUTO_TABLE bucket) and
``<out>/auto_table_suggestion.txt`` (buckets where cuda beat triton on every shape).

    python benchmarks/bench_cuda_decode.py --out bench_out [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

os.environ.setdefault("SAFEKERN_SKIP_VALUE_CHECKS", "1")  # value checks sync with the host

import torch  # noqa: E402

import safekern  # noqa: E402
from safekern.ops.timing import environment, format_table, time_fn, write_csv  # noqa: E402
from safekern.ops import cuda_backend, dispatch  # noqa: E402
from safekern.spec import EssConfig, EssState, SamplingParams  # noqa: E402


def _copy_ms(nbytes: int, dev) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=dev)["ms"]


def bench_attention(dev, quick):
    Hq, Hkv, D, dt = 32, 8, 128, torch.bfloat16
    rows = []
    for B in ((1, 16) if quick else (1, 16, 64)):
        for ctx in ((1024, 8192) if quick else (1024, 8192, 32768)):
            k = torch.randn(B, ctx, Hkv, D, device=dev, dtype=dt)
            v = torch.randn_like(k)
            q = torch.randn(B, 2, Hq, D, device=dev, dtype=dt)
            seqlens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            P = torch.full((B,), ctx // 2, dtype=torch.int32, device=dev)
            q_pos = torch.stack([seqlens - 1, torch.zeros_like(seqlens)], 1)
            win = torch.stack([torch.stack([P * 0 + 1, P // 2], -1),
                               torch.stack([seqlens - 10, seqlens], -1)], 1)
            bias = torch.randn(B, 1, ctx, device=dev)
            ess = dict(q_pos=q_pos, seqlens_k=seqlens, response_start=P, cls_windows=win,
                       key_bias=bias)
            plain = dict(q_pos=q_pos, seqlens_k=seqlens)
            kv_bytes = 2 * k.numel() * k.element_size()
            ctx_d = dict(device=dev, dtype=dt, head_dim=D, seqlen_q=2, seqlen_k=ctx,
                         requires_grad=False)
            bucket = cuda_backend.shape_bucket("ess_attention", **ctx_d)
            cases = {"cuda": ("cuda", ess), "triton": ("triton", ess),
                     "cuda_ess_off": ("cuda", plain)}
            for name, (backend, kw) in cases.items():
                why = dispatch.available("ess_attention", **ctx_d).get(backend, "not registered")
                row = dict(op="ess_attention", bucket=bucket, B=B, ctx=ctx, provider=name)
                if why is not None:
                    rows.append({**row, "error": why})
                    continue
                fn = lambda b=backend, kw=kw: safekern.ess_attention(  # noqa: E731
                    q, k, v, backend=b, **kw)
                t = time_fn(fn, device=dev)
                rows.append({**row, **t, "GB/s": kv_bytes / t["ms"] / 1e6})
            cp = _copy_ms(kv_bytes, dev)
            rows.append(dict(op="ess_attention", bucket=bucket, B=B, ctx=ctx, provider="copy",
                             ms=cp, **{"GB/s": 2 * kv_bytes / cp / 1e6}))
            del k, v
    return rows


def bench_head_sample(dev, quick):
    V, Dm, dt = 128256, 4096, torch.bfloat16
    w = torch.randn(V, Dm, device=dev, dtype=dt) / Dm ** 0.5
    sw = torch.randn(Dm, device=dev)
    ess = EssConfig()
    rows = []
    for B in ((1, 64) if quick else (1, 8, 64, 256)):
        h = torch.randn(B, Dm, device=dev, dtype=dt)
        h_cls = torch.randn(B, Dm, device=dev, dtype=dt)
        P = torch.full((B,), 100, dtype=torch.int32, device=dev)
        state = EssState.create(P, P * 0 + 1, P - 1, [1, 2, 3], ess, device=dev)
        state.evaluating.fill_(True)  # every row scores its [CLS] state: the costliest step
        for temp in (0.0, 0.8):
            sampling = SamplingParams(temperature=temp)
            gen = torch.Generator(device=dev).manual_seed(0) if temp else None
            ctx_d = dict(device=dev, dtype=dt, batch=B, vocab=V, hidden=Dm, sampling=sampling)
            bucket = cuda_backend.shape_bucket("head_sample", **ctx_d)
            for backend in ("cuda", "triton", "torch"):
                row = dict(op="head_sample", bucket=bucket, B=B, temperature=temp,
                           provider=backend)
                why = dispatch.available("head_sample", **ctx_d).get(backend, "not registered")
                if why is not None:
                    rows.append({**row, "error": why})
                    continue
                # A fresh state per call would time the clone; the state just keeps evolving.
                fn = lambda b=backend: safekern.head_sample(  # noqa: E731
                    h, w, h_cls=h_cls, safety_weight=sw, state=state, ess=ess,
                    sampling=sampling, generator=gen, backend=b)
                t = time_fn(fn, device=dev)
                rows.append({**row, **t, "GB/s": w.numel() * 2 / t["ms"] / 1e6})
    cp = _copy_ms(w.numel() * 2, dev)
    rows.append(dict(op="head_sample", provider="copy", ms=cp,
                     **{"GB/s": 2 * w.numel() * 2 / cp / 1e6}))
    return rows


def suggest_auto_table(rows):
    """Buckets where cuda was faster than triton on every measured shape."""
    wins = defaultdict(list)
    by_shape = defaultdict(dict)
    for r in rows:
        if "ms" in r and r["provider"] in ("cuda", "triton"):
            key = (r["op"], r["bucket"], r.get("B"), r.get("ctx"), r.get("temperature"))
            by_shape[key][r["provider"]] = r["ms"]
    for (op, bucket, *_), t in by_shape.items():
        if "cuda" in t:
            wins[(op, bucket)].append("triton" not in t or t["cuda"] < t["triton"])
    return {k: ("cuda", "triton") for k, v in wins.items() if all(v)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_decode needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    err = cuda_backend.extension_error()
    if err is not None:
        print(f"building the extension with load_jit(): {err}", file=sys.stderr)
        cuda_backend.load_jit()
    rows = bench_attention(dev, args.quick) + bench_head_sample(dev, args.quick)
    env = environment(dev)
    path = write_csv(os.path.join(args.out, "cuda_decode.csv"), rows, env)
    print(env)
    print(format_table(rows, ["op", "bucket", "B", "ctx", "temperature", "provider", "ms",
                              "GB/s", "error"]))
    table = suggest_auto_table(rows)
    with open(os.path.join(args.out, "auto_table_suggestion.txt"), "w") as f:
        f.write(f"# from {path} on {env['device']}, torch {env['torch']}\n")
        for key, order in sorted(table.items()):
            f.write(f"{key!r}: {order!r},\n")
    print(f"wrote {path}; AUTO_TABLE suggestion: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
