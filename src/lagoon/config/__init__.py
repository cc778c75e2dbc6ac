"""One typed configuration for every part of Lagoon.

`LagoonConfig` has a section per component. It accepts both seed templates as written: seed 000's
``model_deployment`` block (snake_case) and seed 001's ``PipelineConfig`` (camelCase keys such as
``maxChunkSize``). Every key is also accepted in the other spelling, so ``max_chunk_size`` and
``maxChunkSize`` are the same field.

Layers merge in order (``load_config("base.yaml", "agent.step_limit=50")``): a layer is a YAML
file, a ``dotted.key=value`` override (the value parsed as YAML), or a mapping. Unknown keys, wrong
types and out-of-range values raise `lagoon.errors.ConfigError` whose message names the key path,
what was wrong and the fix (for an unknown key, the valid keys at that level and a "did you mean").

Secrets are never part of the config: a route names the *environment variable* that holds its key
(``api_key_env``); a literal ``api_key`` is refused.

This module is *not* where keys take effect; each key's consumer and the test that shows its
effect are listed in ``docs/config.md``.

The package, along its seams:

    section.py        Section: the base (strict keys, both spellings, docstrings as descriptions)
    deployment.py     seed 000's model_deployment block
    pipeline.py       seed 001's PipelineConfig sections (context, classification, routing, ...)
    runtime.py        Lagoon's own sections (moe, engine, server, agent, eval)
    lagoon_config.py  LagoonConfig, one field per section
    loader.py         load_config: layers, merging, error messages; config_keys, describe_key

The names are imported from those modules on first use (PEP 562): the engine needs a few sections
(`runtime`, `deployment`), not the loader (yaml) nor the whole `LagoonConfig`.
"""

import typing

from lagoon.lazy import lazy_names

if typing.TYPE_CHECKING:
    from lagoon.config.deployment import (
        EvaluationSection,
        InferenceSection,
        MemorySection,
        ModelDeploymentSection,
        MoeRoutingSection,
        QuantizationSection,
        QuantProfile,
        TruncationStrategy,
    )
    from lagoon.config.lagoon_config import LagoonConfig
    from lagoon.config.loader import (
        _submodel,
        config_keys,
        describe_key,
        format_validation_error,
        load_config,
        parse_override,
        read_yaml,
    )
    from lagoon.config.pipeline import (
        ClassificationSection,
        ContextSection,
        RouteSection,
        RoutingSection,
        TelemetrySection,
        ValidationSection,
    )
    from lagoon.config.runtime import (
        DEFAULT_STATE_DIR,
        AgentSection,
        EngineSection,
        EvalSection,
        MoeSection,
        OffloadSection,
        ServerSection,
    )
    from lagoon.config.section import Section

_HOME = {
    **dict.fromkeys(('EvaluationSection', 'InferenceSection', 'MemorySection', 'ModelDeploymentSection', 'MoeRoutingSection', 'QuantizationSection', 'QuantProfile', 'TruncationStrategy'), 'deployment'),
    **dict.fromkeys(('LagoonConfig',), 'lagoon_config'),
    **dict.fromkeys(('_submodel', 'config_keys', 'describe_key', 'format_validation_error', 'load_config', 'parse_override', 'read_yaml'), 'loader'),
    **dict.fromkeys(('ClassificationSection', 'ContextSection', 'RouteSection', 'RoutingSection', 'TelemetrySection', 'ValidationSection'), 'pipeline'),
    **dict.fromkeys(('DEFAULT_STATE_DIR', 'AgentSection', 'EngineSection', 'EvalSection', 'MoeSection', 'OffloadSection', 'ServerSection'), 'runtime'),
    **dict.fromkeys(('Section',), 'section'),
}


__getattr__, __dir__ = lazy_names(__name__, _HOME)


__all__ = [
    "LagoonConfig",
    "load_config",
    "parse_override",
    "read_yaml",
    "format_validation_error",
    "config_keys",
    "describe_key",
    "Section",
    "ModelDeploymentSection",
    "QuantizationSection",
    "QuantProfile",
    "MoeRoutingSection",
    "MemorySection",
    "TruncationStrategy",
    "EvaluationSection",
    "InferenceSection",
    "ContextSection",
    "ClassificationSection",
    "RouteSection",
    "RoutingSection",
    "ValidationSection",
    "TelemetrySection",
    "MoeSection",
    "OffloadSection",
    "EngineSection",
    "ServerSection",
    "AgentSection",
    "DEFAULT_STATE_DIR",
    "EvalSection",
    "_submodel",
]
