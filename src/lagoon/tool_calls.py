"""Tool calls found in a reply: `parse_tool_calls` (a finished reply → content + calls, whatever family
syntax the model wrote: see `lagoon.tool_syntax`) and `ToolCallStream` (a reply arriving in pieces →
OpenAI stream deltas: content, then per call its name first and its arguments in fragments).
`split_reasoning` takes a reply's reasoning out (`<think>…</think>`, harmony's analysis channel) for
`reasoning_content`; `ReasoningStream` does it for a streamed reply. The parser reads every form, so
a model that drifts to another family's is still understood. This module is *not* the chat template
(`lagoon.engine.tokenizer`) nor the grammar that forces a call (`lagoon.engine.grammar`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from lagoon.protocols import ToolCall
from lagoon.tool_syntax import (
    DS_CALL_BEGIN,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    HARMONY,
    HARMONY_CALL,
    HARMONY_MESSAGE,
    HARMONY_MESSAGE_ENDS,
    HERMES,
    QWEN3_CODER,
    SMOLLM2,
    GrowingMatches,
    Span,
    ToolSyntax,
    calls_in,
    new_call_id,
    param_schemas,
    scan_deepseek,
    scan_harmony,
    typed_value,
)

__all__ = ["ToolSyntax", "HERMES", "SMOLLM2", "QWEN3_CODER", "HARMONY", "parse_tool_calls", "split_blocks",
           "split_reasoning", "ReasoningStream", "ToolCallStream", "ToolCallDelta"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HARMONY_TO = " to=functions."
_HEAD_RE = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_HARMONY_HEAD = re.compile(r"(?:<\|start\|>assistant)?(?:<\|channel\|>\w+)?\s*$")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, the rest). `<think>R</think>` (or a reply that starts inside thinking, its
    template having opened the tag, and closes it) → R; harmony: the analysis channel is the
    reasoning, the final channel the content, commentary (tool calls) stays in the rest."""
    if "<|channel|>" in text:
        reasoning, rest, found = _harmony_split(text)
        return reasoning.strip() or None, rest if found else text
    end = text.find("</think>")
    if end < 0:
        return None, text
    start = text.find("<think>")
    head = text[start + len("<think>") : end] if 0 <= start < end else text[:end]
    if start > 0 and text[:start].strip():
        return None, text  # a think tag in the middle of an answer is quoted text, not reasoning
    return head.strip() or None, text[end + len("</think>") :].lstrip()


def _harmony_split(text: str, messages: list[Span] | None = None, calls: list[Span] | None = None) -> tuple[str, str, bool]:
    """A harmony reply → (its analysis channel's text, its final channel's text, its preambles and its
    calls as written, in the order written; whether any of those was found). A preamble is commentary
    without a recipient, which the harmony spec means for the user (vLLM shows it too). `messages` /
    `calls`: the spans of `HARMONY_MESSAGE` / `HARMONY_CALL` in `text` when already known
    (`ReasoningStream` keeps them as the text grows)."""
    messages = GrowingMatches.spans(HARMONY_MESSAGE, text) if messages is None else messages
    calls = GrowingMatches.spans(HARMONY_CALL, text) if calls is None else calls
    found = [(start, channel == "analysis", text[body:end]) for start, end, channel, body in messages
             if channel in ("analysis", "final") or (channel == "commentary" and not _addressed(text, start, body))]
    found += [(start, False, text[start:end]) for start, end, _, _ in calls]
    found.sort(key=lambda f: f[0])
    return "".join(t for _, r, t in found if r), "".join(t for _, r, t in found if not r), bool(found)


def _addressed(text: str, start: int, body: int) -> bool:
    """Whether the message whose channel starts at `start` has a recipient (`to=…`), after its
    channel or before it (`<|start|>assistant to=functions.f<|channel|>…`)."""
    lo = max(0, start - 256)  # the header since the last message ended (or the reply began)
    head = max([lo, *(text.rfind(t, lo, start) for t in ("<|start|>", "<|end|>", "<|call|>", "<|return|>", "<|message|>"))])
    return "to=" in text[head:body]


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, list[ToolCall]]:
    """Split a reply into (content without the calls, parsed calls), in any family's syntax. A JSON
    block may hold one call object or a list of them; a reply that is only a bare
    `{"name":…, "arguments":…}` is a call too. `tools` (OpenAI tool dicts) type the values that
    XML / GLM calls write as text (a `string` parameter keeps its exact text)."""
    props = param_schemas(tools)
    if HARMONY_TO.strip() in text:  # harmony (gpt-oss)
        calls = [c for m in HARMONY_CALL.finditer(text) for c in _calls_from_json(
            json.dumps({"name": m.group(1), "arguments": _json_or_none(m.group(2))}))]
        if calls:
            return HARMONY_CALL.sub("", text).strip(), calls
    if DS_CALL_BEGIN in text:  # DeepSeek-V3 / V3.1
        at = text.find(DS_CALLS_BEGIN)
        at = text.find(DS_CALL_BEGIN) if at < 0 else at
        end = text.find(DS_CALLS_END, at)
        calls = calls_in(text[at : len(text) if end < 0 else end], "deepseek", props)
        if calls:
            rest = text[:at] + ("" if end < 0 else text[end + len(DS_CALLS_END) :])
            return rest.strip(), calls
    outside, blocks = split_blocks(text)
    calls = [c for b in blocks for c in _calls_in_block(b, props)]
    if calls:
        return outside.strip(), calls
    stripped = text.strip()
    if stripped.startswith(("{", "[")) and stripped.endswith(("}", "]")):
        calls = _calls_from_json(stripped)
        if calls:
            return "", calls
    return text, []


