"""How each model family writes a tool call (`ToolSyntax`), read back from its own text (`calls_in`),
and which family a checkpoint is (`syntax_for`, from its chat template, else its `model_type`).

The forms, as each family's real chat template renders an assistant turn (the fixtures in
tests/fixtures/chat_templates are those templates):

- json (Hermes / Qwen2.5): `<tool_call>\\n{"name": N, "arguments": {…}}\\n</tool_call>`, one block a
  call; SmolLM2 (trained on it): a JSON list in one block, `<tool_call>[{…}, …]</tool_call>`.
- xml (Qwen3-Coder): `<tool_call>\\n<function=N>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>`.
- glm (GLM-4.5/4.6, Laguna): `<tool_call>N\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>`
  (Laguna's later template writes it without the newlines: `sep=""`).
- harmony (gpt-oss): after `<|start|>assistant`, ` to=functions.N<|channel|>commentary json<|message|>{…}<|call|>`
  (the template's order); the model itself writes `<|channel|>commentary to=functions.N <|constrain|>json<|message|>{…}`,
  its analysis channel (reasoning) and final channel (the answer) as `<|channel|>C<|message|>…<|end|>`.
- deepseek (DeepSeek-V3.1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{…}<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`;
  DeepSeek-V3/R1 put `function<｜tool▁sep｜>N\\n```json\\n{…}\\n```` between the call tags.

Values written as text (xml, glm) are typed by the tool's JSON schema when it is given (a `string`
parameter stays the exact text; others are parsed as JSON, then as Python's True/False/None, which
Qwen3-Coder's template writes), else by their look. This module is *not* the parser that finds calls
in a whole reply (`lagoon.tool_calls.parse_tool_calls`) nor the grammar that forces one
(`lagoon.engine.grammar.Constraint.tool_call`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lagoon.protocols import ToolCall

__all__ = ["ToolSyntax", "HERMES", "SMOLLM2", "QWEN3_CODER", "HARMONY", "GLM45", "LAGUNA", "LAGUNA_V8",
           "DEEPSEEK_V3", "DEEPSEEK_V31", "SYNTAXES", "syntax_for", "calls_in", "scan_deepseek", "scan_harmony",
           "HARMONY_CALL", "HARMONY_MESSAGE", "HARMONY_MESSAGE_ENDS", "GrowingMatches", "Span", "param_schemas",
           "new_call_id", "typed_value"]

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>")
# one harmony message: group 1 its channel, group 2 its text (up to the token that ends it, or the text's end)
HARMONY_MESSAGE = re.compile(
    r"<\|channel\|>(\w+)(?:(?!<\|message\|>).)*<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|call\|>|<\|start\|>|<\|channel\|>|\Z)",
    re.S)
HARMONY_MESSAGE_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>", "<|channel|>")
# one harmony call, whole or still being written: the recipient may sit before or after the channel
# ("to=functions.f<|channel|>commentary json<|message|>" or "<|channel|>commentary to=functions.f <|constrain|>json<|message|>");
# group 1 the name, group 2 the arguments text (up to `<|call|>`, an end token the engine does not decode)
_HARMONY_CALL_HEAD = r"(?:<\|start\|>assistant)?(?:<\|channel\|>\w+\s*)?\s*to=functions\.([\w.\-]+)(?:(?!<\|message\|>).)*<\|message\|>"
HARMONY_CALL = re.compile(_HARMONY_CALL_HEAD + r"(.*?)(?:<\|call\|>|\Z)", re.S)
_HARMONY_HEAD_RE = re.compile(_HARMONY_CALL_HEAD, re.S)


@dataclass(frozen=True)
class ToolSyntax:
    """How a model family writes one call: `open` + the call in its `form` + `close`; `tokens` are
    the family's syntax tokens (the decoder must keep them in the text for the parser to see)."""

    name: str
    open: str
    close: str
    as_list: bool = False
    form: str = "json"  # json, xml (Qwen3-Coder), glm (GLM-4.5, Laguna), harmony (gpt-oss), deepseek
    sep: str = "\n"  # glm: what follows the name and each tag; deepseek: "```json" when legacy ("" else)
    tokens: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<think>", "</think>")

    def render(self, calls: Sequence[tuple[str, Any]]) -> str:
        """(name, arguments) pairs → the text the model writes for them."""
        if self.form == "xml":
            return "\n".join(self.open + _xml_call(n, a) + self.close for n, a in calls)
        if self.form == "glm":
            return self.sep.join(self.open + _glm_call(n, a, self.sep) + self.close for n, a in calls)
        if self.form == "harmony":
            return "<|start|>assistant".join(f" to=functions.{n}<|channel|>commentary json<|message|>{json.dumps(a)}<|call|>"
                                             for n, a in calls)
        if self.form == "deepseek":
            body = "".join(self.call_head(n) + json.dumps(a) + self.call_tail() for n, a in calls)
            return DS_CALLS_BEGIN + body + DS_CALLS_END
        objs = [json.dumps({"name": n, "arguments": a}) for n, a in calls]
        if self.as_list:
            return self.open + "[" + ", ".join(objs) + "]" + self.close
        return "\n".join(self.open + o + self.close for o in objs)

    def call_head(self, name: str) -> str:
        """deepseek: the text before a call's arguments JSON."""
        if self.sep:  # DeepSeek-V3 / R1
            return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n"
        return f"{DS_CALL_BEGIN}{name}{DS_SEP}"

    def call_tail(self) -> str:
        return ("\n```" if self.sep else "") + DS_CALL_END

    @property
    def open_constraint(self) -> str:
        """json form: where the grammar of a single forced call starts (a list opens with `[`)."""
        return self.open + ("[" if self.as_list else "")

    @property
    def close_constraint(self) -> str:
        return ("]" if self.as_list else "") + self.close

    def example(self) -> str:
        return self.render([("<function-name>", {"<arg>": "<value>"})]).replace('"<function-name>"', "<function-name>")


HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>")
SMOLLM2 = ToolSyntax("smollm2", "<tool_call>", "</tool_call>", as_list=True)
QWEN3_CODER = ToolSyntax("qwen3_coder", "<tool_call>\n", "\n</tool_call>", form="xml")
GLM45 = ToolSyntax("glm45", "<tool_call>", "</tool_call>", form="glm")
LAGUNA = ToolSyntax("laguna", "<tool_call>", "</tool_call>", form="glm")
LAGUNA_V8 = ToolSyntax("laguna_v8", "<tool_call>", "</tool_call>", form="glm", sep="")
HARMONY = ToolSyntax("harmony", "", "", form="harmony", sep="", tokens=HARMONY_TOKENS)
_DS_TOKENS = (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP, "<think>", "</think>")
DEEPSEEK_V31 = ToolSyntax("deepseek_v31", DS_CALLS_BEGIN, DS_CALLS_END, form="deepseek", sep="", tokens=_DS_TOKENS)
DEEPSEEK_V3 = ToolSyntax("deepseek_v3", DS_CALLS_BEGIN, DS_CALLS_END, form="deepseek", sep="```json", tokens=_DS_TOKENS)
SYNTAXES = {s.name: s for s in (HERMES, SMOLLM2, QWEN3_CODER, GLM45, LAGUNA, LAGUNA_V8, HARMONY, DEEPSEEK_V31, DEEPSEEK_V3)}

# the syntax a checkpoint's family uses when its chat template does not say (a GGUF without one)
_BY_MODEL_TYPE = {"laguna": LAGUNA, "glm4_moe": GLM45, "gpt_oss": HARMONY, "deepseek_v3": DEEPSEEK_V31,
                  "deepseek_v2": DEEPSEEK_V3, "qwen3_moe": QWEN3_CODER}


def syntax_for(template: str, model_type: str | None = None) -> ToolSyntax:
    """The tool-call syntax a checkpoint's family was trained on, read from its chat template (what
    the template writes for a call), else from `model_type`, else Hermes."""
    if "<arg_key>" in template:
        if "<assistant>" not in template:
            return GLM45
        # Laguna: the XS.2 template puts a newline after each tag, the later (v8) one none
        return LAGUNA if re.search(r"</arg_key>(\n|\\n)", template.split("{%- for message in messages")[-1]) else LAGUNA_V8
    if DS_SEP in template:
        return DEEPSEEK_V3 if "```json" in template else DEEPSEEK_V31
    if "<function=" in template and "<parameter=" in template:
        return QWEN3_CODER
    if "<|channel|>" in template:
        return HARMONY
    if "SmolLM" in template:
        return SMOLLM2
    if "<tool_call>" not in template and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    return HERMES


def param_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Tool name → its parameters' `properties` (OpenAI tool dicts); empty without tools."""
    out: dict[str, Mapping[str, Any]] = {}
    for t in tools or ():
        fn = t.get("function", t)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties") or {}
            out[fn["name"]] = props if isinstance(props, Mapping) else {}
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------- text forms
_XML_FN = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_XML_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)(?:</arg_value>|$)", re.S)
_GLM_NAME = re.compile(r"\s*([\w.\-]+)\s*(?=<arg_key>|$)", re.S)
_DS_CALL = re.compile(re.escape(DS_CALL_BEGIN) + r"(.*?)" + re.escape(DS_SEP) + r"(.*?)(?:" + re.escape(DS_CALL_END) + r"|$)",
                      re.S)
