"""Loading and merging config layers (YAML files, `key=value` overrides, mappings), error messages
that name the key and the fix, and key listings for docs and `--help`."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from lagoon.config.lagoon_config import LagoonConfig
from lagoon.config.section import _to_snake, field_doc
from lagoon.errors import ConfigError
from lagoon.yaml_loader import DuplicateKeyError, load_yaml


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _field_for(model: type[BaseModel], key: str) -> str | None:
    """The field name a key spells (snake or camel, or a renamed seed key), or None."""
    if key in model.model_fields:
        return key
    for name, info in model.model_fields.items():
        if info.alias == key:
            return name
    snake = _to_snake(key)
    if snake in model.model_fields:
        return snake
    renamed: dict[str, str] = getattr(model, "renamed", {})
    return renamed.get(snake)


MOVED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("model_deployment", "inference", "tool_state_persistence"): ("agent", "persist_tool_state"),
}
"""Seed keys Lagoon moved to another section (old path → new path); a layer may use either."""


def _move_seed_keys(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """Rewrite the `MOVED` seed paths of one normalized layer to their new place."""
    for old, new in MOVED.items():
        *parents, leaf = old
        node: Any = layer
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        spelled = [k for k in node if _to_snake(str(k)) == leaf] if isinstance(node, dict) else []
        if not spelled:
            continue
        value = node.pop(spelled[0])
        target = layer
        for part in new[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{source}: {'.'.join(new[:-1])} must be a mapping of keys")
        if new[-1] in target and target[new[-1]] != value:
            raise ConfigError(f"{source}: {'.'.join(old)} (seed spelling) and {'.'.join(new)} disagree; keep {'.'.join(new)}")
        target[new[-1]] = value
    return layer


def _normalize(data: Any, model: type[BaseModel], path: tuple[str, ...] = ()) -> Any:
    """Rewrite known keys to field names (so layers in either spelling merge); keep unknown ones."""
    if not isinstance(data, Mapping):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{'.'.join(path) or '<top level>'}: key {key!r} is not a string; "
                "config keys are names such as 'context' or 'maxChunkSize'"
            )
        name = _field_for(model, key)
        if name is None:
            out[key] = value
            continue
        sub = _submodel(model.model_fields[name].annotation)
        out[name] = _normalize(value, sub, (*path, name)) if sub is not None else value
    return out


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: Iterable[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = LagoonConfig
    for part in path:
        if model is None or not isinstance(part, str):
            return None
        name = _field_for(model, part)
        if name is None:
            return model
        model = _submodel(model.model_fields[name].annotation)
    return model


_VALIDATOR_STEP = re.compile(r"function-(before|after|wrap|plain)\[")


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: the key path, what was wrong, and the fix."""
    lines = []
    for err in exc.errors():
        # pydantic names a validator step in loc ("function-after[...]"); a user's key is never one
        loc = [p for p in err["loc"] if not (isinstance(p, str) and _VALIDATOR_STEP.match(p))]
        key = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1]) or LagoonConfig
            bad = str(loc[-1])
            valid = _valid_keys(parent)
            spellings = valid + [parent.model_fields[v].alias or v for v in valid]
            guess = difflib.get_close_matches(bad, spellings, n=1, cutoff=0.6)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            lines.append(
                f"{source}: {key}: unknown key.{hint} Valid keys at {where}: {', '.join(valid)} "
                "(camelCase spellings are accepted too)"
            )
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = err.get("input")
        got_text = "" if isinstance(got, Mapping) else f" (got {got!r})"
        fix = _fix_for(err)
        lines.append(f"{source}: {key}: {msg}{got_text}.{fix}")
    return "\n".join(lines)


def _fix_for(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        return " Fix: set a value within the allowed range."
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return " Fix: use a value of the expected type."
    if kind in {"literal_error", "enum"}:
        expected = ctx.get("expected")
        return f" Fix: use one of {expected}." if expected else " Fix: use one of the listed values."
    return ""


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. agent.step_limit=50)")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {text!r}: the value names key {exc.key!r} twice; keep only one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    node: Any = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r}: empty key segment; write section.key=value")
        node = {part: node}
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file into a mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file; pass an existing YAML file or a key=value override")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 YAML") from exc
    except DuplicateKeyError as exc:  # PyYAML would keep the last one without a word
        raise ConfigError(
            f"{p}: key {exc.key!r} appears twice (lines {exc.context_mark.line + 1} and "
            f"{exc.problem_mark.line + 1}); keep only one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections (e.g. 'context:'), got {type(data).__name__}"
        )
    return data


def load_config(*layers: str | Path | Mapping[str, Any]) -> LagoonConfig:
    """Merge layers in order and validate. A layer is a YAML path, a `key=value` override or a mapping."""
    merged: dict[str, Any] = {}
    for layer in layers:
        source = str(layer) if not isinstance(layer, Mapping) else "<mapping>"
        if isinstance(layer, Mapping):
            data: Any = dict(layer)
        elif isinstance(layer, Path) or not ("=" in str(layer) and not Path(str(layer)).exists()):
            data = read_yaml(layer)
        else:
            data = parse_override(str(layer))
        try:
            normalized = _move_seed_keys(_normalize(data, LagoonConfig), source)
            _deep_merge(merged, normalized)
            LagoonConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        except RecursionError as exc:
            raise ConfigError(f"{source}: nesting too deep for a config") from exc
    return LagoonConfig.model_validate(merged)


def config_keys(model: type[BaseModel] = LagoonConfig, prefix: str = "") -> list[str]:
    """Every leaf key, dotted, in snake_case (used by the docs test)."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        dotted = f"{prefix}{name}"
        if sub is not None:
            keys.extend(config_keys(sub, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def describe_key(dotted: str) -> str:
    """The docstring of a dotted key (snake or camel spelling), as one line."""
    model: type[BaseModel] | None = LagoonConfig
    doc = ""
    for part in dotted.split("."):
        name = _field_for(model, part) if model is not None else None
        if model is None or name is None:
            raise ConfigError(f"{dotted}: unknown key; `lagoon config keys` lists them all")
        doc = field_doc(model, name)
        model = _submodel(model.model_fields[name].annotation)
    return " ".join(doc.split())
