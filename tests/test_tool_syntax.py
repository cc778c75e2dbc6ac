"""Round trips through each family's *real* chat template (tests/fixtures/chat_templates, sources in
its README): an assistant message with tool calls (and reasoning, where the template renders it) goes
through `ChatFormat` and the template as transformers renders it; the text after the generation
prompt, cut where the model's end-of-turn token would stop it, is what the model writes. Lagoon's
parser must read back the same OpenAI calls (name, arguments) and reasoning_content, whole and
streamed in pieces; and the syntax is the one chosen from that template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lagoon.engine.tiny import byte_tokenizer
from lagoon.engine.tokenizer import ChatFormat
from lagoon.tool_calls import (
    ReasoningStream,
    ToolCallDelta,
    ToolCallStream,
    parse_tool_calls,
    split_reasoning,
)
from lagoon.tool_syntax import (
    DEEPSEEK_V3,
    DEEPSEEK_V31,
    GLM45,
    HARMONY,
    HERMES,
    LAGUNA,
    LAGUNA_V8,
    QWEN3_CODER,
    SMOLLM2,
    ToolSyntax,
    syntax_for,
)

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

TOOLS = [
    {"type": "function", "function": {"name": "run_tests", "description": "Run the tests", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "k": {"type": "integer"},
                                         "flags": {"type": "array", "items": {"type": "string"}},
                                         "verbose": {"type": "boolean"}, "note": {"type": "string"}},
        "required": ["path"]}}},
    {"type": "function", "function": {"name": "write_file", "description": "Write a file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}},
]
# a string that looks like a number, code with indentation and a trailing newline, a JSON-ish string
CALLS = [("run_tests", {"path": "tests/test_x.py", "k": 3, "flags": ["-q", "-x"], "verbose": False, "note": "42"}),
         ("write_file", {"path": "src/a.py", "content": "def f():\n    return {'a': 1}\n"})]
REASONING = "The user wants the tests run, then a.py written."


@dataclass(frozen=True)
class Family:
    template: str
    syntax: ToolSyntax
    header: str  # the assistant turn's opening, as the template writes it in history
    ends: tuple[str, ...]  # end-of-turn tokens: generation stops at the first
    thinking: dict | None = None  # template kwargs under which the template renders reasoning
    content: bool = True  # the template renders text next to the calls
    one_call: bool = False  # the template renders one call per assistant message


FAMILIES = [
    Family("smollm2", SMOLLM2, "<|im_start|>assistant\n", ("<|im_end|>",)),
    Family("qwen2_5", HERMES, "<|im_start|>assistant\n", ("<|im_end|>",)),
    Family("qwen3_coder", QWEN3_CODER, "<|im_start|>assistant\n", ("<|im_end|>",)),
    Family("glm4_moe", GLM45, "<|assistant|>", ("<|user|>", "<|observation|>"), thinking={}),
    Family("laguna_xs2", LAGUNA, "<assistant>\n", ("</assistant>",), thinking={"enable_thinking": True}),
    Family("laguna_v8", LAGUNA_V8, "<assistant>", ("</assistant>",), thinking={"enable_thinking": True}),
    Family("gpt_oss", HARMONY, "<|start|>assistant", ("<|call|>", "<|return|>"), thinking={}, content=False,
           one_call=True),
    Family("deepseek_v3_1", DEEPSEEK_V31, "<｜Assistant｜>", ("<｜end▁of▁sentence｜>",)),
    Family("deepseek_r1", DEEPSEEK_V3, "<｜Assistant｜>", ("<｜end▁of▁sentence｜>",), content=False),
]


def _format(family: Family) -> ChatFormat:
    tok = byte_tokenizer()
    tok.chat_template = (FIXTURES / f"{family.template}.jinja").read_text()
    return ChatFormat(tok)


def _turn(family: Family, calls: list, reasoning: bool) -> tuple[str, bool]:
    """What the model writes for the assistant message: the rendered conversation with it, after the
    rendering without it (+ the generation prompt), up to the first end-of-turn token; and whether
    the generation prompt opened `<think>` (the reply then starts inside the reasoning)."""
    fmt = _format(family)
    kw = dict(family.thinking or {}) if reasoning else {}
    assistant = {"role": "assistant", "content": "Let me check." if family.content else None,
                 "tool_calls": [{"id": f"call_{i}", "type": "function",
                                 "function": {"name": n, "arguments": json.dumps(a)}} for i, (n, a) in enumerate(calls)]}
    if reasoning:
        assistant["reasoning_content"] = REASONING
    messages = [{"role": "system", "content": "You are a careful coder."}, {"role": "user", "content": "Run the tests."}]

    def render(msgs: list, gen: bool) -> str:
        prepared, tkw = fmt._prepare(msgs, TOOLS)
        return fmt.tok.apply_chat_template(prepared, tokenize=False, add_generation_prompt=gen, **tkw, **kw)

    before, prompt, full = render(messages, False), render(messages, True), render([*messages, assistant], False)
    assert full.startswith(before)
    turn = full[len(before):]
    gen = prompt[len(before):]
    if turn.startswith(gen):
        turn = turn[len(gen):]  # the generation prompt (it may open <think>) is not the model's
    else:
        assert turn.startswith(family.header), turn[:80]
        turn = turn[len(family.header):]
    stops = [at for at in (turn.find(e) for e in family.ends) if at >= 0]
    return (turn[: min(stops)] if stops else turn), prompt.rstrip().endswith("<think>")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.template)
@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
def test_calls_and_reasoning_round_trip_through_the_real_template(family, reasoning):
    if reasoning and family.thinking is None:
        pytest.skip(f"{family.template}'s template does not render an assistant turn's reasoning")
    calls = CALLS[:1] if family.one_call else CALLS
    turn, _ = _turn(family, calls, reasoning)
    got_reasoning, rest = split_reasoning(turn)
    content, parsed = parse_tool_calls(rest, TOOLS)
    assert [(c.name, dict(c.arguments)) for c in parsed] == calls, turn
    assert got_reasoning == (REASONING if reasoning else None), turn
    assert content == ("Let me check." if family.content else ""), turn
    assert [json.loads(json.dumps(dict(c.arguments))) for c in parsed] == [a for _, a in calls]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.template)
@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
def test_streamed_reply_equals_the_whole_parse(family, reasoning):
    """As the server streams: reasoning split first (`ReasoningStream`), then calls (`ToolCallStream`)."""
    calls = CALLS[:1] if family.one_call else CALLS
    if reasoning and family.thinking is None:
        pytest.skip(f"{family.template}'s template does not render an assistant turn's reasoning")
    turn, opened = _turn(family, calls, reasoning)
    thinking, stream = ReasoningStream(opened=opened), ToolCallStream(tools=TOOLS)
    got: dict = {"reasoning": "", "content": "", "names": [], "args": {}}
    pieces = [turn[i : i + 5] for i in range(0, len(turn), 5)] + [""]
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        for kind, text in thinking.feed(piece, final):
            if kind == "reasoning":
                got["reasoning"] += text
                continue
            for item in stream.feed(text):
                if isinstance(item, ToolCallDelta):
                    got["names"] += [item.name] if item.name else []
                    got["args"][item.index] = got["args"].get(item.index, "") + item.arguments
                else:
                    got["content"] += item
        if final:
            for item in stream.feed("", final=True):
                if isinstance(item, ToolCallDelta):
                    got["names"] += [item.name] if item.name else []
                    got["args"][item.index] = got["args"].get(item.index, "") + item.arguments
                else:
                    got["content"] += item
    assert got["names"] == [n for n, _ in calls]
    assert [json.loads(got["args"][i]) for i in range(len(calls))] == [a for _, a in calls]
    assert got["content"].strip() == ("Let me check." if family.content else "")
    assert got["reasoning"].strip() == (REASONING if reasoning else "")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.template)
def test_the_syntax_is_chosen_from_the_checkpoints_template(family):
    template = (FIXTURES / f"{family.template}.jinja").read_text()
    assert syntax_for(template) is family.syntax
    assert _format(family).tool_syntax is family.syntax


def test_a_template_that_does_not_say_falls_back_to_the_model_type():
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert syntax_for(plain, "laguna") is LAGUNA and syntax_for(plain, "gpt_oss") is HARMONY
    assert syntax_for(plain, "glm4_moe") is GLM45 and syntax_for(plain, "deepseek_v3") is DEEPSEEK_V31
    assert syntax_for(plain, "llama") is HERMES and syntax_for(plain) is HERMES


def test_syntax_tokens_survive_the_engines_decoding():
    """gpt-oss marks its channel tokens special; decoding with special tokens skipped (the engine's)
    must still give the parser the harmony text."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|channel|>", "<|message|>", "<|start|>"]})
    tok.chat_template = (FIXTURES / "gpt_oss.jinja").read_text()
    text = ' to=functions.run_tests<|channel|>commentary json<|message|>{"path": "a.py"}'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) != text  # stripped before ChatFormat sees the family
    ChatFormat(tok)
    assert tok.encode(text, add_special_tokens=False) == ids  # encoding unchanged
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert [(c.name, dict(c.arguments)) for c in parse_tool_calls(decoded)[1]] == [("run_tests", {"path": "a.py"})]
    assert tok.decode(tok.encode("<|im_start|>x", add_special_tokens=False), skip_special_tokens=True) == "x"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.template)
