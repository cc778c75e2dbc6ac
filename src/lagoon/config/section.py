"""`Section`: the base of every config section (strict keys, snake_case and camelCase spellings,
attribute docstrings as field descriptions)."""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")


def _to_snake(name: str) -> str:
    return _CAMEL_RE.sub("_", name).lower()


class Section(BaseModel):
    """Base of every config section: strict keys, both spellings, docstrings as descriptions.

    `renamed` maps a seed key that Lagoon renamed (snake_case) to the field that replaced it; the
    loader accepts the seed key as an alias (in either spelling)."""

    renamed: ClassVar[dict[str, str]] = {}

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
    )
