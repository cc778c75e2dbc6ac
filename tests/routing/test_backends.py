"""Backends through the official SDKs against real loopback servers that fail on purpose."""

import json
import logging

import pytest

from lagoon.config import RouteSection
from lagoon.errors import (
    AuthenticationError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    ContextWindowExceededError,
    MalformedResponseError,
    RateLimitError,
)
from lagoon.protocols import ChatMessage, ToolCall, ToolSpec
from lagoon.routing.backends import build_backend, infer_provider, split_endpoint
from lagoon.routing.backends.anthropic import AnthropicBackend, to_messages_api
from lagoon.routing.backends.openai_compat import OpenAICompatBackend
from lagoon.routing.fault_server import FaultServer
from lagoon.telemetry import GenAI, Telemetry

pytestmark = pytest.mark.network

MSGS = [ChatMessage("system", "be brief"), ChatMessage("user", "fix the failing test")]
TOOL = ToolSpec("bash", "run a command", {"type": "object", "properties": {"cmd": {"type": "string"}}})


@pytest.fixture
def server():
    with FaultServer(window=4096) as s:
        yield s


def oa(server, path="/v1", **kw):
    return OpenAICompatBackend(RouteSection(model="m", endpoint=server.url + path, timeout_s=0.3, **kw))


def an(server, path="/v1/messages", **kw):
    return AnthropicBackend(RouteSection(model="claude", endpoint=server.url + path, timeout_s=0.3, **kw))


@pytest.mark.parametrize(
    "endpoint,provider",
    [
        ("https://api.anthropic.com/v1/messages", "anthropic"),
        ("https://api.anthropic.com", "anthropic"),
        ("http://127.0.0.1:9000/v1/messages", "anthropic"),
        ("https://api.openweight-provider.com/v1/chat", "openai_compat"),
        ("http://localhost:8000/v1", "openai_compat"),
        ("local", "local"),
        ("embedded", "local"),
    ],
)
def test_provider_inferred_from_endpoint(endpoint, provider):
    assert infer_provider(RouteSection(endpoint=endpoint)) == provider
    assert infer_provider(RouteSection(endpoint=endpoint, provider="openai_compat")) == "openai_compat"


def test_endpoint_accepts_base_or_full_chat_url():
    for e in ["http://h:1/v1", "http://h:1/v1/", "http://h:1/v1/chat", "http://h:1/v1/chat/completions"]:
        assert split_endpoint(e, "openai_compat") == "http://h:1/v1"
    for e in ["https://api.anthropic.com/v1/messages", "https://api.anthropic.com/v1", "https://api.anthropic.com"]:
        assert split_endpoint(e, "anthropic") == "https://api.anthropic.com"
    with pytest.raises(ConfigError, match="not an http"):
        split_endpoint("ftp://x", "openai_compat")


