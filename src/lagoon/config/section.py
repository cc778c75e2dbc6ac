"""`Section`: the base of every config section (strict keys, snake_case and camelCase spellings),
and `field_doc`: a field's attribute docstring, its description.

The docstrings are read from the source when asked for (`lagoon config keys`, `describe_key`), not
by pydantic at class creation (`use_attribute_docstrings` parsed every section's source on every
import: ~50-130 ms of each start, CLI or engine)."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
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
        frozen=False,
    )


def field_doc(model: type[BaseModel], name: str) -> str:
    """The description of `model`'s field `name`: its ``Field(description=...)``, else the string
    literal right after its annotation in the class that declares it ("" when there is none)."""
    info = model.model_fields.get(name)
    if info is not None and info.description:
        return info.description
    for klass in model.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return _attribute_docs(klass).get(name, "")
    return ""


@functools.cache
def _attribute_docs(klass: type) -> dict[str, str]:
    """``name: T = ...`` followed by a string literal in `klass`'s own body → {name: the string}."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen or generated class): no docstrings
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return {stmt.target.id: inspect.cleandoc(doc.value.value) for stmt, doc in zip(body, body[1:], strict=False)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}
