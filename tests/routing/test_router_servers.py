"""The router built from config, over real backends (official SDKs) talking to loopback servers
that inject faults: retries honouring Retry-After, fallbacks, breakers, and no key in any log."""

import json
import logging

import pytest

from lagoon.config import load_config
from lagoon.errors import NoBackendAvailableError
from lagoon.protocols import ChatMessage
from lagoon.routing import BreakerState, build_router
from lagoon.routing.fault_server import FaultServer

pytestmark = pytest.mark.network

FIX = [ChatMessage("user", "fix the failing lint test in utils.py")]
SECRET = "sk-ant-SECRET-abcdef0123456789"


@pytest.fixture
def servers():
    with FaultServer(reply="cheap answer") as cheap, FaultServer(reply="strong answer") as strong:
        yield cheap, strong


def config(cheap, strong, **routing):
    return load_config(
        {
            "routing": {
                "retrieval_bound": {"model": "coder", "endpoint": cheap.url + "/v1/chat", "timeout_s": 0.3,
                                    "context_window": 4096, "price_input_per_mtok": 0.1},
                "reasoning_bound": {"model": "claude", "endpoint": strong.url + "/v1/messages", "timeout_s": 0.3,
                                    "api_key_env": "LAGOON_ROUTER_TEST_KEY", "price_output_per_mtok": 15.0},
                "backoff_base_s": 0.01,
                **routing,
            },
            "validation": {"circuit_breaker_timeout_ms": 60000},
        }
    )


def test_retries_then_answers_through_the_sdk(servers, monkeypatch):
    cheap, strong = servers
    cheap.faults.extend(["503", "429"])
    monkeypatch.setenv("LAGOON_ROUTER_TEST_KEY", SECRET)
    router = build_router(config(cheap, strong))
    r = router.chat(FIX)
    assert r.message.content == "cheap answer" and r.backend == "retrieval_bound" and r.route.to_dict()["retries"] == 2
    assert [a["outcome"] for a in r.route.to_dict()["attempts"]] == ["BackendUnavailableError", "RateLimitError", "ok"]
    assert r.route.to_dict()["attempts"][1]["waited_s"] == pytest.approx(0.01)  # the server's Retry-After
    assert router.telemetry.value("lagoon_model_calls_total", {"operation": "chat", "model": "coder", "provider": "openai_compat"}) == 3
    assert router.telemetry.value("lagoon_routing_backend_cost_usd_total", {"backend": "retrieval_bound"}) > 0


def test_fallback_to_anthropic_and_breaker_opens(servers, monkeypatch, caplog):
    cheap, strong = servers
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LAGOON_ROUTER_TEST_KEY", SECRET)
    cheap.faults.extend(["timeout", "cut", "malformed"])
    router = build_router(config(cheap, strong, max_retries=2, breaker_fail_max=3))
    r = router.chat(FIX)
    assert r.backend == "reasoning_bound" and r.message.content == "strong answer"
    assert r.route.to_dict()["fallbacks"] == [{"from": "retrieval_bound", "to": "reasoning_bound", "reason": "error:MalformedResponseError"}]
    assert router.breakers["retrieval_bound"].state is BreakerState.OPEN
    assert router.telemetry.value("lagoon_routing_breaker_state", {"backend": "retrieval_bound"}) == 2
    r2 = router.chat(FIX)
    assert r2.route.to_dict()["fallbacks"][0]["reason"] == "circuit_open" and len(cheap.requests) == 3
    assert r.usage.cost_usd == pytest.approx(3 * 15.0 / 1e6)
    text = caplog.text + json.dumps(r.to_dict()) + json.dumps(r2.to_dict()) + router.telemetry.prometheus_text().decode()
    assert SECRET not in text


def test_missing_key_falls_back_and_names_the_variable(servers, monkeypatch):
    cheap, strong = servers
    monkeypatch.delenv("LAGOON_ROUTER_TEST_KEY", raising=False)
    router = build_router(config(cheap, strong, fallback=False))
    with pytest.raises(NoBackendAvailableError, match="LAGOON_ROUTER_TEST_KEY"):
        router.chat([ChatMessage("user", "design and architect a new plugin system")])
    assert strong.requests == []


def test_context_window_fallback_with_real_backends(servers, monkeypatch):
    cheap, strong = servers
    monkeypatch.setenv("LAGOON_ROUTER_TEST_KEY", SECRET)
    router = build_router(config(cheap, strong))
    big = [ChatMessage("user", "fix the failing lint test " + "tok " * 4000)]
    r = router.chat(big)
    assert r.backend == "reasoning_bound" and r.route.to_dict()["fallbacks"][0]["reason"] == "context_window"
    assert cheap.requests == []
