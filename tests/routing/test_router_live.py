"""The router over the real engine: the `local` backend in-process, and `openai_compat` against a
live `lagoon serve` (the engine's test server) on 127.0.0.1, both with a tiny random model."""

import pytest

from lagoon.config import RouteSection, load_config
from lagoon.protocols import ChatMessage
from lagoon.routing import build_router
from lagoon.routing.backends.local import LocalBackend
from lagoon.routing.fault_server import FaultServer

pytest.importorskip("torch")
pytestmark = pytest.mark.network

FIX = [ChatMessage("user", "fix the failing lint test in utils.py")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from lagoon.engine.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_local_backend_generates_with_the_engine(tiny_folder):
    backend = LocalBackend(RouteSection(model=str(tiny_folder), endpoint="local", max_tokens=8, temperature=0.0))
    assert backend.context_window == 4096 and backend.count_tokens(FIX) > 0  # configured; estimated
    assert backend._engine is None  # asking about size does not load the model
    r = backend.chat(FIX)
    assert r.backend == f"local:{tiny_folder}" and r.usage.output_tokens >= 1
    assert r.usage.input_tokens == backend.count_tokens(FIX)  # exact: the engine's own tokenizer
    assert backend.context_window == backend.engine.max_seq_len
    again = backend.chat(FIX)
    assert again.message.content == r.message.content  # greedy is deterministic


def test_router_falls_back_from_a_failing_server_to_the_local_engine(tiny_folder):
    with FaultServer(["503", "503", "503"]) as strong:
        cfg = load_config({
            "routing": {
                "retrieval_bound": {"model": str(tiny_folder), "endpoint": "local", "max_tokens": 8, "temperature": 0.0},
                "reasoning_bound": {"model": "m", "endpoint": strong.url + "/v1", "timeout_s": 0.5},
                "backoff_base_s": 0.01,
            },
            "classification": {"confidence_threshold": 0.0},
        })
        router = build_router(cfg)
        r = router.chat([ChatMessage("user", "design and architect a plugin system")])
        assert r.backend == "retrieval_bound" and r.route.to_dict()["fallbacks"][0]["reason"] == "error:BackendUnavailableError"
        assert r.route.to_dict()["retries"] == 2 and len(strong.requests) == 3


def test_openai_compat_against_live_lagoon_serve(tiny_folder):
    from lagoon.engine.server.app import start_test_server

    base_url, stop = start_test_server(tiny_folder)
    try:
        cfg = load_config({
            "routing": {
                "retrieval_bound": {"model": "llama", "endpoint": base_url + "/chat/completions", "max_tokens": 8,
                                    "temperature": 0.0, "timeout_s": 60},
                "reasoning_bound": {"model": "llama", "endpoint": base_url, "max_tokens": 8, "timeout_s": 60},
            }
        })
        router = build_router(cfg)
        r = router.chat(FIX)
        assert r.backend == "retrieval_bound" and r.route.to_dict()["attempts"][-1]["outcome"] == "ok"
        assert r.usage.input_tokens > 0 and r.usage.output_tokens >= 1
        assert router.backends["retrieval_bound"].context_window > 0
    finally:
        stop()


def test_two_local_routes_share_one_engine(tiny_folder):
    cfg = load_config({"routing": {
        "retrieval_bound": {"model": str(tiny_folder), "endpoint": "local", "max_tokens": 4, "temperature": 0.0},
        "reasoning_bound": {"model": str(tiny_folder), "endpoint": "embedded", "max_tokens": 4, "temperature": 0.0},
    }})
    router = build_router(cfg)
    router.chat(FIX)
    router.chat([ChatMessage("user", "design and architect a plugin system")])
    assert router.backends["retrieval_bound"].engine is router.backends["reasoning_bound"].engine


def test_local_backend_with_tools_always_answers_one_valid_call(tmp_path):
    import jsonschema

    from lagoon.engine.tiny import save_tiny_model
    from lagoon.protocols import ToolSpec

    folder = save_tiny_model(tmp_path / "m", "llama", max_position_embeddings=1024)

    bash = {"type": "object", "properties": {"command": {"type": "string", "pattern": "^[a-z ]{1,12}$"}},
            "required": ["command"], "additionalProperties": False}
    tools = (ToolSpec("bash", "run a command", bash), ToolSpec("submit", "finish", {"type": "object", "properties": {}}))
    backend = LocalBackend(RouteSection(model=str(folder), endpoint="local", max_tokens=60, temperature=1.0))
    for _ in range(4):  # a random model: only the constraint makes these calls
        r = backend.chat(FIX, tools=tools)
        assert r.finish_reason == "tool_calls" and r.message.content == "" and len(r.message.tool_calls) == 1
        call = r.message.tool_calls[0]
        jsonschema.validate(dict(call.arguments), bash if call.name == "bash" else {"type": "object"})
