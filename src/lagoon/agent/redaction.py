"""`Redactor`: keeps secrets out of everything the agent stores or shows.

Secrets come from the environment only (DESIGN rule). A variable is secret when its name looks like
one (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*CREDENTIAL*`, `*AUTH*`). The redactor
(1) removes such variables from the environment the agent's commands inherit, and (2) replaces
any secret value that still shows up in text (a command echoing a key it was given) with
``[REDACTED:NAME]`` before the text reaches the session store, a trajectory or a prompt.

It is *not* a secret scanner: keys that live in files or arrive under innocent names pass through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Redactor", "is_secret_name"]

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter values would redact ordinary words


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


class Redactor:
    """Built from an environment (default `os.environ`); `scrub` and `env_without_secrets` apply it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        pairs = [(k, v) for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN]
        # longest first so a secret that contains another is replaced whole
        self._secrets = sorted(pairs, key=lambda kv: -len(kv[1]))

    def env_without_secrets(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        env = os.environ if environ is None else environ
        return {k: v for k, v in env.items() if not is_secret_name(k)}

    def scrub(self, value: Any) -> Any:
        """`value` with every secret string replaced; recurses into dicts, lists and tuples."""
        if isinstance(value, str):
            for name, secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, f"[REDACTED:{name}]")
            return value
        if isinstance(value, Mapping):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value
