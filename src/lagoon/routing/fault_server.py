"""`FaultServer`: a loopback HTTP server that speaks both OpenAI chat completions and Anthropic
Messages, and fails on purpose. Tests and `benchmarks/bench_routing.py` point real backends (the
official SDKs) at it.

Routes: `POST /v1/chat/completions` (OpenAI shape), `POST /v1/messages` (Anthropic shape),
`GET /v1/models` (reports `max_model_len` when `window` is set). Each request takes the next entry
of the `faults` queue; when the queue is empty it draws from `fault_rates` (seeded) or answers `ok`.

Faults: `ok`; `500`, `503`, `529` (server errors); `429` (with `Retry-After: retry_after`);
`401`; `400_context` (a context-length refusal); `timeout` (answers only after `hang_s`);
`malformed` (200 with a body that is not JSON); `empty` (valid JSON without choices/content);
`cut` (headers promise the full body, half is sent, the connection closes).

Every request is kept in `requests` (path, lower-cased headers, parsed body) so tests can check what reached
the wire. This is a test double, *not* a model server: replies are canned text or one tool call.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FaultServer", "FAULTS"]

FAULTS = ("ok", "500", "503", "529", "429", "401", "400_context", "timeout", "malformed", "empty", "cut")


class FaultServer:
    def __init__(
        self,
        faults: Iterable[str] = (),
        *,
        fault_rates: Mapping[str, float] | None = None,
        seed: int = 0,
        reply: str = "pong",
        tool_call: tuple[str, dict[str, Any]] | None = None,
        retry_after: float = 0.01,
        hang_s: float = 1.0,
        window: int | None = None,
    ) -> None:
        bad = [f for f in [*faults, *(fault_rates or {})] if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; valid: {', '.join(FAULTS)}")
        self.faults: deque[str] = deque(faults)
        self.fault_rates = dict(fault_rates or {})
        self.reply = reply
        self.tool_call = tool_call
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.window = window
        self.requests: list[dict[str, Any]] = []
        self.served: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FaultServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def next_fault(self) -> str:
        with self._lock:
            if self.faults:
                fault = self.faults.popleft()
            else:
                fault = "ok"
                x = self._rng.random()
                for name, rate in self.fault_rates.items():
                    if x < rate:
                        fault = name
                        break
                    x -= rate
            self.served[fault] = self.served.get(fault, 0) + 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    owner: FaultServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None, *, cut: bool = False) -> None:
        try:
            self._write(status, body, headers, cut=cut)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (a timeout fault)
            self.close_connection = True

    def _write(self, status: int, body: bytes, headers: Mapping[str, str] | None, *, cut: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        model: dict[str, Any] = {"id": "fault-model", "object": "model", "created": 0, "owned_by": "lagoon"}
        if self.owner.window is not None:
            model["max_model_len"] = self.owner.window
        self._send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {}
        anthropic = self.path.rstrip("/").endswith("/messages")
        owner = self.owner
        with owner._lock:
            owner.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        fault = owner.next_fault()
        if fault == "timeout":
            time.sleep(owner.hang_s)
            fault = "ok"
        if fault in ("500", "503", "529"):
            self._send(int(fault), _error(anthropic, "overloaded_error" if fault == "529" else "api_error", "server error"))
        elif fault == "429":
            self._send(429, _error(anthropic, "rate_limit_error", "slow down"), {"Retry-After": str(owner.retry_after)})
        elif fault == "401":
            self._send(401, _error(anthropic, "authentication_error", "invalid x-api-key"))
        elif fault == "400_context":
            msg = "prompt is too long: 300000 tokens > 200000 maximum" if anthropic else (
                "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens."
            )
            self._send(400, _error(anthropic, "invalid_request_error", msg))
        elif fault == "malformed":
            self._send(200, b'{"id": "x", "choices": [ {"message": tru')
        elif fault == "empty":
            self._send(200, b'{"id": "x", "object": "chat.completion"}' if not anthropic else b'{"id": "x", "type": "message"}')
        else:
            payload = _anthropic_reply(owner, body) if anthropic else _openai_reply(owner, body)
            self._send(200, json.dumps(payload).encode(), cut=fault == "cut")


def _error(anthropic: bool, kind: str, message: str) -> bytes:
    if anthropic:
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()


def _words(body: Mapping[str, Any]) -> int:
    return len(json.dumps(body.get("messages", [])).split())


def _openai_reply(owner: FaultServer, body: Mapping[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": owner.reply}
    finish = "stop"
    if owner.tool_call and body.get("tools"):
        name, args = owner.tool_call
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}],
        }
        finish = "tool_calls"
    prompt = _words(body)
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fault-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3},
    }


def _anthropic_reply(owner: FaultServer, body: Mapping[str, Any]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": owner.reply}]
    stop = "end_turn"
    if owner.tool_call and body.get("tools"):
        name, args = owner.tool_call
        content = [{"type": "text", "text": "Calling a tool."}, {"type": "tool_use", "id": "toolu_1", "name": name, "input": args}]
        stop = "tool_use"
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fault-model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": _words(body), "output_tokens": 3},
    }