def test_a_history_with_calls_and_results_renders_once_each(family):
    """The next turn's prompt: the earlier call in the family's syntax and its result, each once (a
    template that wraps tool results itself gets them bare, not wrapped twice)."""
    fmt = _format(family)
    name, args = CALLS[0]
    history = [{"role": "user", "content": "Run the tests."},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3 passed"}]
    prompt = fmt.render(history, TOOLS)
    assert prompt.count("3 passed") == 1 and "<tool_response>\n<tool_response>" not in prompt
    turn = prompt[prompt.index("Run the tests.") + len("Run the tests."): prompt.index("3 passed")]
    assert [(c.name, dict(c.arguments)) for c in parse_tool_calls(turn, TOOLS)[1]] == [CALLS[0]], turn


def test_a_template_that_concatenates_the_arguments_gets_them_as_text():
    """DeepSeek-V3's own template (not a fixture here: see the README) writes
    `... + tool['function']['arguments'] + ...`, which needs the OpenAI wire string; the line below
    is that expression, not the whole template."""
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['tool_calls'] %}{% for tool in m['tool_calls'] %}"
                         "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
                         "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + "
                         "'```' + '<｜tool▁call▁end｜><｜tool▁calls▁end｜>'}}{% endfor %}"
                         "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    fmt = ChatFormat(tok)
    assert fmt.tool_syntax is DEEPSEEK_V3 and fmt.arguments_as_text
    name, args = CALLS[1]
    text = fmt.render([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}])
    assert [(c.name, dict(c.arguments)) for c in parse_tool_calls(text)[1]] == [CALLS[1]]