_DS_LEGACY = re.compile(r"([^\n]*)\n```(?:json)?\n(.*?)\n```\s*$", re.S)
_DS_FENCES = ("```json\n", "```\n")


def _scalar(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _xml_call(name: str, args: Mapping[str, Any] | None) -> str:
    params = "".join(f"<parameter={k}>\n{_scalar(v)}\n</parameter>\n" for k, v in (args or {}).items())
    return f"<function={name}>\n{params}</function>"


def _glm_call(name: str, args: Mapping[str, Any] | None, sep: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>{sep}<arg_value>{_scalar(v)}</arg_value>{sep}"
                    for k, v in (args or {}).items())
    return f"{name}{sep}{pairs}"


def typed_value(raw: str, prop: Mapping[str, Any] | None) -> Any:
    """A parameter written as text → its value: by the schema's type when known, else by its look."""
    kind = prop.get("type") if isinstance(prop, Mapping) else None
    if kind == "string" or (isinstance(kind, list) and kind == ["string"]):
        return raw
    text = raw.strip()
    if prop is None and text[:1] not in '[{0123456789-tfn"':
        return raw
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    literal = {"True": True, "False": False, "None": None}  # Qwen3-Coder's template writes Python's
    if prop is not None and text in literal:
        return literal[text]
    return raw


def calls_in(block: str, syntax_form: str, props: Mapping[str, Mapping[str, Any]] | None = None) -> list[ToolCall]:
    """The calls inside one block's text in `syntax_form` (xml: a `<tool_call>` block's inside; glm: the
    same; deepseek: the text between the calls tags); `props` types the text values by tool."""
    props = props or {}
    calls = []
    if syntax_form == "xml":
        for fn in _XML_FN.finditer(block):
            p = props.get(fn.group(1), {})
            args = {m.group(1): typed_value(m.group(2), p.get(m.group(1)) if props else None) for m in _XML_PARAM.finditer(fn.group(2))}
            calls.append(ToolCall(id=new_call_id(), name=fn.group(1), arguments=args))
    elif syntax_form == "glm":
        head = _GLM_NAME.match(block)
        if head is not None:
            name, p = head.group(1), props.get(head.group(1), {})
            args = {m.group(1).strip(): typed_value(m.group(2), p.get(m.group(1).strip()) if props else None)
                    for m in _GLM_ARG.finditer(block, head.end())}
            calls.append(ToolCall(id=new_call_id(), name=name, arguments=args))
    elif syntax_form == "deepseek":
        for m in _DS_CALL.finditer(block):
            name, raw = m.group(1).strip(), m.group(2)
            legacy = _DS_LEGACY.match(raw)  # "function<sep>NAME\n```json\n{…}\n```"
            if legacy is not None and name == "function":
                name, raw = legacy.group(1).strip(), legacy.group(2)
            try:
                args = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(args, str):  # a template that wrote the arguments string through tojson
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    continue
            if isinstance(args, dict) and name:
                calls.append(ToolCall(id=new_call_id(), name=name, arguments=args))
    return calls


def _arguments_so_far(dec: json.JSONDecoder, raw: str, closed: bool) -> tuple[str | None, bool]:
    """A streamed call's arguments as written so far → (text to send or None, stop reading): a JSON
    object goes out as the model's own text, cut at the value's end once complete (still being
    written: what there is, and stop); arguments written as a JSON string go out whole, decoded, once
    the string ends; a finished call whose arguments are neither is skipped, as the whole-reply parse
    skips it; an unfinished one stops the scan until more is written."""
    start = len(raw) - len(raw.lstrip())
    head = raw[start : start + 1]
    if head == "{":
        try:
            end = dec.raw_decode(raw, start)[1]
        except json.JSONDecodeError:
            return (None, False) if closed else (raw[start:], True)
        return raw[start:end], False
    if head == '"':
        args: Any = None
        try:
            args = json.loads(dec.raw_decode(raw, start)[0])
        except (json.JSONDecodeError, TypeError):
            pass
        if isinstance(args, dict):
            return json.dumps(args), False
    return None, not closed


def scan_deepseek(region: str) -> Iterator[tuple[str, str, bool]]:
    """DeepSeek calls as written so far (`region` starts at the calls' opening tag) → per call whose
    name is complete and whose arguments have begun: (name, arguments text so far, False). The
    arguments are the model's own JSON text, sent as it grows and cut at the end of the value once
    that is complete, so the pieces join to exactly what it wrote; `calls_in` reads the same value
    back from the finished text, and skips what it skips (a finished call whose arguments are not a
    JSON object). A V3 / R1 call's name is complete at the newline after it, its arguments start
    after the ```json fence. Arguments written as a JSON *string* (a template that passed them
    through `tojson`) hold the call back until the string ends; it is then sent decoded. The flag
    is False ("not necessarily the model's own JSON"): `ToolCallStream`'s final pass may complete it."""
    dec = json.JSONDecoder()
    for chunk in region.split(DS_CALL_BEGIN)[1:]:
        closed = DS_CALL_END in chunk
        name, sep, raw = chunk.split(DS_CALL_END)[0].partition(DS_SEP)
        name = name.strip()
        if name == "function" and raw.lstrip()[:1] not in ("{", '"'):  # V3 / R1: "function<sep>NAME\n```json\n{…}"
            name, _, rest = raw.partition("\n")
            name = name.strip()
            fence = next((f for f in _DS_FENCES if rest.startswith(f)), None)
            raw = "" if fence is None else rest[len(fence):]
        text, stop = _arguments_so_far(dec, raw, closed) if name else (None, not closed)
        if text is not None:
            yield name, text, False
        if stop:
            return  # the name or the arguments are still being written


def scan_harmony(region: str) -> Iterator[tuple[str, str, bool]]:
    """Harmony calls as written so far (`region` starts at the first call's header) → per call whose
    header is complete (`<|message|>` written, so the name is whole) and whose arguments have begun:
    (name, arguments text so far, False), as `scan_deepseek` does: the model's own JSON, sent as it
    grows and cut at the end of the value once complete, so the pieces join to exactly what it wrote
    and `json.loads` of them equals the whole-reply parse (`lagoon.tool_calls.parse_tool_calls`,
    which reads `HARMONY_CALL`). Arguments written as a JSON string go out whole, decoded, once the
    string ends; a finished call whose arguments are not a JSON object is skipped, as the parse skips
    it. A call ends at `<|call|>` or at the end of the text (the engine does not decode that end token)."""
    dec, pos = json.JSONDecoder(), 0
    # HARMONY_CALL's matches, each body found without a regex (a long one is read again per piece)
    while (m := _HARMONY_HEAD_RE.search(region, pos)) is not None:
        close = region.find("<|call|>", m.end())
        closed = close >= 0
        name, raw = m.group(1), region[m.end() : close if closed else len(region)]
        pos = close + len("<|call|>") if closed else len(region)
        text, stop = _arguments_so_far(dec, raw, closed)
        if text is not None:
            yield name, text, False
        if stop:
            return  # the arguments' opening (or a string) is still being written


Span = tuple[int, int, str, int]  # a match's start, end, group 1 and where its last group (the body) starts


@dataclass
class GrowingMatches:
    """`pattern.finditer` over a text that only grows (a streamed reply), as `Span`s, reading again
    only what may have changed, so a long reply costs linear time, not quadratic. The pattern's last
    group is a body that ends at a token of `closes` (or the text's end). A match whose body ended
    before the end stays as found (a later start failed for good: the text it read is complete); the
    last may run to the end of the text (still being written): it grows with the text, without a
    search, while no closing token arrives. `needs`, a literal every match holds, skips the search
    while absent. The spans always equal a fresh `finditer`'s (`spans`; tests check every prefix)."""

    pattern: re.Pattern[str]
    closes: tuple[str, ...]
    needs: str | None = None
    _settled: list[Span] = field(default_factory=list)
    _open: Span | None = None  # the last match, its body running to the end of the text at `_seen`
    _resume: int = 0  # where the next search starts: the end of the last settled match
    _seen: int = 0
    _absent: int = 0  # `needs` does not start before this

    @staticmethod
    def spans(pattern: re.Pattern[str], text: str) -> list[Span]:
        return [(m.start(), m.end(), m.group(1), m.start(pattern.groups)) for m in pattern.finditer(text)]

    def update(self, text: str) -> list[Span]:
        n, seen, self._seen = len(text), self._seen, len(text)
        if self._open is not None:
            start, _, label, body = self._open
            # a closing token that ends the body must start in what is new (one that started earlier and
            # was complete would have ended it already; one cut by the old end may complete now)
            region = text[max(body, seen - max(map(len, self.closes)) + 1) :]
            if not any(c in region for c in self.closes):
                self._open = (start, n, label, body)
                return [*self._settled, self._open]
            self._open = None
        if self.needs is not None:
            at = text.find(self.needs, max(self._resume, self._absent))
            if at < 0:
                self._absent = max(self._absent, n - len(self.needs) + 1)
                return list(self._settled)
        body_group = self.pattern.groups
        for m in self.pattern.finditer(text, self._resume):
            span = (m.start(), m.end(), m.group(1), m.start(body_group))
            if m.end(body_group) == n:  # the body runs to the end: only the last match can
                self._open = span
                return [*self._settled, span]
            self._settled.append(span)
            self._resume = m.end()
        return list(self._settled)
