"""`TokenCounter`: counts prompts in the model's tokens without re-tokenizing what it has seen.

The model's `count_tokens(messages)` is the only authority on prompt size, and calling it on the
whole prompt every step re-tokenizes everything (the cost grows with the history). This wraps it:

- `one(m)`: one message's count, cached by the message's content (role, text, tool calls), so a
  message is tokenized once however many prompts it appears in (a bounded LRU).
- `many(ms)`: the sum of `one` — an estimate for any counter, exact for an *additive* one.
- `whole(ms)`: the count of the list as the model would count it. When the counter is additive
  (the count of a list is the sum of its messages' counts: word estimates, per-message overheads)
  this is `many`; otherwise the list is counted whole, once (cached by the list's contents).

Additivity is *checked*, not assumed: `probe(a, b)` counts the pair live and compares it with the
two single counts. Memory probes on every render (with the small system and task messages), so a
counter that stops being additive mid-run — a router whose local backend loads its chat template
after the first call — is caught before the next prompt is measured, and from then on every list is
counted whole. A counter that is additive on the probe but not on other content would defeat
this; chat templates and word estimates are not such counters.

- `joined(role, pieces)`: one message whose content is `"\n".join(pieces)`, counted piece by piece
  when the counter is also additive over lines (the count of a joined text is the sum of the pieces'
  and the separators' counts: word estimates), else counted whole. Line additivity is probed on
  whitespace-heavy samples (indented code, blank lines, unicode) once, and on live pieces with
  `probe_text` on every render; one failure turns it off for good.

This is *not* a tokenizer and does not estimate: every number comes from `count_tokens`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from lagoon.protocols import ChatMessage

__all__ = ["TokenCounter", "message_key"]

_SEP = "\n"
# joins that break line additivity for real tokenizers (merged newlines, indentation runs, bytes)
_TEXT_SAMPLES = (
    ("def f(x):\n    return x", "    y = 1"),
    ("--- a.py:1-3\nimport os\n\n", "\nclass A:\n\tpass"),
    ("x", ""), ("", "y"), ("1.", "5 tokens"), ("héllo wörld", "日本語 テキスト"), ("a  ", "  b"),
)


def message_key(m: ChatMessage) -> Hashable:
    """What a message's token count depends on (content strings hash once and keep their hash)."""
    calls = tuple((c.id, c.name, json.dumps(dict(c.arguments), sort_keys=True, default=str)) for c in m.tool_calls)
    return (m.role, m.content, calls, m.tool_call_id, m.name)


class TokenCounter:
    """Cached counts over one `count_tokens`; `additive` turns False for good once a probe disagrees."""

    def __init__(self, count_tokens: Callable[[Sequence[ChatMessage]], int], *, cache_size: int = 8192) -> None:
        self.count_tokens = count_tokens
        self.cache_size = cache_size
        self.additive = True
        self.full_counts = 0  # calls of count_tokens on a whole prompt (benchmarks and tests read these)
        self.probes = 0  # calls of count_tokens on a probe pair
        self.text_additive: bool | None = None  # over lines; None until the samples are probed
        self._one: OrderedDict[Hashable, int] = OrderedDict()
        self._whole: OrderedDict[Hashable, int] = OrderedDict()

    def _remember(self, cache: OrderedDict[Hashable, int], key: Hashable, value: int) -> int:
        cache[key] = value
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return value

    def one(self, m: ChatMessage) -> int:
        key = message_key(m)
        hit = self._one.get(key)
        if hit is not None:
            self._one.move_to_end(key)
            return hit
        return self._remember(self._one, key, int(self.count_tokens([m])))

    def many(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.one(m) for m in messages)

    def whole(self, messages: Sequence[ChatMessage]) -> int:
        """The model's count of `messages` as one prompt."""
        if self.additive:
            return self.many(messages)
        key = tuple(message_key(m) for m in messages)
        hit = self._whole.get(key)
        if hit is not None:
            return hit
        self.full_counts += 1
        return self._remember(self._whole, key, int(self.count_tokens(list(messages))))

    def _line_additive(self, role: str, a: str, b: str) -> bool:
        empty = self.one(ChatMessage(role=role, content=""))
        parts = (self.one(ChatMessage(role=role, content=a)) + self.one(ChatMessage(role=role, content=b))
                 + self.one(ChatMessage(role=role, content=_SEP)) - 2 * empty)
        self.probes += 1
        return int(self.count_tokens([ChatMessage(role=role, content=a + _SEP + b)])) == parts

    def probe_text(self, role: str, pieces: Sequence[str]) -> bool:
        """Check line additivity on the samples (first call) and on `pieces[0]`, `pieces[1]` (small,
        live); returns whether `joined` may count by pieces."""
        if not self.additive:  # lists are counted whole: nothing to gain from line additivity
            return False
        if self.text_additive is None:
            self.text_additive = all(self._line_additive(role, a, b) for a, b in _TEXT_SAMPLES)
        if self.text_additive and len(pieces) >= 2:
            self.text_additive = self._line_additive(role, pieces[0], pieces[1])
        return bool(self.text_additive)

    def joined(self, role: str, pieces: Sequence[str]) -> int:
        """The count of one `role` message whose content is `"\\n".join(pieces)`."""
        if not (self.additive and self.text_additive):
            return self.one(ChatMessage(role=role, content=_SEP.join(pieces)))
        empty = self.one(ChatMessage(role=role, content=""))
        sep = self.one(ChatMessage(role=role, content=_SEP)) - empty
        body = sum(self.one(ChatMessage(role=role, content=p)) for p in pieces) - empty * len(pieces)
        return empty + body + sep * max(len(pieces) - 1, 0)

    def probe(self, messages: Sequence[ChatMessage]) -> bool:
        """Count `messages` (two or more, small) live; a count other than the sum of the single
        counts marks the counter non-additive for good. Returns `additive`."""
        if self.additive and len(messages) >= 2:
            self.probes += 1
            if int(self.count_tokens(list(messages))) != self.many(messages):
                self.additive = False
        return self.additive