@pytest.mark.parametrize("syntax", [QWEN3_CODER, GLM45, LAGUNA_V8], ids=lambda s: s.name)
def test_a_long_string_argument_streams_in_fragments(syntax):
    """A file body written as XML / GLM text reaches the client while the model writes it, not only
    when the reply ends; the fragments join to the finished call's arguments."""
    body = "".join(f"line {i}: x = {{'k': {i}}}  # </arg_ or </param\n" for i in range(30))
    text = syntax.render([("write_file", {"path": "src/a.py", "content": body})])
    stream, frags = ToolCallStream(tools=TOOLS), []
    for ch in text:
        frags += [d.arguments for d in stream.feed(ch) if isinstance(d, ToolCallDelta) and d.arguments]
    before_end = len(frags)
    frags += [d.arguments for d in stream.feed("", final=True) if isinstance(d, ToolCallDelta) and d.arguments]
    assert before_end > 100  # streamed as written
    assert json.loads("".join(frags)) == {"path": "src/a.py", "content": body}


def test_a_harmony_reply_streams_reasoning_then_content_as_written():
    reply = ("<|channel|>analysis<|message|>" + "think step. " * 20 + "<|end|>"
             "<|start|>assistant<|channel|>final<|message|>" + "It is 4 < 5. " * 10)
    s, got, early = ReasoningStream(), {"reasoning": "", "content": ""}, 0
    for ch in reply:
        for kind, piece in s.feed(ch):
            got[kind] += piece
            early += 1
    for kind, piece in s.feed("", final=True):
        got[kind] += piece
    assert early > 50  # not held until the reply ends
    assert (got["reasoning"].strip(), got["content"]) == split_reasoning(reply)


