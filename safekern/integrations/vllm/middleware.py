"""An ASGI middleware for vLLM's OpenAI server: malformed ESS options are a 400 before anything
streams.

vLLM validates a request's ``vllm_xargs`` (``SamplingParams.extra_args``) with the logits
processors' ``validate_params`` when the request enters the engine. For a streaming request
that happens after the HTTP response has started, so a bad ``{"safekern": ...}`` comes back as
``200 OK`` with an error event inside the stream, which an OpenAI client reports as a generic
``APIError``. This middleware reads the JSON body of every POST first and runs the same check
(``request_options``) on ``vllm_xargs`` (and ``sampling_params.extra_args`` of vLLM's own
generate endpoint): a bad value is answered ``400`` in vLLM's error format
(``{"error": {"message", "type": "BadRequestError", "param": "vllm_xargs", "code": 400}}``),
streaming or not; anything else goes on unchanged, with later ``receive`` events (a client
disconnect) passed through so vLLM still aborts a request whose client hung up.

``safekern serve`` installs it; with vLLM's own command add
``--middleware safekern.integrations.vllm.middleware.EssArgsMiddleware``.
"""
from __future__ import annotations

import json
from typing import Optional

MAX_BODY = 64 << 20      # larger bodies are not inspected (vLLM's own limits apply to them)


def check_body(body: bytes) -> Optional[str]:
    """The error message for a JSON request body whose safekern options are invalid, else
    None (not JSON, no options, or valid ones: vLLM judges the rest)."""
    from . import request_options

    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    found = [data.get("vllm_xargs")]
    sp = data.get("sampling_params")
    if isinstance(sp, dict):
        found.append(sp.get("extra_args"))
    for xargs in found:
        if isinstance(xargs, dict):
            try:
                request_options(xargs, None)
            except ValueError as e:
                return str(e)
    return None


class EssArgsMiddleware:
    """Pure ASGI middleware (``app.add_middleware(EssArgsMiddleware)``); see the module doc."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":      # the client left before sending it all
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY and more:
                pending = [{"type": "http.request", "body": b"".join(chunks),
                            "more_body": True}]
                return await self.app(scope, _replay(pending, receive), send)
        body = b"".join(chunks)
        error = check_body(body)
        if error is not None:
            payload = json.dumps({"error": {"message": error, "type": "BadRequestError",
                                            "param": "vllm_xargs", "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body,
                                        "more_body": False}], receive), send)


def _replay(first, receive):
    """A ``receive`` that returns ``first`` (the messages already read), then the real one's."""
    pending = list(first)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


__all__ = ["EssArgsMiddleware", "check_body"]