@pytest.mark.parametrize("path", ["/v1", "/v1/chat", "/v1/chat/completions"])
def test_openai_compat_answers_with_usage_and_cost(server, path):
    b = oa(server, path, price_input_per_mtok=2.0, price_output_per_mtok=10.0, max_tokens=77, temperature=0.6)
    r = b.chat(MSGS)
    assert r.message.content == "pong" and r.backend == "openai_compat:m"
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    sent = server.requests[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("m", 77, 0.6)  # the route's settings
    b.chat(MSGS, max_tokens=5, temperature=0.0)
    assert (server.requests[-1]["body"]["max_tokens"], server.requests[-1]["body"]["temperature"]) == (5, 0.0)
    assert r.usage.output_tokens == 3
    assert r.usage.cost_usd == pytest.approx((r.usage.input_tokens * 2.0 + 3 * 10.0) / 1e6)


def test_openai_compat_tool_calls_round_trip():
    with FaultServer(tool_call=("bash", {"cmd": "ls"})) as s:
        r = oa(s).chat(MSGS, tools=[TOOL])
        assert r.message.tool_calls == (ToolCall("call_1", "bash", {"cmd": "ls"}),)
        assert r.finish_reason == "tool_calls" and s.requests[-1]["body"]["tools"][0]["function"]["name"] == "bash"


@pytest.mark.parametrize(
    "fault,error",
    [
        ("500", BackendUnavailableError),
        ("503", BackendUnavailableError),
        ("429", RateLimitError),
        ("401", AuthenticationError),
        ("400_context", ContextWindowExceededError),
        ("timeout", BackendTimeoutError),
        ("malformed", MalformedResponseError),
        ("empty", MalformedResponseError),
        ("cut", MalformedResponseError),
    ],
)
@pytest.mark.parametrize("kind", ["openai_compat", "anthropic"])
def test_faults_translate_once_into_lagoon_errors(fault, error, kind):
    with FaultServer([fault], retry_after=0.25, hang_s=1.0) as s:
        backend = oa(s) if kind == "openai_compat" else an(s)
        with pytest.raises(error) as info:
            backend.chat(MSGS)
        assert info.value.__cause__ is None and backend.name in str(info.value)
        if fault == "429":
            assert info.value.retry_after == pytest.approx(0.25)
        assert backend.chat(MSGS).message.content == "pong"  # the next request is fine
        assert len(s.requests) == 2  # SDK retries are off: one request per call


def test_server_errors_are_counted_by_the_genai_span():
    t = Telemetry()
    with FaultServer(["503"]) as s:
        b = OpenAICompatBackend(RouteSection(model="m", endpoint=s.url + "/v1", timeout_s=0.3), telemetry=t)
        with pytest.raises(BackendUnavailableError):
            b.chat(MSGS)
        b.chat(MSGS)
    labels = {"operation": "chat", "model": "m", "provider": "openai_compat"}
    assert t.value("lagoon_model_calls_total", labels) == 2
    assert t.value("lagoon_model_call_errors_total", {**labels, "error": "BackendUnavailableError"}) == 1
    assert t.last_span_attributes[GenAI.USAGE_OUTPUT_TOKENS] == 3


def test_context_window_from_route_or_models_endpoint(server):
    assert oa(server, context_window=2048).context_window == 2048
    assert oa(server).context_window == 4096  # GET /v1/models max_model_len
    assert an(server).context_window == 200_000


def test_an_assumed_context_window_is_logged_and_in_the_route_report(server, caplog):
    import socket

    from lagoon.config import load_config
    from lagoon.routing import build_router

    with socket.socket() as s:  # a port nothing listens on: GET /models is refused
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="lagoon.routing")
    b = OpenAICompatBackend(RouteSection(model="m", endpoint=f"http://127.0.0.1:{dead}/v1", timeout_s=0.3))
    assert b.context_window == 8192
    assert "assumed 8192" in b.window_note and "cannot connect" in b.window_note
    assert "assumed 8192" in caplog.text
    assert oa(server).window_note is None  # the server reported its window: nothing to say

    server.window = None  # a server that answers but reports no window
    cfg = load_config({"routing": {"fallback": False}})
    router = build_router(cfg, backends={"retrieval_bound": oa(server), "reasoning_bound": oa(server)})
    reply = router.chat(MSGS)
    notes = reply.route.to_dict()["notes"]
    assert len(notes) == 1 and "assumed 8192 (the server reported none)" in notes[0], notes