DEEPSEEK = [f for f in FAMILIES if f.template.startswith("deepseek")]


@pytest.mark.parametrize("family", DEEPSEEK, ids=lambda f: f.template)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepseek_calls_stream_as_written(family, seed):
    """The real template's DeepSeek turn fed in random 1-6 character pieces: each call's name goes out
    as soon as it is complete and its arguments in many fragments while they are written, all before
    the calls' closing tag arrives; the fragments join to the whole parse's arguments (the model's own
    JSON text), the names and content equal it, and the final feed adds nothing."""
    import random

    from lagoon.tool_syntax import DS_CALLS_END

    turn, _ = _turn(family, CALLS, False)
    end = turn.index(DS_CALLS_END)
    rng = random.Random(seed)
    cuts, at = [], 0
    while at < len(turn):
        cuts.append(turn[at : at + rng.randint(1, 6)])
        at += len(cuts[-1])
    stream, names, args, content, fed = ToolCallStream(tools=TOOLS), [], {}, "", 0
    frags_before_end, name_at = 0, {}
    for piece in cuts:
        fed += len(piece)
        for item in stream.feed(piece):
            if isinstance(item, ToolCallDelta):
                if item.name:
                    names.append(item.name)
                    name_at[item.index] = fed
                if item.arguments:
                    args[item.index] = args.get(item.index, "") + item.arguments
                    frags_before_end += fed <= end
            else:
                content += item
    assert [d for d in stream.feed("", final=True) if not isinstance(d, ToolCallDelta) or d.arguments] == []
    content_whole, parsed = parse_tool_calls(turn, TOOLS)
    assert names == [c.name for c in parsed] and content.strip() == content_whole
    assert [json.loads(args[i]) for i in range(len(parsed))] == [dict(c.arguments) for c in parsed]
    assert [args[i] for i in range(len(parsed))] == [json.dumps(a) for _, a in CALLS]  # the text as written
    assert frags_before_end >= 10  # streamed, not one piece at the end
    first_args = turn.index(CALLS[0][1]["path"])
    assert name_at[0] < first_args + len(CALLS[0][1]["path"])  # the name went out before its arguments ended
    assert name_at[1] < turn.index(CALLS[1][1]["path"]) + len(CALLS[1][1]["path"])


@pytest.mark.parametrize("syntax", [DEEPSEEK_V31, DEEPSEEK_V3], ids=lambda s: s.name)
def test_deepseek_odd_calls_stream_like_the_whole_parse(syntax):
    """A call without the list tag, arguments written as a JSON string (sent whole, decoded), a V3.1
    tool named `function`, and a call whose arguments are not an object (skipped, as the parse skips
    it, and the call after it still read)."""
    from lagoon.tool_syntax import DS_CALL_BEGIN, DS_CALL_END, DS_SEP

    body = syntax.render([("run_tests", {"path": "a b", "k": 2})])[len(syntax.open) :]  # no list tag
    text = "ok " + body
    text = text.replace(syntax.close, "")
    as_string = DS_CALL_BEGIN + "write_file" + DS_SEP + json.dumps(json.dumps({"path": "x"})) + DS_CALL_END
    named_function = DS_CALL_BEGIN + "function" + DS_SEP + '{"q": 1}' + DS_CALL_END
    not_object = DS_CALL_BEGIN + "run_tests" + DS_SEP + "[1, 2]" + DS_CALL_END
    for reply in (text, text + as_string, text + named_function + not_object + as_string):
        stream, got, names, content = ToolCallStream(tools=TOOLS), {}, [], ""
        for ch in [*reply, None]:
            for d in stream.feed(ch or "", final=ch is None):
                if isinstance(d, ToolCallDelta):
                    names += [d.name] if d.name else []
                    got[d.index] = got.get(d.index, "") + d.arguments
                else:
                    content += d
        whole, parsed = parse_tool_calls(reply, TOOLS)
        assert names == [c.name for c in parsed] and content.strip() == whole == "ok", reply
        assert [json.loads(got[i]) for i in range(len(parsed))] == [dict(c.arguments) for c in parsed], reply


