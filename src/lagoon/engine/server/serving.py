"""OpenAI semantics on top of an `Engine`: turn a chat or completion request into a prompt, sampling
parameters and an output constraint, run it, and shape the reply (plain JSON or SSE chunks), with
usage, tool calls and metrics.

Constraints (`lagoon.engine.grammar`): `response_format` json_object / json_schema and the
`structured_outputs` / `guided_*` extension become a grammar the output cannot leave. Tool calls:
`tools` go through the model's chat template (`ChatFormat`), in the family's own call syntax;
`tool_choice` `none` drops the tools, `auto` lets the model choose, `required` or a named function
constrain the reply to exactly one call of one of the (or the named) tools whose arguments match
its JSON schema. The reply is parsed into `tool_calls`; a stream sends content as it comes and each
call as OpenAI deltas (id and name first, then argument fragments) while the model writes it
(`ToolCallStream`). Fields Lagoon does not implement are refused with a 400 naming them.

The blocking engine queue is read from a worker thread; a client that disconnects mid-stream
cancels its request (the generator's `finally`), and one that gives up on a plain reply (a client
timeout) cancels it too (`disconnected`, polled while the reply is generated). This module is *not*
the HTTP app (`app.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from lagoon.engine.engine import Engine
from lagoon.engine.generate import Request, TextStream
from lagoon.engine.grammar import Constraint
from lagoon.engine.sampling import SamplingParams
from lagoon.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    new_id,
    now,
    usage_dict,
)
from lagoon.errors import BadRequestError
from lagoon.telemetry import Telemetry
from lagoon.tool_calls import (
    ReasoningStream,
    ToolCallDelta,
    ToolCallStream,
    parse_tool_calls,
    split_reasoning,
)

__all__ = ["OpenAIServing"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_END = object()


Disconnected = Callable[[], Awaitable[bool]]
_DISCONNECT_POLL_S = 0.05  # how often a plain (non-stream) request checks that its client is still there


class OpenAIServing:
    def __init__(self, engine: Engine, telemetry: Telemetry, model_name: str) -> None:
        self.engine, self.telemetry, self.model_name = engine, telemetry, model_name

    # ------------------------------------------------------------------ helpers
    def _params(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> SamplingParams:
        if bad := req.unsupported_fields():
            raise BadRequestError(
                f"unsupported request field(s): {', '.join(bad)}; Lagoon does not implement them, remove them"
            )
        try:
            logprobs = req.logprob_count
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        if logprobs is not None and req.stream:
            raise BadRequestError("logprobs are returned on non-streamed replies only; drop stream or logprobs")
        room = self.engine.max_seq_len - prompt_len
        limit = req.limit or max(1, room)
        return SamplingParams(
            max_new_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed if req.seed is not None else self.engine.config.seed, stop=req.stops,
            ignore_eos=req.ignore_eos, logprobs=logprobs,
        )

    def _token(self, tok: int) -> str:
        return self.engine.decode([tok])

    def _chat_logprobs(self, stream: TextStream) -> dict[str, Any] | None:
        """OpenAI's chat `logprobs.content`: per generated token, its text, logprob, bytes and top."""
        if stream.req.params.logprobs is None:
            return None

        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self._token(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [
            {**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
            for x in stream.req.logprobs[: len(stream.output_ids)]
        ]}

    def _completion_logprobs(self, stream: TextStream, offset: int) -> dict[str, Any] | None:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        if stream.req.params.logprobs is None:
            return None
        items = stream.req.logprobs[: len(stream.output_ids)]
        tokens = [self._token(x.token) for x in items]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens, "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [{self._token(t): lp for t, lp in x.top} for x in items] if stream.req.params.logprobs
            else None,
            "text_offset": offsets,
        }

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
    def _tools(self, req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        return req.tools if req.tools and req.tool_choice != "none" else None

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[int], Constraint | None]:
        """Prompt ids, their token types (by source message: `Engine.chat_prompt_typed`) and the
        output constraint (None when the output is free)."""
        tools = self._tools(req)
        forced = None
        if req.tool_choice in ("required",) or isinstance(req.tool_choice, dict):
            if not tools:
                raise BadRequestError("tool_choice asks for a tool call but the request has no tools")
            if _output_constraint(req) is not None:
                raise BadRequestError("give either a forced tool_choice or an output format, not both")
            forced = tools
            if isinstance(req.tool_choice, dict):
                name = req.tool_choice["function"]["name"]
                forced = [t for t in tools if (t.get("function") or t).get("name") == name]
                if not forced:
                    raise BadRequestError(f"tool_choice names {name!r}, which is not in tools")
        ids, types = self._render(req, tools)
        if forced is None:
            return ids, types, _output_constraint(req)
        # a template that opened <think> gets the reasoning closed before the forced call
        think = self._opens_reasoning(ids)
        return ids, types, Constraint.tool_call(forced, self.engine.chat_format.tool_syntax, think=think)

    def _render(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> tuple[list[int], list[int]]:
        """The request through the model's chat template. A template that cannot render it (a field
        it reads is missing, e.g. gpt-oss's needs every tool's `description`, or its own
        `raise_exception`) is the request's fault: a 400 that names the template's complaint."""
        import jinja2

        try:
            if req.chat_template_kwargs:  # e.g. enable_thinking: the template's own switches
                from lagoon.quant.policy import types_for_roles

                ids, roles = self.engine.chat_format.encode_with_roles(req.messages, tools,
                                                                       template_kwargs=req.chat_template_kwargs)
                return ids, types_for_roles(roles)
            return self.engine.chat_prompt_typed(req.messages, tools)
        except jinja2.TemplateError as exc:
            raise BadRequestError(
                f"the model's chat template cannot render this request ({type(exc).__name__}: {exc}); "
                "give the messages and tools the fields the template reads (e.g. a description on every tool)"
            ) from exc

    def _opens_reasoning(self, ids: list[int]) -> bool:
        """The prompt ends with `<think>`: the template opened the reasoning the reply starts in."""
        return self.engine.decode(ids[-8:]).rstrip().endswith("<think>")

    def _message(self, text: str, tools: list[dict[str, Any]] | None, opened: bool = False) -> tuple[dict[str, Any], str | None]:
        if opened and "</think>" not in text:  # the template opened <think> and the reply never closed it
            reasoning, text = text.strip() or None, ""
        else:
            reasoning, text = split_reasoning(text)  # <think>…</think> / harmony analysis: not the answer
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if tools:
            content, calls = parse_tool_calls(text, tools)  # the tools' schemas type XML / GLM values
            if calls:
                msg["content"] = content or None
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                    for c in calls
                ]
                return msg, "tool_calls"
        return msg, None

    @staticmethod
    async def _collect(r: Request, stream: TextStream, disconnected: Disconnected | None) -> str:
        """The whole reply. A client gone meanwhile cancels `r` (the scheduler retires it within a
        decode step, so the stream ends): a cancelled wait alone would not, it waits for the thread."""
        work = asyncio.ensure_future(run_in_threadpool(list, stream))
        while disconnected is not None and not work.done():
            await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if not work.done() and await disconnected():
                r.cancel()
                break
        return "".join(await work)

    async def chat(self, req: ChatCompletionRequest, disconnected: Disconnected | None = None) -> dict[str, Any]:
        ids, types, constraint = self._chat_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), types, constraint)
        try:
            text = await self._collect(r, stream, disconnected)
        finally:
            r.cancel()
        self._observe("chat", stream, len(ids))
        msg, finish = self._message(text, self._tools(req), self._opens_reasoning(ids))
        return {
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish or stream.finish_reason,
                         "logprobs": self._chat_logprobs(stream)}],
            "usage": usage_dict(len(ids), len(r.output_ids), r.cached_tokens),
        }

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        ids, types, constraint = self._chat_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), types, constraint)
        rid, created, model = new_id("chatcmpl"), now(), self.model_name
        calls = ToolCallStream(tools=self._tools(req)) if self._tools(req) is not None else None

        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def deltas(items: Any) -> Any:
            for item in items:
                if isinstance(item, ToolCallDelta):
                    yield sse(chunk(rid, model, created, {"tool_calls": [item.to_openai()]}))
                elif item:
                    yield sse(chunk(rid, model, created, {"content": item}))

        # a reply opening with <think>, or whose template opened it, streams that as reasoning_content
        thinking = ReasoningStream(opened=self._opens_reasoning(ids))

        def split(piece: str, final: bool = False) -> Any:
            for kind, text in thinking.feed(piece, final):
                if kind == "reasoning":
                    yield sse(chunk(rid, model, created, {"reasoning_content": text}))
                else:
                    yield from deltas([text] if calls is None else calls.feed(text))

        try:
            yield sse(chunk(rid, model, created, {"role": "assistant", "content": ""}))
            async for piece in self._pieces(stream):
                for out in split(piece):
                    yield out
            for out in split("", final=True):
                yield out
            if calls is not None:
                for out in deltas(calls.feed("", final=True)):
                    yield out
            finish = "tool_calls" if calls is not None and calls.called else stream.finish_reason
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

    async def completion(self, req: CompletionRequest, disconnected: Disconnected | None = None) -> dict[str, Any]:
        ids = self._completion_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), None, _output_constraint(req))
        try:
            text = await self._collect(r, stream, disconnected)
        finally:
            r.cancel()
        self._observe("completions", stream, len(ids))
        prefix = self.engine.decode(ids) if req.echo else ""
        return {
            "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "text": prefix + text, "finish_reason": stream.finish_reason,
                         "logprobs": self._completion_logprobs(stream, len(prefix))}],
            "usage": usage_dict(len(ids), len(r.output_ids), r.cached_tokens),
        }

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        ids = self._completion_prompt(req)
        r, stream = self.engine.submit(ids, self._params(req, len(ids)), None, _output_constraint(req))
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