def test_api_key_comes_from_the_named_variable_and_never_leaks(server, monkeypatch, caplog):
    secret = "sk-test-SECRET-0123456789"
    caplog.set_level(logging.DEBUG)
    b = oa(server, api_key_env="LAGOON_TEST_KEY")
    monkeypatch.delenv("LAGOON_TEST_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="LAGOON_TEST_KEY"):
        b.chat(MSGS)
    monkeypatch.setenv("LAGOON_TEST_KEY", secret)
    r = b.chat(MSGS)
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {secret}"
    a = an(server, api_key_env="LAGOON_TEST_KEY")
    ra = a.chat(MSGS)
    sent = server.requests[-1]["headers"]  # the SDK picks x-api-key or a bearer header
    assert secret in (sent.get("x-api-key", ""), sent.get("authorization", "").removeprefix("Bearer "))
    server.faults.extend(["401"])
    with pytest.raises(AuthenticationError) as info:
        b.chat(MSGS)
    for text in [json.dumps(r.to_dict()), json.dumps(ra.to_dict()), repr(b), repr(a), str(info.value), caplog.text]:
        assert secret not in text


def test_anthropic_messages_mapping_and_tool_use():
    history = [
        ChatMessage("system", "sys"),
        ChatMessage("user", "list files"),
        ChatMessage("assistant", "ok", tool_calls=(ToolCall("toolu_0", "bash", {"cmd": "ls"}),)),
        ChatMessage("tool", "a.py", tool_call_id="toolu_0"),
        ChatMessage("tool", "b.py", tool_call_id="toolu_9"),
    ]
    system, turns = to_messages_api(history)
    assert system == "sys" and [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"][1] == {"type": "tool_use", "id": "toolu_0", "name": "bash", "input": {"cmd": "ls"}}
    assert [b["tool_use_id"] for b in turns[2]["content"]] == ["toolu_0", "toolu_9"]
    with FaultServer(tool_call=("bash", {"cmd": "pwd"})) as s:
        r = an(s).chat(history, tools=[TOOL])
        sent = s.requests[-1]["body"]
        assert sent["system"] == "sys" and sent["tools"][0]["input_schema"]["type"] == "object"
        assert (sent["model"], sent["max_tokens"]) == ("claude", 1024) and "temperature" not in sent
        assert r.message.tool_calls == (ToolCall("toolu_1", "bash", {"cmd": "pwd"}),)
        assert r.finish_reason == "tool_calls" and r.message.content == "Calling a tool."
        assert r.usage.output_tokens == 3 and r.backend == "anthropic:claude"


def test_build_backend_registry(server):
    assert isinstance(build_backend(RouteSection(endpoint=server.url + "/v1/chat")), OpenAICompatBackend)
    assert isinstance(build_backend(RouteSection(endpoint=server.url + "/v1/messages")), AnthropicBackend)
    local = build_backend(RouteSection(endpoint="local"))
    assert type(local).__name__ == "LocalBackend"


def test_local_backend_loads_with_the_moe_and_deployment_sections(tmp_path):
    """A local route's engine gets `moe.*` and `model_deployment` as `lagoon serve`'s does: the
    operator's quarantine reaches the experts and the declared architecture is checked."""
    from lagoon.config import load_config
    from lagoon.engine.tiny import save_tiny_model
    from lagoon.errors import CheckpointError
    from lagoon.moe.runtime import runtime_of
    from lagoon.routing import build_router

    folder = save_tiny_model(tmp_path / "moe", "qwen3_moe", num_experts=4, num_experts_per_tok=2)
    route = f"{{model: {folder}, endpoint: local}}"
    cfg = load_config(f"router.retrievalBound={route}", f"router.reasoningBound={route}",
                      "engine.precision=float32", "engine.compile=false", "moe.quarantine=['0:1']")
    router = build_router(cfg)
    engine = router.backends["retrieval_bound"].engine
    try:
        assert {(q["layer"], q["expert"]) for q in runtime_of(engine.model).quarantined()} == {(0, 1)}
        assert router.backends["reasoning_bound"].engine is engine  # one load for both routes
    finally:
        engine.close()
    # a closed engine is not handed out again: the next access loads a live one
    again = router.backends["reasoning_bound"].engine
    try:
        assert again is not engine and again.scheduler.running
        assert router.backends["retrieval_bound"].engine is again
    finally:
        again.close()
    bad = load_config(f"router.retrievalBound={route}", "engine.precision=float32", "engine.compile=false",
                      "model_deployment.architecture=dense")
    with pytest.raises(CheckpointError, match="model_deployment.architecture"):
        _ = build_router(bad).backends["retrieval_bound"].engine