GPT_OSS = next(f for f in FAMILIES if f.template == "gpt_oss")
ANSWER = "Both ran: a < b holds, and x<y> is `{'k': 1}`.\n"
PREAMBLE = "I'll write a.py now."  # commentary without a recipient: for the user


def _harmony_reply(form: str) -> str:
    """A gpt-oss reply with reasoning. `template`: the real template's assistant turn with a call
    (the recipient before the channel); `native`: as the model writes it (a preamble, the recipient
    after the channel, `<|constrain|>json`, compact JSON); each ends with the `<|call|>` end token. `final`:
    the template's turn with an answer on the final channel, up to `<|return|>`."""
    if form == "template":
        return _turn(GPT_OSS, CALLS[:1], True)[0] + "<|call|>"
    if form == "native":
        name, args = CALLS[1]
        return (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant<|channel|>commentary<|message|>"
                f"{PREAMBLE}<|end|><|start|>assistant<|channel|>commentary "
                f"to=functions.{name} <|constrain|>json<|message|>{json.dumps(args, separators=(',', ':'))}<|call|>")
    fmt = _format(GPT_OSS)
    msgs = [{"role": "user", "content": "Run the tests."}]
    before = fmt.tok.apply_chat_template(fmt._prepare(msgs, TOOLS)[0], tokenize=False, **fmt._prepare(msgs, TOOLS)[1])
    prepared, kw = fmt._prepare([*msgs, {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}], TOOLS)
    full = fmt.tok.apply_chat_template(prepared, tokenize=False, **kw)
    assert full.startswith(before + GPT_OSS.header), full[len(before):]
    return full[len(before + GPT_OSS.header) : full.index("<|return|>")]


