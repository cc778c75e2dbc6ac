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
    def tool_call(cls, tools: Sequence[Mapping[str, Any]], syntax: Any) -> Constraint:
        """Exactly one call of one of `tools` (OpenAI tool dicts), written in `syntax` (a
        `lagoon.tool_calls.ToolSyntax`): the name first, then arguments valid against the
        tool's `parameters` schema, made strict as OpenAI's strict function calling is (an object
        that declares its properties takes no others, so a small model cannot copy the prompt's
        `"argument1": "value1"` example into a real call)."""
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
            head = '{"name": ' + json.dumps(name) + ', "arguments": '
            rules.append(f"call_{i}: {_lit(head)} args_{i} {_lit('}')}")
            rules.append(f"args_{i}: %json " + json.dumps({**strict_schema(params), "x-guidance": JSON_STYLE}))
            alts.append(f"call_{i}")
        body = " | ".join(alts)
        start = f"start: {_lit(syntax.open_constraint)} ({body}) {_lit(syntax.close_constraint)}"
        return cls("lark", "\n".join([start, *rules]))

    def grammar(self) -> str:
        """The llguidance grammar text."""
        from llguidance import LLMatcher

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
            import llguidance.hf
        except ImportError as exc:  # a core dependency; a broken install should say so
            raise LagoonError(f"constrained decoding needs llguidance ({exc}); reinstall lagoon-agent") from exc
        self._llg = llguidance
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = list(eos_ids) if eos is None else eos
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
        except ValueError as exc:  # llguidance reads the Rust (fast) tokenizer only
            raise UnsupportedModelError(
                f"constrained decoding needs a fast (tokenizer.json) tokenizer; this checkpoint's is "
                f"{type(tokenizer).__name__} ({exc})"
            ) from exc
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher at the start of `constraint` (BadRequestError naming the problem when the
        grammar, regex or schema is invalid)."""
        grammar = constraint.grammar()
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
