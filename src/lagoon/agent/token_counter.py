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

This is *not* a tokenizer and does not estimate: every number comes from `count_tokens`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from lagoon.protocols import ChatMessage

__all__ = ["TokenCounter", "message_key"]


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

    def probe(self, messages: Sequence[ChatMessage]) -> bool:
        """Count `messages` (two or more, small) live; a count other than the sum of the single
        counts marks the counter non-additive for good. Returns `additive`."""
        if self.additive and len(messages) >= 2:
            self.probes += 1
            if int(self.count_tokens(list(messages))) != self.many(messages):
                self.additive = False
        return self.additive