@pytest.mark.parametrize("form", ["template", "native", "final"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harmony_reasoning_calls_and_answer_stream_as_written(form, seed):
    """A gpt-oss reply fed as the server feeds it (`ReasoningStream`, then `ToolCallStream`) in
    random 1-6 character pieces: the analysis channel goes out as reasoning while written (never as
    content), the call's name once its header is complete, its arguments in many fragments before
    `<|call|>` arrives (the model's own JSON text), the final channel (and a preamble) as content; each
    joins to the whole reply's parse (`split_reasoning` + `parse_tool_calls`), and the final feed
    adds no arguments."""
    import random

    reply = _harmony_reply(form)
    rng = random.Random(seed)
    cuts, at = [], 0
    while at < len(reply):
        cuts.append(reply[at : at + rng.randint(1, 6)])
        at += len(cuts[-1])
    thinking, stream = ReasoningStream(), ToolCallStream(tools=TOOLS)
    got: dict = {"reasoning": "", "content": "", "names": [], "args": {}}
    seen: dict = {"reasoning": [], "content": [], "args": [], "name": []}  # characters fed when each piece went out
    fed = 0

    def take(items, final=False):
        for item in items:
            if isinstance(item, ToolCallDelta):
                assert not final or not item.arguments  # nothing held back to the end
                if item.name:
                    got["names"].append(item.name)
                    seen["name"].append(fed)
                if item.arguments:
                    got["args"][item.index] = got["args"].get(item.index, "") + item.arguments
                    seen["args"].append(fed)
            elif item:
                got["content"] += item
                seen["content"].append(fed)

    for i, piece in enumerate([*cuts, ""]):
        fed += len(piece)
        final = i == len(cuts)
        for kind, text in thinking.feed(piece, final):
            if kind == "reasoning":
                got["reasoning"] += text
                seen["reasoning"].append(fed)
            else:
                take(stream.feed(text))
        if final:
            take(stream.feed("", final=True), final=True)
    reasoning, rest = split_reasoning(reply)
    content, parsed = parse_tool_calls(rest, TOOLS)
    assert got["reasoning"] == REASONING == reasoning and REASONING not in got["content"]
    assert sum(f <= reply.index(REASONING) + len(REASONING) for f in seen["reasoning"]) >= 5  # while written
    assert got["names"] == [c.name for c in parsed] and got["content"].strip() == content.strip()
    assert [json.loads(got["args"][i]) for i in range(len(parsed))] == [dict(c.arguments) for c in parsed]
    if form == "final":
        assert not parsed and got["content"] == content == ANSWER
        assert sum(f < len(reply) for f in seen["content"]) >= 5
        return
    name, args = CALLS[0] if form == "template" else CALLS[1]
    assert [(c.name, dict(c.arguments)) for c in parsed] == [(name, args)]
    assert got["content"] == content == (PREAMBLE if form == "native" else "")
    written = reply[reply.index("<|message|>{") + len("<|message|>") : reply.index("<|call|>")]
    assert got["args"][0] == written  # the model's own text
    end = reply.index("<|call|>")
    assert sum(f <= end for f in seen["args"]) >= 10  # streamed before the end marker
    assert seen["name"][0] <= reply.index("<|message|>{") + len("<|message|>{") + 6


def test_a_harmony_reply_cut_short_keeps_its_reasoning_out_of_the_content():
    """A reply stopped (max_tokens) inside the analysis channel: all of it is reasoning, streamed or
    whole, none of it (nor the channel tags) content; a `<` in it goes out before the next tag does."""
    reply = "<|channel|>analysis<|message|>if a < b then x<|y> holds"
    s, got, before_end = ReasoningStream(), {"reasoning": "", "content": ""}, ""
    for ch in reply:
        for kind, piece in s.feed(ch):
            got[kind] += piece
    before_end = got["reasoning"]
    for kind, piece in s.feed("", final=True):
        got[kind] += piece
    assert split_reasoning(reply) == ("if a < b then x<|y> holds", "")
    assert got == {"reasoning": "if a < b then x<|y> holds", "content": ""} and before_end == got["reasoning"]


@pytest.mark.parametrize("seed", range(4))
def test_harmony_matches_kept_as_the_text_grows_equal_a_fresh_search(seed):
    """`GrowingMatches` (what `ReasoningStream` reads a streamed harmony reply with, in linear time)
    against a fresh `finditer` after every piece of random harmony-like text: tags whole and cut,
    channels, recipients, JSON, stray `<`; messages ended by each token, calls ended by `<|call|>`,
    by another token, or not at all."""
    import random

    from lagoon.tool_syntax import HARMONY_CALL, HARMONY_MESSAGE, HARMONY_MESSAGE_ENDS, GrowingMatches

    words = ["<|channel|>", "<|message|>", "<|start|>", "assistant", "<|end|>", "<|call|>", "<|return|>",
             "<|constrain|>", "analysis", "final", "commentary", " to=functions.", "run_tests", "json", "{", '"a": 1',
             "}", " ", "\n", "x", "a < b", "<|", "<|en", "|>", "to=", "functions."]
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        growing = [GrowingMatches(HARMONY_MESSAGE, HARMONY_MESSAGE_ENDS),
                   GrowingMatches(HARMONY_CALL, ("<|call|>",), needs="to=functions.")]
        at = 0
        while at < len(text):
            at += rng.randint(1, 8)
            for g in growing:
                assert g.update(text[:at]) == GrowingMatches.spans(g.pattern, text[:at]), (text[:at], g.pattern.pattern[:20])


def test_harmony_commentary_is_content_only_without_a_recipient():
    """A preamble (commentary to no one) is for the user; commentary addressed to a tool (a function,
    or a built-in one such as the browser) is not, whichever side of the channel names it."""
    reply = ("<|channel|>commentary<|message|>Checking.<|end|>"
             "<|start|>assistant to=browser.search<|channel|>commentary json<|message|>{\"q\": 1}<|end|>"
             "<|start|>assistant<|channel|>commentary to=python<|message|>print(1)<|end|>"
             "<|start|>assistant<|channel|>final<|message|>Done.")
    assert split_reasoning(reply) == (None, "Checking.Done.")