def _output_constraint(req: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
    """The constraint `response_format`, `structured_outputs` or `guided_*` asks for (at most one)."""
    found: list[tuple[str, Constraint]] = []
    fmt = req.response_format or {}
    if fmt.get("type") == "json_object":
        found.append(("response_format", Constraint.json_schema(None)))
    elif fmt.get("type") == "json_schema":
        found.append(("response_format", Constraint.json_schema(fmt["json_schema"].get("schema"))))
    so = req.structured_outputs
    if so is not None:
        given = so.given()
        if len(given) > 1:
            raise BadRequestError(f"structured_outputs takes one of json, regex, choice, grammar (got {', '.join(given)})")
        if so.json_ is not None and so.json_ is not False:
            found.append(("structured_outputs.json", Constraint.json_schema(None if so.json_ is True else so.json_)))
        elif so.json_object:
            found.append(("structured_outputs.json_object", Constraint.json_schema(None)))
        elif so.regex is not None:
            found.append(("structured_outputs.regex", Constraint.regex(so.regex)))
        elif so.choice is not None:
            found.append(("structured_outputs.choice", Constraint.choice(so.choice)))
        elif so.grammar is not None:
            found.append(("structured_outputs.grammar", Constraint.lark(so.grammar)))
    if req.guided_json is not None:
        try:
            schema = json.loads(req.guided_json) if isinstance(req.guided_json, str) else req.guided_json
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"guided_json is not valid JSON ({exc})") from exc
        found.append(("guided_json", Constraint.json_schema(schema)))
    if req.guided_regex is not None:
        found.append(("guided_regex", Constraint.regex(req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", Constraint.choice(req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", Constraint.lark(req.guided_grammar)))
    if len(found) > 1:
        raise BadRequestError(f"give one output constraint, not several: {', '.join(n for n, _ in found)}")
    return found[0][1] if found else None
