"""OpenAI semantics on top of an `Engine`: turn a chat or completion request into a prompt and
sampling parameters, run it, and shape the reply (plain JSON or SSE chunks), with usage, tool calls
and metrics.

Tool calls: `tools` go through the model's chat template (`ChatFormat`); the reply is parsed for
`<tool_call>{…}</tool_call>` blocks. `tool_choice` `none` drops the tools; `required` or a named
function starts the assistant turn with the call's opening (`<tool_call>\\n{"name": "…`) so any
model answers with a call. With tools, a stream holds text back until the reply is complete (a call
cannot be told from prose earlier), then sends it as content or as tool-call deltas.

The blocking engine queue is read from a worker thread; a client that disconnects mid-stream
cancels its request (the generator's `finally`). This module is *not* the HTTP app (`app.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from lagoon.engine.engine import Engine
from lagoon.engine.generate import TextStream
from lagoon.engine.sampling import SamplingParams
from lagoon.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    new_id,
    now,
    usage_dict,
)
from lagoon.engine.tokenizer import parse_tool_calls
from lagoon.errors import BadRequestError
from lagoon.telemetry import Telemetry

__all__ = ["OpenAIServing"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_END = object()
_TOOL_CLOSE = "</tool_call>"


class OpenAIServing:
    def __init__(self, engine: Engine, telemetry: Telemetry, model_name: str) -> None:
        self.engine, self.telemetry, self.model_name = engine, telemetry, model_name

    # ------------------------------------------------------------------ helpers
    def _params(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> SamplingParams:
        room = self.engine.max_seq_len - prompt_len
        limit = req.limit or max(1, room)
        return SamplingParams(
            max_new_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed if req.seed is not None else self.engine.config.seed, stop=req.stops,
            ignore_eos=req.ignore_eos,
        )

    def _observe(self, endpoint: str, stream: TextStream, prompt_tokens: int) -> None:
        r = stream.req
        n = len(r.output_ids)
        t = self.telemetry
        t.inc("lagoon_server_prompt_tokens_total", prompt_tokens, doc="Prompt tokens processed")
        t.inc("lagoon_server_completion_tokens_total", n, doc="Tokens generated")
        t.inc("lagoon_server_cached_prompt_tokens_total", r.cached_tokens, doc="Prompt tokens served from the prefix cache")
        if r.first_token_at is not None:
            ttft = r.first_token_at - r.submitted
            t.observe("lagoon_server_time_to_first_token_seconds", ttft, doc="Time to first token", buckets=_TTFT_BUCKETS)
            if n > 1:
                per = (time.perf_counter() - r.first_token_at) / (n - 1)
                t.observe("lagoon_server_time_per_output_token_seconds", per, doc="Mean inter-token latency",
                          buckets=_TPOT_BUCKETS)

    @staticmethod
    async def _pieces(stream: TextStream) -> AsyncIterator[str]:
        it = iter(stream)
        while True:
            piece = await run_in_threadpool(next, it, _END)
            if piece is _END:
                return
            yield piece

    # ------------------------------------------------------------------ chat
    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[int], str]:
        """Prompt ids, their token types (by source message: `Engine.chat_prompt_typed`) and the
        forced opening of a tool call ('' when none)."""
        tools = req.tools if req.tools and req.tool_choice != "none" else None
        forced = ""
        if tools and req.tool_choice == "required":
            forced = '<tool_call>\n{"name": "'
        elif tools and isinstance(req.tool_choice, dict):
            name = req.tool_choice["function"]["name"]
            if name not in {(t.get("function") or t).get("name") for t in tools}:
                raise BadRequestError(f"tool_choice names {name!r}, which is not in tools")
            forced = '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '
        ids, types = self.engine.chat_prompt_typed(req.messages, tools, suffix=forced)
        return ids, types, forced

    def _message(self, text: str, tools: bool) -> tuple[dict[str, Any], str | None]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if tools:
            content, calls = parse_tool_calls(text)
            if calls:
                msg["content"] = content or None
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                    for c in calls
                ]
                return msg, "tool_calls"
        return msg, None

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        ids, types, forced = self._chat_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), types)
        try:
            text = "".join(await run_in_threadpool(list, stream))
        finally:
            r.cancel()
        self._observe("chat", stream, len(ids))
        msg, finish = self._message(_close_forced(forced, text), bool(req.tools))
        return {
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish or stream.finish_reason, "logprobs": None}],
            "usage": usage_dict(len(ids), len(r.output_ids), r.cached_tokens),
        }

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        ids, types, forced = self._chat_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), types)
        rid, created, model = new_id("chatcmpl"), now(), self.model_name

        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            yield sse(chunk(rid, model, created, {"role": "assistant", "content": ""}))
            held: list[str] = []
            async for piece in self._pieces(stream):
                if req.tools:
                    held.append(piece)
                else:
                    yield sse(chunk(rid, model, created, {"content": piece}))
            finish = stream.finish_reason
            if req.tools:
                msg, tool_finish = self._message(_close_forced(forced, "".join(held)), True)
                if tool_finish:
                    finish = tool_finish
                    deltas = [{"index": i, "id": c["id"], "type": "function", "function": c["function"]}
                              for i, c in enumerate(msg["tool_calls"])]
                    if msg["content"]:
                        yield sse(chunk(rid, model, created, {"content": msg["content"]}))
                    yield sse(chunk(rid, model, created, {"tool_calls": deltas}))
                elif msg["content"]:
                    yield sse(chunk(rid, model, created, {"content": msg["content"]}))
            yield sse(chunk(rid, model, created, {}, finish))
            if req.include_usage:
                yield sse(chunk(rid, model, created, None, usage=usage_dict(len(ids), len(r.output_ids), r.cached_tokens)))
            yield "data: [DONE]\n\n"
            self._observe("chat", stream, len(ids))
        finally:
            r.cancel()  # a no-op when finished; frees the cache when the client went away

    # ------------------------------------------------------------------ completions
    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return list(p)
        if isinstance(p, list):
            if len(p) != 1:
                raise BadRequestError("only one prompt per request is supported (got a list of several)")
            p = p[0]
        return self.engine.encode(p)

    async def completion(self, req: CompletionRequest) -> dict[str, Any]:
        ids = self._completion_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)))
        try:
            text = "".join(await run_in_threadpool(list, stream))
        finally:
            r.cancel()
        self._observe("completions", stream, len(ids))
        if req.echo:
            text = self.engine.decode(ids) + text
        return {
            "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "text": text, "finish_reason": stream.finish_reason, "logprobs": None}],
            "usage": usage_dict(len(ids), len(r.output_ids), r.cached_tokens),
        }

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        ids = self._completion_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)))
        rid, created = new_id("cmpl"), now()

        def sse(text: str, finish: str | None) -> str:
            return "data: " + json.dumps({
                "id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }) + "\n\n"

        try:
            async for piece in self._pieces(stream):
                yield sse(piece, None)
            yield sse("", stream.finish_reason)
            yield "data: [DONE]\n\n"
            self._observe("completions", stream, len(ids))
        finally:
            r.cancel()


def _close_forced(forced: str, text: str) -> str:
    """A forced call's continuation often stops after its JSON (or runs on): keep the first JSON
    value and close the block. Unparseable output is returned as it is (no call is invented)."""
    if not forced:
        return text
    whole = forced + text
    if _TOOL_CLOSE in text:
        return whole
    start = forced.rfind("{")
    try:
        obj, end = json.JSONDecoder().raw_decode(whole[start:].replace("\n", " "))
    except json.JSONDecodeError:
        return text
    return "<tool_call>\n" + json.dumps(obj) + "\n</tool_call>" if isinstance(obj, dict) else text