def _calls_in_block(block: str, props: Mapping[str, Mapping[str, Any]]) -> list[ToolCall]:
    """A `<tool_call>` block: JSON (Hermes, SmolLM2), else Qwen3-Coder's XML, else GLM / Laguna's
    `NAME<arg_key>…`."""
    if "<function=" in block:
        return calls_in(block, "xml", props)
    return _calls_from_json(block) or calls_in(block, "glm", props)


def split_blocks(text: str, final: bool = True) -> tuple[str, list[str]]:
    """Text outside `<tool_call>` blocks, and each block's inside (the last may be unfinished). A
    block ends at the `</tool_call>` after its JSON value, so the tag inside a JSON string (a
    command that greps for it) does not cut the call short. While a reply is still growing
    (`final=False`), a block whose JSON is not complete yet runs to the end of the text."""
    outside, blocks, pos = [], [], 0
    dec = json.JSONDecoder()
    while (at := text.find(OPEN, pos)) >= 0:
        outside.append(text[pos:at])
        j = at + len(OPEN)
        start = len(text) - len(text[j:].lstrip())
        try:
            end = dec.raw_decode(text, start)[1]
        except json.JSONDecodeError:
            end = None
        if end is not None:
            rest = text[end:].lstrip()
            if rest.startswith(CLOSE) or CLOSE.startswith(rest):  # closed, or still on its way to close
                blocks.append(text[j:end])
                pos = len(text) - len(rest) + len(CLOSE) if rest.startswith(CLOSE) else len(text)
                continue
        close = text.find(CLOSE, j if end is None else end)  # malformed, or junk after the JSON
        if close < 0 or (end is None and not final):
            blocks.append(text[j:])
            pos = len(text)
            break
        blocks.append(text[j:close])
        pos = close + len(CLOSE)
    outside.append(text[pos:])
    return "".join(outside), blocks


def _json_or_none(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _calls_from_json(raw: str) -> list[ToolCall]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call(o) for o in objs]
    return [c for c in calls if c is not None]


def _call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=args)


