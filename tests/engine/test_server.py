"""The official `openai` client against a live Lagoon server on 127.0.0.1 serving a tiny model."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from lagoon.config import ServerSection
from lagoon.engine import load_model
from lagoon.engine.server import start_test_server
from lagoon.engine.tiny import save_tiny_model

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("srv") / "m", "llama")
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    yield engine, base, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    stop()
    engine.close()


def test_chat_matches_engine_and_reports_usage(live):
    engine, _, client = live
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=engine.name, messages=msgs, max_tokens=12, temperature=0)
    ids = engine.chat_prompt(msgs)
    direct = engine.complete(ids, engine.params(max_new_tokens=12))
    assert r.choices[0].message.content == direct.text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == direct.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_plain(live):
    engine, _, client = live
    msgs = [{"role": "user", "content": "stream please"}]
    plain = client.chat.completions.create(model=engine.name, messages=msgs, max_tokens=10, temperature=0)
    pieces, usage, finish = [], None, None
    for ch in client.chat.completions.create(model=engine.name, messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert finish == plain.choices[0].finish_reason


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _teach(folder, engine, messages, reply: str, steps: int = 150):
    """Overfit the tiny model on one (prompt -> reply) pair so it answers with a real tool call."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = engine.chat_prompt(messages, TOOLS)
    target = engine.encode(reply) + [engine.tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = folder.parent / "taught"
    model.save_pretrained(str(out))
    engine.tokenizer.save_pretrained(str(out))
    return out


def test_tool_call_through_template_plain_and_stream(live, tmp_path):
    engine, _, _ = live
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    from lagoon.engine.tiny import save_tiny_model as save

    taught = _teach(save(tmp_path / "m", "llama"), engine, msgs, "<think>rain?</think>" + CALL)
    base, stop = start_test_server(taught)
    try:
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        name = client.models.list().data[0].id
        r = client.chat.completions.create(model=name, messages=msgs, tools=TOOLS, max_tokens=120, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.model_extra["reasoning_content"] == "rain?"  # <think> is not the answer
        deltas = [c.delta for ch in client.chat.completions.create(
            model=name, messages=msgs, tools=TOOLS, max_tokens=120, temperature=0, stream=True) for c in ch.choices]
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert streamed[0].function.name == "get_weather"
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "rain?"
        # without tools the same prompt template differs, and tool_choice="none" drops them
        r2 = client.chat.completions.create(model=name, messages=msgs, tools=TOOLS, tool_choice="none",
                                            max_tokens=20, temperature=0)
        assert r2.usage.prompt_tokens < r.usage.prompt_tokens
    finally:
        stop()


def test_errors_are_openai_shaped(live):
    engine, base, client = live
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "x"}], temperature=7)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=engine.name, prompt="x" * 600, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"


def test_completions_models_health_metrics(live):
    engine, base, client = live
    r = client.completions.create(model=engine.name, prompt="abc", max_tokens=5, temperature=0)
    assert r.choices[0].text == engine.complete("abc", engine.params(max_new_tokens=5)).text
    assert [m.id for m in client.models.list()] == [engine.name]
    root = base.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
    text = httpx.get(f"{root}/metrics").text
    assert "lagoon_server_requests_total" in text and "lagoon_server_time_to_first_token_seconds" in text


def test_concurrent_streams_and_disconnect(live):
    engine, base, client = live

    def run(i: int) -> str:
        out = []
        for ch in client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": f"n{i}"}],
                                                max_tokens=16, temperature=0, stream=True):
            out += [c.delta.content or "" for c in ch.choices]
        return "".join(out)

    # pieces, not one decode: random bytes are invalid UTF-8, so replacement characters depend on cuts
    expect = ["".join(engine.stream(engine.chat_prompt([{"role": "user", "content": f"n{i}"}]),
                                    engine.params(max_new_tokens=16))) for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(4))) == expect

    # a client that goes away mid-stream: its request is cancelled and the engine drains
    with httpx.stream("POST", f"{base}/chat/completions", json={
        "model": engine.name, "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
        "stream": True, "ignore_eos": True}) as resp:
        next(resp.iter_lines())
    import time

    deadline = time.monotonic() + 10
    while engine.scheduler.load and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.load == 0


def test_bearer_auth(tmp_path, monkeypatch, live):
    engine, _, _ = live
    monkeypatch.setenv("LAGOON_TEST_KEY", "s3cret")
    base, stop = start_test_server(engine, server=ServerSection(api_key_env="LAGOON_TEST_KEY"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == engine.name
    finally:
        stop()


def test_moe_model_serves_expert_load_gauges(tmp_path):
    folder = save_tiny_model(tmp_path / "moe", "qwen3_moe")
    base, stop = start_test_server(folder)
    try:
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        name = client.models.list().data[0].id
        client.completions.create(model=name, prompt="route me", max_tokens=4)
        text = httpx.get(base.removesuffix("/v1") + "/metrics").text
        assert 'lagoon_moe_balancedness{layer="layers.0.mlp"}' in text or "lagoon_moe_balancedness{" in text
    finally:
        stop()


def test_health_says_stopped_once_the_scheduler_stopped(tmp_path):
    engine = load_model(save_tiny_model(tmp_path / "m", "llama"))
    base, stop = start_test_server(engine)
    try:
        root = base.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        engine.scheduler.close()
        r = httpx.get(f"{root}/health")
        assert (r.status_code, r.json()["status"]) == (503, "stopped")
    finally:
        stop()
        engine.close()
