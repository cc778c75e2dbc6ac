"""`approx_token_count`: the token estimate used where a model has no tokenizer of its own.

Remote backends without a tokenizer endpoint, the router's window check and the retriever's
default budget counter all count this way. It is an estimate — words and punctuation marks, close
to BPE counts for code and English (within ~30%) — never a replacement for a model's own
`count_tokens` where one exists.
"""

from __future__ import annotations

import re

__all__ = ["approx_token_count"]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """Words and punctuation marks in `text`."""
    return len(_TOKEN_RE.findall(text))