@dataclass
class ToolCallDelta:
    """One OpenAI `delta.tool_calls[]` entry: the first for a call carries `id` and `name`, later
    ones carry `arguments` fragments that concatenate to the call's arguments JSON."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out.update(id=self.id, type="function")
            fn["name"] = self.name
        out["function"] = fn
        return out


@dataclass
class _Sent:
    id: str
    args: int = 0  # characters of the arguments text already sent
    text: str | None = None  # XML / GLM: the arguments JSON sent so far (completed when the reply ends)


@dataclass
class ToolCallStream:
    """Feed the reply's text as it grows (`feed(piece)`); each call yields what became certain:
    content text (`str`) and `ToolCallDelta`s. Content never includes text that could still turn
    out to open a call; a call's arguments are sent as written, so the fragments of one call join to
    valid JSON once the call is complete."""

    tools: Sequence[Mapping[str, Any]] | None = None  # types XML / GLM values (see `parse_tool_calls`)
    text: str = ""
    _content: int = 0  # characters of content already sent (in `_outside()` coordinates)
    _calls: list[_Sent] = field(default_factory=list)

    @property
    def called(self) -> bool:
        return bool(self._calls)

    def feed(self, piece: str, final: bool = False) -> Iterator[str | ToolCallDelta]:
        self.text += piece
        at = _calls_start(self.text)
        outside, blocks = split_blocks(self.text[:at], final)
        safe = len(outside) if final else _safe_len(outside)
        if safe > self._content:
            yield outside[self._content : safe]
            self._content = safe
        props = param_schemas(self.tools)
        scans = chain((c for b in blocks for c in _scan_block(b, props)), scan_deepseek(self.text[at:]),
                      scan_harmony(self.text[at:]))
        for i, (name, args, written) in enumerate(scans):
            if i == len(self._calls):
                self._calls.append(_Sent(new_call_id(), text=None if written else ""))
                yield ToolCallDelta(i, self._calls[i].id, name)
            sent = self._calls[i]
            if len(args) > sent.args:
                yield ToolCallDelta(i, arguments=args[sent.args :])
                sent.args = len(args)
                sent.text = None if sent.text is None else args
        if final:  # complete XML / GLM arguments; a call no scanner saw (a bare JSON reply) is sent whole now
            for i, c in enumerate(parse_tool_calls(self.text, self.tools)[1]):
                full = json.dumps(dict(c.arguments))
                if i == len(self._calls):
                    self._calls.append(_Sent(c.id))
                    yield ToolCallDelta(i, c.id, c.name)
                    yield ToolCallDelta(i, arguments=full)
                elif self._calls[i].text is not None and full.startswith(self._calls[i].text) and full != self._calls[i].text:
                    yield ToolCallDelta(i, arguments=full[len(self._calls[i].text) :])


def _calls_start(text: str) -> int:
    """Where DeepSeek's or harmony's calls begin (everything after is calls); the length when none."""
    found = [i for i in (text.find(DS_CALLS_BEGIN), text.find(DS_CALL_BEGIN)) if i >= 0]  # a call without the list tag too
    at = min(found) if found else -1
    to = text.find(HARMONY_TO.strip())
    if to >= 0:  # and the header before the recipient: "<|start|>assistant", "<|channel|>commentary "
        to = _HARMONY_HEAD.search(text, 0, to).start()
        at = to if at < 0 else min(at, to)
    return len(text) if at < 0 else at


def _safe_len(outside: str) -> int:
    """How much of `outside` can be sent: all but a tail that may be the start of a call's opener."""
    return min(_safe_tail(outside, OPEN), _safe_tail(outside, DS_CALLS_BEGIN), _safe_tail(outside, DS_CALL_BEGIN),
               _safe_tail(outside, HARMONY_TO))


def _scan_block(block: str, props: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str, bool]]:
    """The calls in a (possibly unfinished) block: (name, arguments text so far, whether that text is
    the model's own JSON). A call appears once its name is complete. JSON: its arguments text is
    exact once the value is complete, else all that was written after `"arguments": `. XML / GLM
    (`_scan_text`): the arguments JSON built from the parameters so far, without its closing brace."""
    if block.lstrip()[:1] not in ("{", "["):
        for inside in block.split(OPEN):  # while streaming, a text block runs on over the next ones
            yield from _scan_text(inside.split(CLOSE)[0], props)
        return
    pos = 0
    dec = json.JSONDecoder()
    while (m := _HEAD_RE.search(block, pos)) is not None:
        start = m.end()
        try:
            _, end = dec.raw_decode(block, start)
        except json.JSONDecodeError:
            yield json.loads(m.group(1)), block[start:], True
            return
        yield json.loads(m.group(1)), block[start:end], True
        pos = end


_TEXT_NAME = {"xml": re.compile(r"\s*<function=([^>\s]+)>"), "glm": re.compile(r"\s*([\w.\-]+)(?=\s|<arg_key>)")}
_TEXT_PARAM = {"xml": re.compile(r"<parameter=([^>\s]+)>\n?((?:(?!</parameter>).)*)(</parameter>)?", re.S),
               "glm": re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>((?:(?!</arg_value>).)*)(</arg_value>)?", re.S)}
_TEXT_END = {"xml": "\n</parameter>", "glm": "</arg_value>"}


def _scan_text(inside: str, props: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str, bool]]:
    """One XML / GLM call as written so far → (name, arguments JSON so far, False). A finished
    parameter is its typed value; an unfinished one is sent only when the tool's schema says it is a
    string (its text is final as written), held back by any tail that may start its end tag. The
    text equals the prefix of `json.dumps` of the finished call's arguments."""
    form = "xml" if "<function=" in inside else "glm"
    head = _TEXT_NAME[form].match(inside)
    if head is None:
        return
    name, tool = head.group(1), props.get(head.group(1))
    body = inside[head.end():]
    if form == "xml":
        body = body.split("</function>")[0]
    parts = []
    for m in _TEXT_PARAM[form].finditer(body):
        key = m.group(1).strip() if form == "glm" else m.group(1)
        prop = tool.get(key) if tool is not None else None
        raw = m.group(2)
        if m.group(3) is not None:  # finished
            if form == "xml" and raw.endswith("\n"):
                raw = raw[:-1]
            parts.append(f"{json.dumps(key)}: {json.dumps(typed_value(raw, prop if tool is not None else None))}")
            continue
        if isinstance(prop, Mapping) and prop.get("type") == "string":
            safe = raw[: _safe_tail(raw, _TEXT_END[form])]
            if form == "xml" and safe.endswith("\n"):
                safe = safe[:-1]  # may be the newline before </parameter>
            parts.append(f"{json.dumps(key)}: " + json.dumps(safe)[:-1])
        break  # a later parameter cannot be complete before this one
    yield name, "{" + ", ".join(parts), False


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HARMONY_OPEN = "<|channel|>"


