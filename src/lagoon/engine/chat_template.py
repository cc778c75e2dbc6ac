"""`ChatTemplate`: a checkpoint's Jinja chat template, rendered the way transformers 5.24's
`apply_chat_template(..., tokenize=False)` renders it, without importing transformers (~0.35 s of
a warm start).

What is copied, and why each piece matters for identical text: the sandboxed, immutable Jinja
environment with ``trim_blocks`` / ``lstrip_blocks`` and ``loopcontrols`` (templates come from
untrusted files); the ``{% generation %}`` tag (rendered as its body: Lagoon never asks for the
assistant-token mask); the ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``), and the
``raise_exception`` / ``strftime_now`` / ``dict`` / ``namespace`` globals; messages with their
None-valued keys dropped, every input rebuilt from plain JSON types (anything else becomes an inert
``<TypeName>``), and reasoning copied under ``reasoning_content`` and ``thinking``; the tokenizer's
named special tokens (``bos_token``, ``eos_token`` …) passed as variables, overridden by the
caller's keywords. `tests/engine/test_fast_tokenizer.py` renders every template in
tests/fixtures/chat_templates both ways and compares. This module is *not* a tokenizer (see
`lagoon.engine.fast_tokenizer`) and knows nothing about tool-call syntaxes (see
`lagoon.engine.tokenizer.ChatFormat`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate"]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is what templates read


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body (transformers tracks its span)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in a template, without the class's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore-prefixed attributes (no way to CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types; anything else becomes an inert ``<TypeName>``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # `np.bool_(False)` would otherwise be a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # a pydantic model
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """One compiled chat template; `render` is transformers' ``apply_chat_template(tokenize=False)``."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        self._compiled = env.from_string(source)

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
               **kwargs: Any) -> str:
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise TypeError(f"Chat messages should be dicts, but got {m!r}.")
            chat.append(_with_reasoning_aliases(_plain({k: v for k, v in m.items() if v is not None})))
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                raise ValueError("Tools should be JSON schemas (dicts); Lagoon does not convert callables.")
        for doc in documents or ():
            if not isinstance(doc, Mapping):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        variables = _plain({**self.special_tokens, **kwargs})  # the caller's keywords win
        return self._compiled.render(messages=chat, tools=_plain(list(tools) if tools is not None else None),
                                     documents=_plain(list(documents) if documents is not None else None),
                                     add_generation_prompt=add_generation_prompt, **variables)
