"""The FastAPI app behind `lagoon serve`: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/health`, `/metrics` (requests, tokens, time-to-first-token and per-token latency histograms, KV
blocks, and for MoE models the `ExpertLoadMonitor` gauges); optional bearer auth (`server.api_key_env`); OpenAI-style error bodies.

`create_app(engine, server=…, telemetry=…)` builds the app; `serve(...)` runs it under uvicorn;
`start_test_server(engine_or_folder)` runs one on 127.0.0.1 in a background thread for tests and
returns `(base_url, stop)` — the base URL ends in `/v1`, ready for `openai.OpenAI(base_url=...)`.
This module is *not* a multi-node deployment (put vLLM or SGLang behind the same API for that).
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lagoon.config import ServerSection
from lagoon.engine.engine import Engine
from lagoon.engine.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from lagoon.engine.server.serving import OpenAIServing
from lagoon.errors import AuthenticationError, BadRequestError, ContextWindowExceededError, LagoonError
from lagoon.telemetry import Telemetry

__all__ = ["create_app", "serve", "start_test_server"]

_OPEN_PATHS = {"/health", "/metrics"}


def _err(status: int, message: str, type_: Any = "invalid_request_error", **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, type_, **kw), status_code=status)


def create_app(engine: Engine, server: ServerSection | None = None, telemetry: Telemetry | None = None) -> FastAPI:
    server = server or ServerSection()
    telemetry = telemetry or Telemetry()
    token: str | None = None
    if server.api_key_env:
        token = os.environ.get(server.api_key_env)
        if not token:
            raise AuthenticationError(
                f"server.api_key_env names {server.api_key_env}, which is unset or empty; export it or unset the key"
            )
    name = server.served_model_name or engine.name
    serving = OpenAIServing(engine, telemetry, name)
    app = FastAPI(title="Lagoon", docs_url=None, redoc_url=None)
    app.state.engine, app.state.telemetry, app.state.model_name = engine, telemetry, name
    runtime = None
    if engine.args.is_moe:  # expert load (window: moe.balance_window), recalibrations, quarantines on /metrics
        from lagoon.moe.runtime import runtime_of

        runtime = runtime_of(engine.model)
        if runtime is not None:
            runtime.attach_telemetry(telemetry)
    app.state.expert_monitor = runtime.monitor if runtime is not None else None
    if engine.args.is_moe:  # offloaded experts: hit rate, bytes moved, prefetch accuracy on /metrics
        from lagoon.moe.offload import offload_of

        if (off := offload_of(engine.model)) is not None:
            off.attach_telemetry(telemetry, model=name)

    app.add_middleware(_AuthAndCount, token=token, telemetry=telemetry, engine=engine, max_queue=server.max_queue)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _err(400, f"{loc or 'request'}: {first.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(LagoonError)
    async def _lagoon(request: Request, exc: LagoonError) -> JSONResponse:
        if isinstance(exc, ContextWindowExceededError):
            return _err(400, exc.message, code="context_length_exceeded")
        if isinstance(exc, BadRequestError):
            return _err(400, exc.message)
        return _err(500, exc.message, "server_error")

    def _check_model(model: str) -> JSONResponse | None:
        if model not in (name, engine.name):
            return _err(404, f"model {model!r} does not exist; this server serves {name!r}", "not_found_error",
                        param="model", code="model_not_found")
        return None

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        if (bad := _check_model(req.model)) is not None:
            return bad
        if req.stream:
            gen = serving.chat_stream(req)
            first = await anext(gen)  # surface prompt errors as a JSON error, not a broken stream
            return StreamingResponse(_prepend(first, gen), media_type="text/event-stream")
        return await serving.chat(req, request.is_disconnected)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if (bad := _check_model(req.model)) is not None:
            return bad
        if req.stream:
            gen = serving.completion_stream(req)
            first = await anext(gen)  # surface request errors as a JSON error, not a broken stream
            return StreamingResponse(_prepend(first, gen), media_type="text/event-stream")
        return await serving.completion(req, request.is_disconnected)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lagoon", "max_model_len": engine.max_seq_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        # A stopped scheduler answers nothing: a load balancer must see 503, not "ok".
        running = engine.scheduler.running
        return JSONResponse({"status": "ok" if running else "stopped", "model": name,
                             "queued": engine.scheduler.load}, status_code=200 if running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        cache = engine.cache
        telemetry.set("lagoon_engine_active_requests", len(engine.scheduler.active), doc="Requests decoding now")
        if hasattr(cache, "free_blocks"):
            telemetry.set("lagoon_engine_kv_free_blocks", cache.free_blocks, doc="Free KV cache blocks")
            telemetry.set("lagoon_engine_prefix_cache_hit_tokens", cache.hits, doc="Prompt tokens reused from cache")
        if runtime is not None:
            runtime.publish()
        return Response(telemetry.prometheus_text(), media_type="text/plain; version=0.0.4")

    return app


class _AuthAndCount:
    """Bearer auth, the `server.max_queue` gate and the per-status request counter, as plain ASGI.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware sits between uvicorn and a
    `StreamingResponse` and hides the client's disconnect from it, so a dropped stream went on
    decoding to `max_tokens`. Plain ASGI passes `receive` through: the response sees the
    disconnect, cancels the body generator, and its `finally` cancels the engine request."""

    def __init__(self, app: Any, *, token: str | None, telemetry: Telemetry, engine: Engine, max_queue: int) -> None:
        self.app, self.token, self.telemetry, self.engine, self.max_queue = app, token, telemetry, engine, max_queue

    def _count(self, path: str, status: int) -> None:
        self.telemetry.inc("lagoon_server_requests_total", labels={"path": path, "status": str(status)},
                           doc="HTTP requests by path and status")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        refusal: JSONResponse | None = None
        if self.token is not None and path not in _OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, f"Bearer {self.token}".encode()):
                refusal = _err(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               "authentication_error", code="invalid_api_key")
        if refusal is None and path.startswith("/v1/") and scope["method"] == "POST" \
                and self.engine.scheduler.load >= self.max_queue:
            refusal = _err(503, f"server busy: {self.max_queue} requests queued (server.max_queue)",
                           "overloaded_error", code="overloaded")
        if refusal is not None:
            await refusal(scope, receive, send)
            self._count(path, refusal.status_code)
            return
        status = 500  # an exception before the response starts becomes a 500 further out

        async def send_counting(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self._count(path, status)


async def _prepend(first: str, rest: Any) -> Any:
    yield first
    async for x in rest:
        yield x


def serve(engine: Engine, server: ServerSection | None = None, telemetry: Telemetry | None = None,
          host: str | None = None, port: int | None = None) -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn

    server = server or ServerSection()
    app = create_app(engine, server, telemetry)
    uvicorn.run(app, host=host or server.host, port=server.port if port is None else port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_test_server(
    engine_or_folder: Engine | str | Path, port: int = 0, *, server: ServerSection | None = None,
    telemetry: Telemetry | None = None, precision: str = "float32",
) -> tuple[str, Callable[[], None]]:
    """Serve an engine (or a checkpoint folder/.gguf, loaded here) on 127.0.0.1 in a thread.

    Returns `(base_url, stop)`: `base_url` is `http://127.0.0.1:PORT/v1`; `stop()` shuts the server
    down (and closes the engine if this function loaded it)."""
    import uvicorn

    from lagoon.engine.engine import load_model

    owned = not isinstance(engine_or_folder, Engine)
    engine = load_model(engine_or_folder, precision=precision) if owned else engine_or_folder
    port = port or _free_port()
    app = create_app(engine, server, telemetry)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, name=f"lagoon-test-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.02)

    def stop() -> None:
        uv.should_exit = True
        thread.join(timeout=10)
        if owned:
            engine.close()

    return f"http://127.0.0.1:{port}/v1", stop