@dataclass
class ReasoningStream:
    """A reply arriving in pieces → ("reasoning", text) and ("content", text) pieces. Streaming splits
    a reply that opens with `<think>` (the whole reply is content otherwise: holding text back until a
    `</think>` that may never come would stall every non-thinking model); `split_reasoning` on the
    finished text also reads a reply whose template opened the tag (`opened` says so while streaming).
    A harmony reply (gpt-oss: it opens with `<|channel|>`) streams its analysis channel as reasoning,
    its final channel and calls as content."""

    opened: bool = False  # the prompt ended with `<think>` (the template opened it): the reply starts inside
    text: str = ""
    _state: str = "start"  # start → think → answer, or start → harmony
    _sent: int = 0
    _answer_started: bool = False
    _harmony_sent: dict[str, str] = field(default_factory=lambda: {"reasoning": "", "content": ""})
    _messages: GrowingMatches = field(default_factory=lambda: GrowingMatches(HARMONY_MESSAGE, HARMONY_MESSAGE_ENDS))
    _calls: GrowingMatches = field(default_factory=lambda: GrowingMatches(HARMONY_CALL, ("<|call|>",), needs="to=functions."))

    def _harmony(self, final: bool) -> Iterator[tuple[str, str]]:
        """Harmony: the analysis channel's text as reasoning, the final channel's and the calls (their
        header and arguments as written, for `ToolCallStream` to read) as content, each as it grows;
        a tail that may be an unfinished `<|…|>` tag waits. The pieces join to `split_reasoning`'s
        split of the whole reply (the reasoning before its strip)."""
        reasoning, content, found = _harmony_split(self.text, self._messages.update(self.text), self._calls.update(self.text))
        if final:
            now = {"reasoning": reasoning, "content": content if found else self.text}
        else:
            now = {"reasoning": _tag_safe(reasoning), "content": _tag_safe(content)}
        for kind in ("reasoning", "content"):
            sent = self._harmony_sent[kind]
            if now[kind].startswith(sent) and len(now[kind]) > len(sent):
                yield kind, now[kind][len(sent):]
                self._harmony_sent[kind] = now[kind]

    def feed(self, piece: str, final: bool = False) -> Iterator[tuple[str, str]]:
        self.text += piece
        if self._state == "start" and self.opened:
            self._state = "think"
        if self._state == "start":
            stripped = self.text.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._state, self._sent = "think", len(self.text) - len(stripped) + len(THINK_OPEN)
            elif stripped.startswith(HARMONY_OPEN):
                self._state = "harmony"
            elif (THINK_OPEN.startswith(stripped) or HARMONY_OPEN.startswith(stripped)) and not final:
                return  # may still become the opener
            else:
                self._state, self._answer_started = "answer", True
        if self._state == "harmony":
            yield from self._harmony(final)
            return
        if self._state == "think":
            end = self.text.find(THINK_CLOSE, self._sent)
            if end < 0:
                safe = len(self.text) if final else _safe_tail(self.text, THINK_CLOSE)
                if safe > self._sent:
                    yield "reasoning", self.text[self._sent : safe]
                    self._sent = safe
                return
            if end > self._sent:
                yield "reasoning", self.text[self._sent : end]
            self._state, self._sent = "answer", end + len(THINK_CLOSE)
        rest = self.text[self._sent :]
        if not self._answer_started:
            rest = rest.lstrip()
            if not rest:
                return
            self._answer_started = True
            self._sent = len(self.text) - len(rest)
        if rest:
            yield "content", rest
            self._sent = len(self.text)


_TAG_TAIL = re.compile(r"<(?:\|\w*\|?)?\Z")


def _tag_safe(text: str) -> str:
    """`text` without a tail that may be an unfinished harmony tag (`<`, `<|en`, `<|end|`); a `<` in
    the text (`a < b`, code in a call's arguments) goes out as soon as what follows it is no tag."""
    m = _TAG_TAIL.search(text, max(0, len(text) - 12))  # the longest tag is 11 characters
    return text[: m.start()] if m is not None else text


def _safe_tail(text: str, tag: str) -> int:
    """All of `text` but a tail that may be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return len(text) - k
    return len(text)
