"""LagoonConfig: both seed templates, both spellings, layering, and clean errors on bad input."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from lagoon.config import LagoonConfig, _submodel, describe_key, load_config, parse_override
from lagoon.config.section import Section, field_doc
from lagoon.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_seed_000_is_taken_as_written():
    cfg = load_config(EXAMPLES / "seed-000.yaml")
    md = cfg.model_deployment
    assert md.variant == "laguna_xs2" and md.total_parameters == "33.4B"
    assert md.quantization.profile == "FP8" and md.quantization.dynamic_threshold == 0.75
    assert md.expert_routing.total_experts == 64 and md.expert_routing.active_per_token == 2
    assert md.expert_routing.load_balance_weight == 0.15 and md.expert_routing.temperature == 0.8
    assert md.memory.context_budget == 128000 and md.memory.truncation_strategy == "semantic_importance"
    assert md.evaluation.benchmarks == ["swe_bench_verified", "swe_bench_multilingual", "terminal_bench_2.0"]
    assert md.evaluation.holdout_repos == ["enterprise_internal_alpha", "multilingual_open_source_beta"]
    assert md.inference.speculative_routing is True


def test_seed_001_is_taken_as_written_in_camel_case():
    cfg = load_config(EXAMPLES / "seed-001.yaml")
    assert cfg.context.max_chunk_size == 4096 and cfg.context.staleness_threshold_ms == 300000
    assert cfg.classification.retrieval_keywords == ["fix", "test", "lint", "format", "extract"]
    assert cfg.router.retrieval_bound.model == "deepseek-coder-6.7b"
    assert cfg.router.reasoning_bound.endpoint == "https://api.anthropic.com/v1/messages"
    assert cfg.router.reasoning_bound.max_tokens == 4096
    assert cfg.validation.circuit_breaker_timeout_ms == 60000
    assert cfg.telemetry.metrics_endpoint.endswith("/agent-pipeline")


def test_camel_and_snake_spellings_are_the_same_field():
    a = load_config({"context": {"maxChunkSize": 999}})
    b = load_config({"context": {"max_chunk_size": 999}})
    assert a == b and a.context.max_chunk_size == 999


def test_layers_merge_in_order_across_spellings():
    cfg = load_config(
        EXAMPLES / "seed-001.yaml",
        {"context": {"max_chunk_size": 100}},
        "context.maxChunkSize=200",
        "agent.step_limit=7",
    )
    assert cfg.context.max_chunk_size == 200
    assert cfg.context.staleness_threshold_ms == 300000  # untouched by later layers
    assert cfg.agent.step_limit == 7


def test_unknown_key_names_path_valid_keys_and_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_config({"context": {"maxChunkSzie": 10}})
    msg = str(exc.value)
    assert "context.maxChunkSzie" in msg and "unknown key" in msg
    assert "Did you mean 'maxChunkSize'" in msg and "max_chunk_size" in msg


def test_unknown_section_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'router'"):
        load_config({"routng": {}})


def test_wrong_type_and_out_of_range_name_key_and_fix():
    with pytest.raises(ConfigError) as exc:
        load_config({"model_deployment": {"routing": {"total_experts": "many"}}})
    assert "model_deployment.expert_routing.total_experts" in str(exc.value) and "Fix:" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config({"classification": {"confidenceThreshold": 1.5}})
    assert "classification.confidence_threshold" in str(exc.value) and "range" in str(exc.value)


def test_cross_field_check_k_le_e():
    with pytest.raises(ConfigError, match="active_per_token"):
        load_config({"model_deployment": {"routing": {"total_experts": 4, "active_per_token": 8}}})


def test_literal_secret_is_refused():
    with pytest.raises(ConfigError, match="api_key_env"):
        load_config({"routing": {"reasoningBound": {"apiKey": "sk-live-123"}}})


def test_bad_yaml_and_non_mapping_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("=3")
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}


def _walk(model: type[BaseModel], prefix=""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info, model, name
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from _walk(sub, f"{prefix}{name}.")


def test_every_field_has_a_default_and_a_docstring():
    missing_doc = [k for k, _, model, name in _walk(LagoonConfig) if not field_doc(model, name).strip()]
    required = [k for k, info, _, _ in _walk(LagoonConfig) if info.is_required()]
    assert not missing_doc, f"fields without a docstring: {missing_doc}"
    assert not required, f"fields without a default: {required}"


def test_defaults_validate_and_round_trip():
    cfg = LagoonConfig()
    assert load_config(cfg.dump()) == cfg
    assert load_config(cfg.dump(camel=True)) == cfg


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
known_keys = st.sampled_from(
    ["context", "routing", "model_deployment", "agent", "maxChunkSize", "retrievalBound", "total_experts", "engine"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(known_keys | st.text(max_size=10), yaml_values, max_size=5))
def test_random_mappings_give_config_or_clean_error(data):
    try:
        load_config(data)
    except ConfigError as exc:
        assert str(exc).strip()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_text_gives_config_or_clean_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or ":" in str(exc)


@settings(max_examples=80, deadline=None)
@given(yaml_values)
def test_random_section_values_give_config_or_clean_error(value):
    for section, named in (("context", "context"), ("router", "router"), ("routing", "router"), ("model_deployment", "model_deployment")):
        try:
            load_config({section: value})
        except ConfigError as exc:
            assert named in str(exc) or "top level" in str(exc)


def test_seed_files_are_valid_yaml_with_same_keys_as_seed():
    seed000 = yaml.safe_load((EXAMPLES / "seed-000.yaml").read_text())
    assert set(seed000["model_deployment"]) == {
        "architecture", "variant", "total_parameters", "active_parameters", "quantization",
        "routing", "memory", "evaluation", "inference",
    }
    seed001 = yaml.safe_load((EXAMPLES / "seed-001.yaml").read_text())
    assert set(seed001) == {"context", "classification", "routing", "validation", "telemetry"}


def test_seed_spellings_load_into_the_renamed_keys():
    """`routing` (the task router), `model_deployment.routing` (MoE experts) and
    `model_deployment.inference.tool_state_persistence` (the agent's) got names that say what they
    do; the seed spellings, snake or camel, still load into them."""
    cfg = load_config(EXAMPLES / "seed-000.yaml", EXAMPLES / "seed-001.yaml")
    assert cfg.router.reasoning_bound.max_tokens == 4096 and cfg.model_deployment.expert_routing.temperature == 0.8
    seed = load_config({"routing": {"maxRetries": 5}, "modelDeployment": {"routing": {"totalExperts": 8},
                        "inference": {"toolStatePersistence": False}}})
    new = load_config({"router": {"max_retries": 5}, "model_deployment": {"expert_routing": {"total_experts": 8}},
                       "agent": {"persist_tool_state": False}})
    assert seed == new and seed.router.max_retries == 5 and seed.agent.persist_tool_state is False
    assert load_config("model_deployment.inference.tool_state_persistence=false").agent.persist_tool_state is False
    assert load_config("routing.fallback=false").router.fallback is False
    with pytest.raises(ConfigError, match="disagree; keep agent.persist_tool_state"):
        load_config({"agent": {"persist_tool_state": True},
                     "model_deployment": {"inference": {"tool_state_persistence": False}}})
    assert describe_key("routing.fallback") == describe_key("router.fallback") != ""



def test_unknown_key_named_like_a_validator_step_is_a_clean_error():
    # hypothesis found {'function-': None}: the validator-step filter must not eat a user's key
    with pytest.raises(ConfigError, match="function-"):
        load_config({"function-": None})


class _Base(Section):
    inherited: int = 1
    """From the base:
        indented, cleaned."""


class _Documented(_Base):
    plain: str = "x"
    """A plain docstring."""

    explicit: int = Field(2, description="Given to Field.")
    bare: int = 3
    after_bare: int = 4
    """Belongs to after_bare only."""


def test_field_doc_reads_attribute_docstrings_from_the_source():
    assert field_doc(_Documented, "plain") == "A plain docstring."
    assert field_doc(_Documented, "explicit") == "Given to Field."
    assert field_doc(_Documented, "bare") == ""
    assert field_doc(_Documented, "after_bare") == "Belongs to after_bare only."
    assert field_doc(_Documented, "inherited") == "From the base:\nindented, cleaned."
    assert describe_key("engine.threads") == "torch intra-op threads; None keeps torch's default."
