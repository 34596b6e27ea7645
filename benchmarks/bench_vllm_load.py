"""``safekern serve`` under concurrent streaming load: ESS off vs on, time to first token and
tokens/s (SmolLM2 + the shipped delta, the load test's traffic:
safekern.integrations.vllm.loadtest).

For each ``--max-num-seqs`` value: start ``safekern serve`` (a fresh server), one warm-up round,
then ``--reps`` times a round of 64 concurrent streaming chat requests per ESS setting,
interleaved (off, on = the checkpoint's default ``first`` schedule, each = re-checked every
step). Prints and writes (``--out``/bench_vllm_load.csv) per setting the medians over the reps
of: p50/p99 time to first token, the median stream's decode rate, the aggregate output tokens/s
of the round, and the peak running/waiting requests vLLM reported.

    python benchmarks/bench_vllm_load.py --max-num-seqs 16 64 --reps 3 [--eager]
"""
import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from safekern.integrations.vllm import loadtest as lt

SETTINGS = {"off": [(f"off{j}", None) for j in range(4)],
            "on": [(f"on{j}", {}) for j in range(4)],
            "each": [(f"each{j}", {"schedule": "each"}) for j in range(4)]}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(seqs, eager, log):
    port = _free_port()
    cmd = [sys.executable, "-m", "safekern.cli", "serve", "--model", "smollm2", "--port",
           str(port), "--kv-cache-gib", "1", "--", "--max-num-seqs", str(seqs),
           "--max-model-len", "1024", "--seed", "0"] + (["--enforce-eager"] if eager else [])
    out = open(log, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while "safekern serve:" not in open(log).read():
        if proc.poll() is not None:
            raise RuntimeError(f"safekern serve exited:\n{open(log).read()[-3000:]}")
        if time.perf_counter() - t0 > 900:
            raise TimeoutError("safekern serve did not come up in 900 s")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{port}", time.perf_counter() - t0


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=14)
    ap.add_argument("--eager", action="store_true", help="vLLM's --enforce-eager (the tests' "
                    "mode: ~20 s start instead of ~100 s, slower steps)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.max_tokens < 2 or min(args.max_num_seqs) < 1:
        ap.error("--reps, --max-num-seqs must be >= 1 and --max-tokens >= 2")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seqs in args.max_num_seqs:
        with tempfile.TemporaryDirectory(prefix="bench-vllm-load-") as d:
            proc, base, start = _start(seqs, args.eager, os.path.join(d, "serve.log"))
            try:
                print(f"max_num_seqs {seqs}: server up in {start:.0f} s "
                      f"({'eager' if args.eager else 'compiled'}); load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
                lt.run_round(base, "smollm2-ess",
                             lt.mixed_requests("warm", args.max_tokens), poll=None)
                got = {name: [] for name in SETTINGS}
                for rep in range(args.reps):
                    for name, variants in SETTINGS.items():
                        res, wall, peaks = lt.run_round(
                            base, "smollm2-ess",
                            lt.mixed_requests(f"{name}{rep}", args.max_tokens, variants))
                        bad = [r.key for r in res if not r.ok]
                        if bad:
                            raise RuntimeError(f"{len(bad)} requests failed: {bad[:5]}")
                        got[name].append({**lt.summarize(res, wall), "wall_s": wall,
                                          "peak_running": peaks["running"],
                                          "peak_waiting": peaks["waiting"]})
                load = os.getloadavg()[0]
            finally:
                _stop(proc)
        for name, reps in got.items():
            med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
            row = {"max_num_seqs": seqs, "ess": name, "mode": "eager" if args.eager else
                   "compiled", "load": round(load, 1), **{k: round(v, 1) for k, v in
                                                          med.items()}}
            rows.append(row)
            print(f"  ESS {name:4s}  TTFT p50 {med['ttft_p50_ms']:6.0f} ms  p99 "
                  f"{med['ttft_p99_ms']:6.0f} ms  stream {med['stream_tok_s_p50']:5.1f} tok/s  "
                  f"aggregate {med['tok_s']:6.1f} tok/s  ({med['requests']:.0f} streams, "
                  f"{med['tokens']:.0f} tokens, {med['wall_s']:.1f} s; peak running "
                  f"{med['peak_running']:.0f}, waiting {med['peak_waiting']:.0f})", flush=True)
    path = os.path.join(args.out, "bench_vllm_load.csv")
    with open(path, "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r.values()) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
