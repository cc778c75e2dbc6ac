"""Tokenizers and chat templates (through `transformers.AutoTokenizer`), and tool-call parsing.

`load_tokenizer(source)` reads the tokenizer from a HF folder, or from a GGUF file; converting a
GGUF vocabulary is slow (~20 s), so the converted tokenizer is kept in `~/.cache/lagoon/tokenizers`
(keyed by the file's size and mtime, written to a temp folder then renamed) and reused.

`ChatFormat` renders OpenAI-style messages and tools through the checkpoint's own chat template,
and knows the family's tool-call syntax (`ChatFormat.tool_syntax`, see `lagoon.tool_calls`):
SmolLM2's JSON list when the template is SmolLM2's, else Hermes/Qwen `<tool_call>` blocks. When the
template ignores `tools`, the tool list and that syntax are put in the system message instead.
`ChatFormat.encode_with_roles` also says, per token, which message's role it came from (None for
template text such as the generation prompt): the engine turns that into token types for quantized
activations (`lagoon.quant.policy`). `parse_tool_calls` (re-exported from `tool_calls`) reads
calls back. This module is *not* a tokenizer implementation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from lagoon.errors import CheckpointError
from lagoon.tool_calls import HARMONY, HERMES, QWEN3_CODER, SMOLLM2, ToolSyntax, parse_tool_calls

__all__ = ["load_tokenizer", "ChatFormat", "parse_tool_calls"]


def _cache_root() -> Path:
    return Path(os.environ.get("LAGOON_CACHE", Path.home() / ".cache" / "lagoon")) / "tokenizers"


def load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = Path(source)
    try:
        if p.is_dir():
            return AutoTokenizer.from_pretrained(str(p))
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = _cache_root() / key
        if (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        tmp: Path | None = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent))
            tok.save_pretrained(str(tmp))
            os.replace(tmp, cached)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # a cache miss next time, nothing worse
        return tok
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {source} ({exc}); the checkpoint needs one") from exc


_TOOL_SYSTEM = {
    "hermes": (
        "You may call one or more functions to assist with the user query. The functions are:\n<tools>\n{tools}\n"
        "</tools>\nTo call a function, reply with a JSON object inside <tool_call></tool_call> tags:\n"
        '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
    ),
    # SmolLM2-Instruct's own tool-calling prompt (from its model card), which it was trained on
    "smollm2": (
        "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n\n"
        "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
        "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
        "The example format is as follows. Please make sure the parameter type is correct.\n"
        '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
        "... (more tool calls as required)\n]</tool_call>"
    ),
}


def tool_syntax_for(template: str) -> ToolSyntax:
    """The tool-call syntax a chat template's model family was trained on: Qwen3-Coder's template
    writes `<function=…>` XML, gpt-oss's harmony `<|channel|>`s, SmolLM2's names itself."""
    if "<function=" in template and "<parameter=" in template:
        return QWEN3_CODER
    if "<|channel|>" in template:
        return HARMONY
    return SMOLLM2 if "SmolLM" in template else HERMES


class ChatFormat:
    """Messages (OpenAI dicts) + tools → prompt token ids, through the checkpoint's template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        if not template:
            raise CheckpointError("the tokenizer has no chat template; use /v1/completions or `lagoon generate` without --chat")
        self.template_takes_tools = "tools" in template
        self.tool_syntax = tool_syntax_for(template)

    def _prepare(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages as the template gets them (tools folded into the system message when the
        template ignores `tools`) and the template's keyword arguments."""
        msgs = [_plain(m, self.tool_syntax) for m in messages]
        kw: dict[str, Any] = {}
        if tools:
            if self.template_takes_tools:
                kw["tools"] = list(tools)
            else:
                spec = "\n".join(json.dumps(t.get("function", t)) for t in tools)
                note = _TOOL_SYSTEM.get(self.tool_syntax.name, _TOOL_SYSTEM["hermes"]).format(tools=spec)
                if msgs and msgs[0]["role"] == "system":
                    msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{note}"}
                else:
                    msgs.insert(0, {"role": "system", "content": note})
        return msgs, kw

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        msgs, kw = self._prepare(messages, tools)
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return list(self.tok.encode(self.render(messages, tools), add_special_tokens=False))

    def render_spans(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[str, list[tuple[int, int, str]]]:
        """The rendered prompt and, per rendered message, its character span ``(start, end, role)``.

        A message's span is what rendering it adds to the rendering of the messages before it
        (role header included). Where the template is not prefix-stable (it rewrites earlier turns),
        the span falls back to where the message's content occurs in the text, searched in order."""
        msgs, kw = self._prepare(messages, tools)
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        spans: list[tuple[int, int, str]] = []
        prev = 0
        for i, m in enumerate(msgs):
            try:
                part = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False, add_generation_prompt=False, **kw)
            except (TemplateError, ValueError):  # a template that refuses a partial conversation
                part = None
            if part is not None and text.startswith(part) and len(part) >= prev:
                spans.append((prev, len(part), m["role"]))
                prev = len(part)
                continue
            at = text.find(m["content"], prev) if m["content"] else -1
            if at >= 0:
                spans.append((at, at + len(m["content"]), m["role"]))
                prev = at + len(m["content"])
        return text, spans

    def encode_with_roles(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, suffix: str = ""
    ) -> tuple[list[int], list[str | None]]:
        """Prompt ids (the rendered chat + `suffix`) and, per token, the role of the message it came
        from (None for text outside every message: the generation prompt, `suffix`). A token that
        straddles two spans takes the role where it starts."""
        text, spans = self.render_spans(messages, tools)
        text += suffix
        try:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [int(o[0]) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, KeyError, TypeError):  # a slow tokenizer: no offsets
            ids = list(self.tok.encode(text, add_special_tokens=False))
            offsets = [len(self.tok.decode(ids[:i])) for i in range(len(ids))]
        roles: list[str | None] = []
        j = 0
        for start in offsets:
            while j < len(spans) and spans[j][1] <= start:
                j += 1
            roles.append(spans[j][2] if j < len(spans) and spans[j][0] <= start else None)
        return ids, roles


def _plain(m: Mapping[str, Any], syntax: ToolSyntax) -> dict[str, Any]:
    """Content parts → text; assistant tool calls → the text the model would write (its `syntax`)."""
    content = m.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    out: dict[str, Any] = {"role": m["role"], "content": content}
    calls = m.get("tool_calls") or []
    if calls:
        pairs = []
        for c in calls:
            fn = c.get("function", c)
            args = fn.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) and args else args
            pairs.append((fn.get("name"), args))
        out["content"] = (content + "\n" if content else "") + syntax.render(pairs)
    if m["role"] == "tool":
        out["content"] = f"<tool_response>\n{content}\n</tool_response>"
    return out
