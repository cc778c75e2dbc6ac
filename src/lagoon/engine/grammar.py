"""Grammar-constrained decoding: a `Constraint` (what a reply must match: a JSON schema, a regex, a
Lark grammar, a choice, or a tool call in the model family's syntax), compiled by a `GrammarCompiler`
into per-request `GrammarMatcher`s that give the next token's allowed set as a bitmask.

Built on llguidance (the library llama.cpp and vLLM use): its Rust parser computes a token mask in
well under a millisecond, so a mask per decoded token costs little next to the forward. Compiling a
grammar costs more, so the compiler keeps one pristine matcher per grammar text (LRU) and hands each
request a copy. JSON is written with OpenAI's separators (`", "`, `": "`) and no other whitespace,
so a small model cannot wander off into endless blank lines inside a JSON value.

The mask is applied in `lagoon.engine.sampling.sample`; the scheduler (`lagoon.engine.generate`)
keeps the matcher in step with the sampled tokens. This module is *not* a JSON-schema validator
(the mask guarantees the shape of what is generated; `jsonschema` checks it in the tests).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lagoon.errors import BadRequestError, LagoonError, UnsupportedModelError

__all__ = ["Constraint", "GrammarCompiler", "GrammarMatcher", "JSON_STYLE", "strict_schema"]

# OpenAI/json.dumps separators, no free whitespace (x-guidance options of llguidance's JSON compiler)
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json_schema", "regex", "lark"]


@dataclass(frozen=True)
class Constraint:
    """What a generation must match. `source` is a JSON schema (as canonical JSON text), a regex or a
    Lark grammar (llguidance's dialect, which may embed `%json {schema}`)."""

    kind: Kind
    source: str
    # a tool-call grammar: its literal syntax text that is one token of the vocabulary (`<tool_call>`,
    # `<|channel|>`, …) is matched as that token (see `GrammarCompiler.matcher`)
    token_literals: bool = False

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | None = None) -> Constraint:
        """Any JSON object when `schema` is None (`response_format: json_object`)."""
        if schema is None or schema is True:
            schema = {"type": "object"}
        if not isinstance(schema, Mapping):
            raise BadRequestError(f"a JSON schema must be an object (got {type(schema).__name__})")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if not options or not all(isinstance(o, str) for o in options):
            raise BadRequestError("a choice constraint needs a non-empty list of strings")
        return cls("regex", "(" + "|".join(re.escape(o) for o in options) + ")")

    @classmethod
    def tool_call(cls, tools: Sequence[Mapping[str, Any]], syntax: Any, think: bool = False) -> Constraint:
        """Exactly one call of one of `tools` (OpenAI tool dicts), written in `syntax` (a
        `lagoon.tool_syntax.ToolSyntax`) as that family writes it: the name first, then arguments
        valid against the tool's `parameters` schema, made strict as OpenAI's strict function
        calling is (an object that declares its properties takes no others, so a small model cannot
        copy the prompt's `"argument1": "value1"` example into a real call). Qwen3-Coder's XML and
        GLM / Laguna's `<arg_key>` calls write one parameter per tag pair, in the schema's order
        (required ones always, optional ones or not); a string parameter is free text (up to its
        `maxLength`, one of its `enum`), any other is JSON for its schema. With `think` (the prompt
        opened `<think>`), free reasoning and its `</think>` come first."""
        if not tools:
            raise BadRequestError("a required tool call needs at least one tool")
        rules, alts = [], []
        for i, tool in enumerate(tools):
            fn = tool.get("function", tool)
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequestError(f"tools[{i}] has no function name")
            params = fn.get("parameters") or {"type": "object"}
            if not isinstance(params, Mapping):
                raise BadRequestError(f"tools[{i}] ({name}): parameters must be a JSON schema object")
            rules += _call_rules(i, name, strict_schema(params), syntax)
            alts.append(f"call_{i}")
        body = " | ".join(alts)
        if syntax.form == "json":
            start = f"start: {_lit(syntax.open_constraint)} ({body}) {_lit(syntax.close_constraint)}"
        else:
            start = f"start: {body}"
        if think:
            start = start.replace("start: ", f"start: {_text_value('THINK', {}, '</think>', rules)} ", 1)
        return cls("lark", "\n".join([start, *rules]), token_literals=True)

    def grammar(self, specials: Mapping[str, int] | None = None) -> str:
        """The llguidance grammar text; with `token_literals`, each of `specials` (text → id of a
        token llguidance matches only as itself) inside a literal becomes a reference to that token."""
        from llguidance import LLMatcher

        if self.kind == "lark" and self.token_literals and specials:
            return LLMatcher.grammar_from_lark(_token_refs(self.source, specials))

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_STYLE)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` where every object schema with `properties` and no `additionalProperties`
    gets `additionalProperties: false`."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), Mapping) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _json_rule(rule: str, schema: Mapping[str, Any]) -> str:
    return f"{rule}: %json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def _call_rules(i: int, name: str, params: Mapping[str, Any], syntax: Any) -> list[str]:
    """Lark rules `call_{i}` (+ helpers) for one call of `name` in `syntax`'s form."""
    if syntax.form == "harmony":  # after "<|start|>assistant"; the <|call|> that ends it is an end token
        head = f" to=functions.{name}<|channel|>commentary json<|message|>"
        return [f"call_{i}: {_lit(head)} args_{i}", _json_rule(f"args_{i}", params)]
    if syntax.form == "deepseek":
        return [f"call_{i}: {_lit(syntax.open + syntax.call_head(name))} args_{i} {_lit(syntax.call_tail() + syntax.close)}",
                _json_rule(f"args_{i}", params)]
    if syntax.form == "xml":
        head, tail = f"<tool_call>\n<function={name}>\n", "</function>\n</tool_call>"
        key_open, key_close, value_close = "<parameter={k}>\n", "", "\n</parameter>\n"
    elif syntax.form == "glm":
        sep = syntax.sep
        head, tail = f"<tool_call>{name}{sep}", "</tool_call>"
        key_open, key_close, value_close = "<arg_key>{k}</arg_key>" + sep, "<arg_value>", "</arg_value>" + sep
    else:
        value = '{"name": ' + json.dumps(name) + ', "arguments": '
        return [f"call_{i}: {_lit(value)} args_{i} {_lit('}')}", _json_rule(f"args_{i}", params)]
    rules, parts = [], []
    required = set(params.get("required") or ())
    core = value_close.rstrip("\n")  # the text value's terminator; a separator newline follows it
    trail = value_close[len(core):]
    for j, (key, prop) in enumerate((params.get("properties") or {}).items()):
        prop = prop if isinstance(prop, Mapping) else {}
        opener = _lit(key_open.format(k=key) + key_close)
        if prop.get("type") == "string":
            value = _text_value(f"V_{i}_{j}", prop, core, rules)
        else:
            value = f"pv_{i}_{j} {_lit(core)}"
            rules.append(_json_rule(f"pv_{i}_{j}", prop))
        rules.append(f"p_{i}_{j}: {opener} {value}" + (f" {_lit(trail)}" if trail else ""))
        parts.append(f"p_{i}_{j}" + ("" if key in required else "?"))
    rules.insert(0, f"call_{i}: {_lit(head)} {' '.join(parts)} {_lit(tail)}")
    return rules


def _text_value(terminal: str, prop: Mapping[str, Any], end: str, rules: list[str]) -> str:
    """A string parameter written as raw text then `end`: one of its `enum`, or any text (up to
    `maxLength`) without `end` in it, lexed together with `end` as one token (a free-text lexeme
    followed by its own terminator would never know where to stop)."""
    enum = prop.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return "(" + " | ".join(f"{_lit(e)} {_lit(end)}" for e in enum) + ")"
    size = prop.get("maxLength")
    body = "(?s:.)" + (f"{{0,{size}}}" if isinstance(size, int) and size >= 0 else "*")
    # the text with its end as bytes, or the text then the end as written (one token when the
    # vocabulary has it: a lexeme ends where a special token starts)
    rules.append(f"{terminal}_END: /{body}{_rx(end)}/ & ~/(?s:.)*{_rx(end)}(?s:.)+/")
    rules.append(f"{terminal}: /{body}/ & ~/(?s:.)*{_rx(end)}(?s:.)*/")
    return f"({terminal}_END | {terminal} {_lit(end)})"


def _rx(text: str) -> str:
    """`text` as a literal inside a Lark `/regex/`."""
    return "".join("\\n" if c == "\n" else "\\/" if c == "/" else re.escape(c) for c in text)


_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


def _token_refs(lark: str, specials: Mapping[str, int]) -> str:
    """`lark` with each special token's text inside a string literal split out as `<[id]>`: llguidance
    treats an added token that looks like `<…>` as special, so the literal's bytes would never be
    that token and the model's own `<tool_call>` token would be refused. `%json` lines are left alone."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def split(m: re.Match[str]) -> str:
        text = json.loads(m.group(0))
        if pattern.search(text) is None:
            return m.group(0)
        parts, pos = [], 0
        for hit in pattern.finditer(text):
            if hit.start() > pos:
                parts.append(_lit(text[pos : hit.start()]))
            parts.append(f"<[{specials[hit.group(0)]}]>")
            pos = hit.end()
        if pos < len(text):
            parts.append(_lit(text[pos:]))
        return "(" + " ".join(parts) + ")"

    return "\n".join(line if "%json" in line else _LITERAL.sub(split, line) for line in lark.split("\n"))


def _lit(text: str) -> str:
    """A Lark string literal (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text)


class GrammarMatcher:
    """One request's position in its grammar: `allowed(vocab)` → bool [vocab] for the next token,
    `accept(token)` advances, `done` once the grammar admits nothing but the end."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._m = matcher
        self._bitmask = torch.zeros(words, dtype=torch.int32)  # [W], 32 tokens a word

    def allowed(self, vocab: int) -> torch.Tensor:
        from lagoon.engine.sampling import unpack_bitmask

        self._m.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        if self._m.is_error():
            raise LagoonError(f"constrained decoding failed: {self._m.get_error()}")
        return unpack_bitmask(self._bitmask, vocab)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise LagoonError(f"constrained decoding: token {token} is outside the grammar ({self._m.get_error()})")

    @property
    def done(self) -> bool:
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


class GrammarCompiler:
    """Compiles `Constraint`s for one tokenizer; compiled grammars are cached (LRU of `cache_size`)."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int] = (), cache_size: int = 64) -> None:
        try:
            import llguidance
        except ImportError as exc:  # a core dependency; a broken install should say so
            raise LagoonError(f"constrained decoding needs llguidance ({exc}); reinstall lagoon-agent") from exc
        self._llg = llguidance
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = list(eos_ids) if eos is None else eos
        backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers' fast tokenizers and FastTokenizer
        if backend is None:  # llguidance reads the Rust (fast) tokenizer only
            raise UnsupportedModelError(
                f"constrained decoding needs a fast (tokenizer.json) tokenizer; this checkpoint's is "
                f"{type(tokenizer).__name__}"
            )
        # what llguidance.hf.from_tokenizer does, without its transformers import (~0.35 s)
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=eos)
        self.words = (self.tokenizer.vocab_size + 31) // 32
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        self.specials = {t: i for t, i in added.items() if i < self.tokenizer.vocab_size and self.tokenizer.is_special_token(i)}
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher at the start of `constraint` (BadRequestError naming the problem when the
        grammar, regex or schema is invalid)."""
        grammar = constraint.grammar(self.specials)
        with self._lock:
            base = self._cache.get(grammar)
            if base is not None:
                self._cache.move_to_end(grammar)
            else:
                base = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
                if base.is_error():
                    raise BadRequestError(f"invalid {constraint.kind.replace('_', ' ')} constraint: {base.get_error()}")
                self.compiled += 1
                self._cache[grammar] = base
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return GrammarMatcher(base.deep_copy(), self.words)
