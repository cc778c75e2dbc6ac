"""The real serving path with a family's own chat template and syntax tokens: a tiny random model
whose tokenizer carries Laguna's template (v8) with `<think>`, `<tool_call>`, `<assistant>` as
*special* tokens (as Laguna's tokenizer marks them). Over HTTP with the `openai` client: a forced
call is written in Laguna's `<arg_key>` syntax, survives decoding (special tokens skipped) and
comes back as an OpenAI tool call; a history with tool calls, reasoning and a tool result goes
through the template natively. With DeepSeek-V3.1's template a streamed forced call's arguments
arrive while the model writes them; with gpt-oss's (harmony) so do its reasoning, call and answer."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from lagoon.engine import load_model
from lagoon.engine.server import start_test_server
from lagoon.engine.tiny import byte_tokenizer, save_tiny_model
from lagoon.tool_syntax import LAGUNA_V8

pytestmark = pytest.mark.network

TEMPLATE = Path(__file__).parents[1] / "fixtures" / "chat_templates" / "laguna_v8.jinja"
EDIT = {"type": "object", "required": ["path", "line"],
        "properties": {"path": {"type": "string", "maxLength": 5}, "line": {"type": "integer", "minimum": 1, "maximum": 9}}}
TOOLS = [{"type": "function", "function": {"name": "edit", "parameters": EDIT}},
         {"type": "function", "function": {"name": "submit", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("lg") / "m", "llama", max_position_embeddings=1024)
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<think>", "</think>", "<tool_call>",
                                                          "</tool_call>", "<assistant>"]})
    tok.chat_template = TEMPLATE.read_text()
    tok.save_pretrained(str(folder))
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    yield engine, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    stop()
    engine.close()


def test_a_forced_call_in_lagunas_syntax_comes_back_as_an_openai_call(live):
    engine, client = live
    assert engine.chat_format.tool_syntax is LAGUNA_V8
    history = [
        {"role": "user", "content": "fix a.py"},
        {"role": "assistant", "content": "", "reasoning_content": "look first",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "edit", "arguments": '{"path": "a.py", "line": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    prompt = engine.tokenizer.decode(engine.chat_prompt_typed(history, TOOLS)[0])
    assert "<tool_call>edit<arg_key>path</arg_key><arg_value>a.py</arg_value>" in prompt  # rendered natively
    assert "<tool_response>ok</tool_response>" in prompt
    for seed in range(2):
        r = client.chat.completions.create(
            model=engine.name, messages=history, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "edit"}})
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and not msg.content
        assert [c.function.name for c in msg.tool_calls] == ["edit"]
        jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), {**EDIT, "additionalProperties": False})


def test_chat_template_kwargs_reach_the_template_and_its_opened_reasoning_is_reasoning(live):
    """`enable_thinking` opens `<think>` in Laguna's generation prompt: the reply (it never closes
    it here) is reasoning_content, streamed or not."""
    engine, client = live
    msgs = [{"role": "user", "content": "hi"}]
    on = engine.tokenizer.decode(engine.chat_format.encode(msgs, template_kwargs={"enable_thinking": True}))
    assert on.endswith("<assistant><think>") and engine.tokenizer.decode(engine.chat_format.encode(msgs)).endswith("</think>")
    kw = dict(model=engine.name, messages=msgs, max_tokens=12, temperature=1.0, seed=5,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    whole = client.chat.completions.create(**kw).choices[0].message
    streamed = {"reasoning_content": "", "content": ""}
    for ev in client.chat.completions.create(stream=True, **kw):
        for key in streamed:
            streamed[key] += (getattr(ev.choices[0].delta, key, None) or "") if ev.choices else ""
    reasoning = getattr(whole, "reasoning_content", None)
    assert reasoning and not whole.content
    assert streamed["reasoning_content"].strip() == reasoning and not streamed["content"]
    with pytest.raises(openai.BadRequestError, match="may not set tools"):
        client.chat.completions.create(model=engine.name, messages=msgs, extra_body={"chat_template_kwargs": {"tools": []}})


def test_a_forced_deepseek_call_streams_its_arguments_while_written(tmp_path):
    """DeepSeek-V3.1's template over HTTP: a forced call streamed with `stream=True` sends its name,
    then its arguments in many fragments (not one at the end) that join to the non-streamed reply's
    arguments, the same seed writing the same call."""
    from lagoon.tool_syntax import DEEPSEEK_V31

    folder = save_tiny_model(tmp_path / "m", "llama", max_position_embeddings=1024)
    tok = byte_tokenizer()
    tok.chat_template = (TEMPLATE.parent / "deepseek_v3_1.jinja").read_text()
    tok.save_pretrained(str(folder))
    note = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 20, "maxLength": 30}}}
    tools = [{"type": "function", "function": {"name": "note", "parameters": note}}]
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    try:
        assert engine.chat_format.tool_syntax is DEEPSEEK_V31
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        kw = dict(model=engine.name, messages=[{"role": "user", "content": "note it"}], tools=tools, max_tokens=400,
                  temperature=1.0, seed=3, tool_choice={"type": "function", "function": {"name": "note"}})
        whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
        names, frags = [], []
        for ev in client.chat.completions.create(stream=True, **kw):
            for c in (ev.choices[0].delta.tool_calls or []) if ev.choices else []:
                names += [c.function.name] if c.function.name else []
                frags += [c.function.arguments] if c.function.arguments else []
    finally:
        stop()
        engine.close()
    assert [c.function.name for c in whole] == names == ["note"]
    assert len(frags) >= 10  # written token by token, not sent whole at the end
    assert json.loads("".join(frags)) == json.loads(whole[0].function.arguments)
    jsonschema.validate(json.loads("".join(frags)), note)


def test_a_gpt_oss_reply_streams_reasoning_calls_and_answer_while_written(tmp_path):
    """gpt-oss's template over HTTP: a forced call (the template's header order), and replies held by
    a regex to what gpt-oss itself writes (analysis, then a preamble and a call on the commentary
    channel, or an answer on the final channel). Streamed, the reasoning arrives as `reasoning_content` in many
    pieces (never as content), the call's name once, its arguments in many fragments, the answer in
    many content pieces (the preamble is content too); each joins to the non-streamed reply's, the same seed writing the same text."""
    from lagoon.tool_syntax import HARMONY

    folder = save_tiny_model(tmp_path / "m", "llama", max_position_embeddings=1024)
    tok = byte_tokenizer()
    tok.chat_template = (TEMPLATE.parent / "gpt_oss.jinja").read_text()
    tok.save_pretrained(str(folder))
    note = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 20, "maxLength": 30}}}
    tools = [{"type": "function", "function": {"name": "note", "description": "Take a note", "parameters": note}}]
    analysis = r"<\|channel\|>analysis<\|message\|>[a-z ]{12,16}<\|end\|><\|start\|>assistant"
    preamble = r"<\|channel\|>commentary<\|message\|>[a-z]{5,8}<\|end\|><\|start\|>assistant"
    native_call = analysis + preamble + r'<\|channel\|>commentary to=functions\.note <\|constrain\|>json<\|message\|>\{"text": "[a-z ]{20,30}"\}'
    final = analysis + r"<\|channel\|>final<\|message\|>[a-z ]{12,16}"
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    got = []
    try:
        assert engine.chat_format.tool_syntax is HARMONY
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        base_kw = dict(model=engine.name, messages=[{"role": "user", "content": "note it"}], tools=tools, max_tokens=300,
                       temperature=1.0, seed=3)
        for extra in ({"tool_choice": {"type": "function", "function": {"name": "note"}}},
                      {"extra_body": {"guided_regex": native_call}}, {"extra_body": {"guided_regex": final}}):
            kw = {**base_kw, **extra}
            whole = client.chat.completions.create(**kw).choices[0].message
            streamed = {"reasoning_content": [], "content": [], "names": [], "args": []}
            for ev in client.chat.completions.create(stream=True, **kw):
                delta = ev.choices[0].delta if ev.choices else None
                for key in ("reasoning_content", "content"):
                    streamed[key] += [getattr(delta, key, None)] if getattr(delta, key, None) else []
                for c in (delta.tool_calls or []) if delta is not None else []:
                    streamed["names"] += [c.function.name] if c.function.name else []
                    streamed["args"] += [c.function.arguments] if c.function.arguments else []
            got.append((whole, streamed))
    finally:
        stop()
        engine.close()
    for whole, streamed in got:
        calls = whole.tool_calls or []
        assert [c.function.name for c in calls] == streamed["names"]
        assert "".join(streamed["content"]).strip() == (whole.content or "")
        assert "".join(streamed["reasoning_content"]).strip() == (getattr(whole, "reasoning_content", None) or "")
        if calls:
            assert len(streamed["args"]) >= 10  # written token by token, not sent whole at the end
            assert json.loads("".join(streamed["args"])) == json.loads(calls[0].function.arguments)
            jsonschema.validate(json.loads("".join(streamed["args"])), note)
    (forced, f_stream), (native, n_stream), (answer, a_stream) = got
    assert forced.tool_calls and native.tool_calls and not answer.tool_calls
    assert not getattr(forced, "reasoning_content", None) and not forced.content
    for msg, stream in ((native, n_stream), (answer, a_stream)):
        assert 12 <= len(msg.reasoning_content) <= 16 and len(stream["reasoning_content"]) >= 10
        assert "analysis" not in "".join(stream["content"]) and "<|" not in (msg.content or "")
    assert 5 <= len(native.content) <= 8 and 12 <= len(answer.content) <= 16 and len(a_stream["content"]) >= 10


def test_a_request_the_template_cannot_render_is_a_400_naming_the_template(tmp_path):
    """gpt-oss's real template reads every tool's `description`; a tool without one (many clients
    leave it out) is the request's fault: 400 with the template's complaint, and the server goes on."""
    folder = save_tiny_model(tmp_path / "m", "llama", max_position_embeddings=1024)
    tok = byte_tokenizer()
    tok.chat_template = (TEMPLATE.parent / "gpt_oss.jinja").read_text()
    tok.save_pretrained(str(folder))
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    try:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        bare = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {}}}}]
        with pytest.raises(openai.BadRequestError, match="chat template cannot render.*description"):
            client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                           tools=bare, max_tokens=2)
        described = [{"type": "function", "function": {**bare[0]["function"], "description": "Take a note"}}]
        r = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                           tools=described, max_tokens=2)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    finally:
        stop()
        engine.close()
