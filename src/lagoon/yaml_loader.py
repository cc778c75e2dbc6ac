"""`load_yaml`: YAML as Lagoon reads every user file (configs, overrides, eval task specs).

Safe loading (plain data only) that refuses a mapping with the same key twice. PyYAML keeps the
last value silently, so a config with two `agent:` blocks lost the first one without a word; here
it raises `DuplicateKeyError` (a `yaml.YAMLError`, so callers translate it where they translate
syntax errors) naming the key and both lines. Merge keys (`<<: *base`) may still be overridden.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

__all__ = ["load_yaml", "DuplicateKeyError", "UniqueKeyLoader"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConstructorError):
    """A mapping names one key twice; `key` is the key, the marks say where."""

    def __init__(self, key: Any, first: Any, again: Any) -> None:
        super().__init__(
            "while reading a mapping", first,
            f"duplicate key {key!r} (first at line {first.line + 1}); keep only one", again,
        )
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects duplicate mapping keys."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not None:
                raise DuplicateKeyError(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: loader.construct_mapping(node),
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, refusing duplicate keys (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
