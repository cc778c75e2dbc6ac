"""Turning a model reply into tool calls: native function calls, or fenced bash blocks as a fallback.

A reply with `tool_calls` is used as is. A reply without them must hold exactly one fenced block
marked ``bash`` / ``sh`` / ``shell`` (or unmarked); its body becomes a `bash` call, except a body
of just ``submit`` which becomes the `submit` call. Anything else is a `FormatError` whose message
tells the model what to send.
"""

from __future__ import annotations

import re

from lagoon.protocols import ChatMessage, ToolCall

__all__ = ["parse_actions", "ReplyFormatError", "FORMAT_HELP"]

_FENCE_RE = re.compile(r"```(bash|sh|shell)?[ \t]*\n(.*?)```", re.DOTALL)

FORMAT_HELP = (
    "Reply with one tool call (bash, view, edit, search or submit), or, without function calling, "
    "with exactly one fenced block:\n```bash\n<one command>\n```\nand a block holding just `submit` when done."
)


class ReplyFormatError(ValueError):
    """The reply holds no usable action; the message is shown to the model."""


def parse_actions(message: ChatMessage, step: int) -> tuple[list[ToolCall], str]:
    """The calls a reply asks for and the mode they came in ('tools' or 'text')."""
    if message.tool_calls:
        for call in message.tool_calls:
            if not isinstance(call.arguments, dict):
                raise ReplyFormatError(f"the arguments of tool call {call.name!r} are not a JSON object. {FORMAT_HELP}")
        return list(message.tool_calls), "tools"
    blocks = [body.strip() for _, body in _FENCE_RE.findall(message.content)]
    if len(blocks) != 1:
        found = "no fenced block" if not blocks else f"{len(blocks)} fenced blocks"
        raise ReplyFormatError(f"your reply had no tool call and {found}. {FORMAT_HELP}")
    body = blocks[0]
    if not body:
        raise ReplyFormatError(f"the fenced block is empty. {FORMAT_HELP}")
    if body == "submit":
        return [ToolCall(id=f"text-{step}", name="submit", arguments={})], "text"
    return [ToolCall(id=f"text-{step}", name="bash", arguments={"command": body})], "text"
