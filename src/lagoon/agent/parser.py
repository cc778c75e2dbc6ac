"""Turning a model reply into tool calls: native function calls, tool calls written as text, or a
fenced bash block as a fallback.

A reply with `tool_calls` is used as is. Otherwise its text is read for tool calls in a model
family's own syntax (`lagoon.tool_calls`: Hermes `<tool_call>{…}</tool_call>` or SmolLM2's
`<tool_call>[{…}]</tool_call>` list), which a server without a tool parser passes through as text.
Failing that, the reply must hold exactly one fenced block marked ``bash`` / ``sh`` / ``shell`` (or
unmarked); its body becomes a `bash` call, except a body of just ``submit`` which becomes the
`submit` call. Fences are read line by line (a fence opens only outside a block), so the closing
fence of a ```python block is never taken for the opening of another. Anything else is a
`ReplyFormatError` whose message tells the model what to send.
"""

from __future__ import annotations

import re
from dataclasses import replace

from lagoon.protocols import ChatMessage, ToolCall
from lagoon.tool_calls import parse_tool_calls

__all__ = ["parse_actions", "fenced_blocks", "ReplyFormatError", "FORMAT_HELP"]

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+-]*)[^\n]*$")
_SHELL = {"", "bash", "sh", "shell", "console", "zsh"}

FORMAT_HELP = "Reply with exactly one tool call (bash, view, edit, search or submit); call submit when done."


class ReplyFormatError(ValueError):
    """The reply holds no usable action; the message is shown to the model."""


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order. A fence line opens a block only outside
    one and closes it only with the same fence characters; an unclosed block runs to the end."""
    blocks: list[tuple[str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        body: list[str] = []
        i += 1
        while i < len(lines) and not _closes(lines[i], fence):
            body.append(lines[i])
            i += 1
        blocks.append((lang, "\n".join(body)))
        i += 1  # past the closing fence
    return blocks


def _closes(line: str, fence: str) -> bool:
    s = line.strip()
    return len(s) >= len(fence) and set(s) == {fence[0]}


def parse_actions(message: ChatMessage, step: int) -> tuple[list[ToolCall], str]:
    """The calls a reply asks for and the mode they came in ('tools' or 'text')."""
    if message.tool_calls:
        for call in message.tool_calls:
            if not isinstance(call.arguments, dict):
                raise ReplyFormatError(f"the arguments of tool call {call.name!r} are not a JSON object. {FORMAT_HELP}")
        return list(message.tool_calls), "tools"
    _, written = parse_tool_calls(message.content)
    if written:  # calls the server left in the text (its tool parser missed the family's syntax)
        return [replace(c, id=f"text-{step}-{i}") for i, c in enumerate(written)], "tools"
    blocks = [body.strip() for lang, body in fenced_blocks(message.content) if lang in _SHELL]
    if len(blocks) != 1:
        found = "no fenced block" if not blocks else f"{len(blocks)} fenced blocks"
        raise ReplyFormatError(f"your reply had no tool call and {found}. {FORMAT_HELP}")
    body = blocks[0]
    if not body:
        raise ReplyFormatError(f"the fenced block is empty. {FORMAT_HELP}")
    if body == "submit":
        return [ToolCall(id=f"text-{step}", name="submit", arguments={})], "text"
    return [ToolCall(id=f"text-{step}", name="bash", arguments={"command": body})], "text"
