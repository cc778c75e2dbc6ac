"""Tokenizers and chat templates, and tool-call parsing.

`load_tokenizer(source)` reads the tokenizer from a HF folder (`transformers.AutoTokenizer`), or
from a GGUF file; converting a GGUF vocabulary is slow (~20 s), so the converted tokenizer is kept
in `cache_root()/tokenizers` (keyed by the file's size and mtime, written to a temp folder then
renamed) with a `lagoon.engine.fast_tokenizer` record of it, which later loads read without
importing transformers (a record that cannot be read is logged, deleted and written again).

`ChatFormat` renders OpenAI-style messages and tools through the checkpoint's own chat template,
and knows the family's tool-call syntax (`ChatFormat.tool_syntax`, read from the template by
`lagoon.tool_syntax.syntax_for`). A template that renders `tool_calls` gets the calls (and the
reasoning) as fields and writes them itself; for one that does not (SmolLM2's) each call is written
in the family's syntax as content, and when the template ignores `tools` the tool list and that
syntax go in the system message. The family's syntax tokens are made ordinary added tokens, so the
engine's decoding (special tokens skipped) keeps them for the parser.
`ChatFormat.encode_with_roles` also says, per token, which message's role it came from (None for
template text such as the generation prompt): the engine turns that into token types for quantized
activations (`lagoon.quant.policy`). `parse_tool_calls` (re-exported from `tool_calls`) reads
calls back. This module is *not* a tokenizer implementation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lagoon.cache_dir import cache_root
from lagoon.engine.fast_tokenizer import RECORD, read_record, write_record
from lagoon.errors import BadRequestError, CheckpointError
from lagoon.tool_calls import parse_tool_calls
from lagoon.tool_syntax import HARMONY, ToolSyntax, syntax_for

__all__ = ["load_tokenizer", "ChatFormat", "parse_tool_calls"]

log = logging.getLogger("lagoon.engine")


def _cache_root() -> Path:
    return cache_root() / "tokenizers"


def gguf_tokenizer_folder(path: Path) -> Path:
    """Where the tokenizer converted from the GGUF file `path` is cached (whether or not it is)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root() / key


def load_tokenizer(source: str | Path) -> Any:
    """A HF folder's tokenizer (transformers'), or a GGUF file's: converted once by transformers,
    then read from the cache as a `FastTokenizer` (no transformers import on a warm start)."""
    p = Path(source)
    try:
        if p.is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p))
        cached = gguf_tokenizer_folder(p)
        if (cached / "tokenizer_config.json").is_file():
            return _cached_tokenizer(cached)
        tok = _gguf_tokenizer(p)
        tmp: Path | None = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent))
            tok.save_pretrained(str(tmp))
            os.replace(tmp, cached)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # a cache miss next time, nothing worse
            return tok
        return _cached_tokenizer(cached)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {source} ({exc}); the checkpoint needs one") from exc


def _cached_tokenizer(folder: Path) -> Any:
    """A converted GGUF tokenizer from the cache: its `FastTokenizer` record, written on first use
    from what transformers loads from the folder (so both paths behave the same)."""
    try:
        fast = read_record(folder)
    except Exception as exc:  # noqa: BLE001 - any defect of the record means "rebuild it"; said here
        log.warning("tokenizer record in %s is unusable (%s: %s); rebuilding it", folder, type(exc).__name__, exc)
        (folder / RECORD).unlink(missing_ok=True)
        fast = None
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    try:
        if write_record(tok, folder):
            return read_record(folder) or tok
    except OSError as exc:  # a read-only cache: transformers' tokenizer serves, at its load cost
        log.warning("could not write the tokenizer record in %s (%s)", folder, exc)
    return tok


def _gguf_tokenizer(p: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (ValueError, TypeError):
        # AutoTokenizer first reads the *model* config, which transformers 5.24 cannot for deepseek2,
        # glm4moe, olmoe or laguna (ValueError) nor for a gpt-oss file with YaRN keys (TypeError); the
        # tokenizer needs none of it: its vocabulary, merges and template are tokenizer.* keys
        tok = PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
    _keep_added_tokens(tok, p)
    return tok


def _keep_added_tokens(tok: Any, p: Path) -> None:
    """Put a byte-level GGUF's control and user-defined tokens spelled outside the byte alphabet
    (Laguna's ``〈|EOS|〉``, its eos and the first text of its template) back at their own ids, whole.
    transformers respells the vocabulary into that alphabet and skips such a token; its eos (or the
    template's text) then becomes a *new* token past the model's vocabulary, an index the embedding
    does not have."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from lagoon.engine.checkpoint import open_gguf

    fields = open_gguf(p).fields
    model, types = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.token_type")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or model is None or types is None or model.contents() != "gpt2":
        return
    alphabet = set(bytes_to_unicode().values())
    odd = {i: (t, kind) for i, (t, kind) in enumerate(zip(fields["tokenizer.ggml.tokens"].contents(), types.contents(), strict=True))
           if kind in (3, 4) and not set(t) <= alphabet}  # 3 CONTROL, 4 USER_DEFINED
    if not odd:
        return
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    spelled = {i: k for k, i in vocab.items() if i in odd}
    for i, (text, _) in odd.items():
        vocab.pop(spelled.get(i, text), None)
        vocab[text] = i
    texts = {text for text, _ in odd.values()}
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in texts] + [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": kind == 3} for i, (text, kind) in sorted(odd.items())]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))


_TOOL_SYSTEM = {
    "hermes": (
        "You may call one or more functions to assist with the user query. The functions are:\n<tools>\n{tools}\n"
        "</tools>\nTo call a function, reply with a JSON object inside <tool_call></tool_call> tags:\n"
        '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
    ),
    # SmolLM2-Instruct's own tool-calling prompt (from its model card), which it was trained on
    "smollm2": (
        "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n\n"
        "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
        "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
        "The example format is as follows. Please make sure the parameter type is correct.\n"
        '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
        "... (more tool calls as required)\n]</tool_call>"
    ),
}


def tool_syntax_for(template: str, model_type: str | None = None) -> ToolSyntax:
    """The tool-call syntax a chat template's model family was trained on (`lagoon.tool_syntax.syntax_for`)."""
    return syntax_for(template, model_type)


def keep_syntax_tokens(tokenizer: Any, tokens: Sequence[str]) -> None:
    """Make the family's syntax tokens (`<|channel|>`, `<tool_call>`, `<think>`, …) ordinary added
    tokens, so decoding with `skip_special_tokens=True` (the engine's) keeps them in the reply's text:
    gpt-oss and Laguna mark them special, and a parser cannot read a call whose tags were dropped.
    Encoding is unchanged (added tokens split the text either way)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    spec = json.loads(backend.to_str())
    hidden = [t for t in spec.get("added_tokens", []) if t.get("special") and t.get("content") in tokens]
    if not hidden:
        return
    for t in hidden:
        t["special"] = False
    from tokenizers import Tokenizer

    # transformers' fast tokenizers keep their `tokenizers` backend here (`backend_tokenizer` reads it)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))


class ChatFormat:
    """Messages (OpenAI dicts) + tools → prompt token ids, through the checkpoint's template."""

    def __init__(self, tokenizer: Any, model_type: str | None = None) -> None:
        self.tok = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        if not template:
            raise CheckpointError("the tokenizer has no chat template; use /v1/completions or `lagoon generate` without --chat")
        self.template_takes_tools = "tools" in template
        # a template that renders `tool_calls` (and reasoning) itself gets them as OpenAI fields; one
        # that does not (SmolLM2's) gets each call pre-written in the family's syntax as content
        self.template_takes_calls = "tool_calls" in template
        # DeepSeek-V3's own template concatenates the arguments as the OpenAI wire string; the others
        # iterate or `tojson` a mapping
        self.arguments_as_text = re.search(r"(\['arguments'\]|\.arguments)\s*\+", template) is not None
        self.tool_syntax = tool_syntax_for(template, model_type)
        keep_syntax_tokens(tokenizer, self.tool_syntax.tokens)

    def _prepare(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages as the template gets them (tools folded into the system message when the
        template ignores `tools`) and the template's keyword arguments (`template_kwargs`, e.g.
        `enable_thinking`, are passed on: a request's `chat_template_kwargs`)."""
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template"} & set(template_kwargs or {})
        if reserved:
            raise BadRequestError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}; use the request's own fields")
        msgs = [out for m in messages
                for out in _for_template(m, self.tool_syntax, self.template_takes_calls, self.arguments_as_text)]
        kw: dict[str, Any] = dict(template_kwargs or {})
        if tools:
            if self.template_takes_tools:
                kw["tools"] = list(tools)
            else:
                spec = "\n".join(json.dumps(t.get("function", t)) for t in tools)
                note = _TOOL_SYSTEM.get(self.tool_syntax.name, _TOOL_SYSTEM["hermes"]).format(tools=spec)
                if msgs and msgs[0]["role"] == "system":
                    msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{note}"}
                else:
                    msgs.insert(0, {"role": "system", "content": note})
        return msgs, kw

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        msgs, kw = self._prepare(messages, tools, template_kwargs)
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        return list(self.tok.encode(self.render(messages, tools, template_kwargs), add_special_tokens=False))

    def render_spans(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[tuple[int, int, str]]]:
        """The rendered prompt and, per rendered message, its character span ``(start, end, role)``.

        A message's span is what rendering it adds to the rendering of the messages before it
        (role header included). Where the template is not prefix-stable (it rewrites earlier turns),
        the span falls back to where the message's content occurs in the text, searched in order."""
        from jinja2 import TemplateError  # rendering has imported it by now; loading a tokenizer does not

        msgs, kw = self._prepare(messages, tools, template_kwargs)
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        spans: list[tuple[int, int, str]] = []
        prev = 0
        for i, m in enumerate(msgs):
            try:
                part = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False, add_generation_prompt=False, **kw)
            except (TemplateError, ValueError):  # a template that refuses a partial conversation
                part = None
            if part is not None and text.startswith(part) and len(part) >= prev:
                spans.append((prev, len(part), m["role"]))
                prev = len(part)
                continue
            at = text.find(m["content"], prev) if m["content"] else -1
            if at >= 0:
                spans.append((at, at + len(m["content"]), m["role"]))
                prev = at + len(m["content"])
        return text, spans

    def encode_with_roles(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, suffix: str = "",
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], list[str | None]]:
        """Prompt ids (the rendered chat + `suffix`) and, per token, the role of the message it came
        from (None for text outside every message: the generation prompt, `suffix`). A token that
        straddles two spans takes the role where it starts."""
        text, spans = self.render_spans(messages, tools, template_kwargs)
        text += suffix
        try:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [int(o[0]) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, KeyError, TypeError):  # a slow tokenizer: no offsets
            ids = list(self.tok.encode(text, add_special_tokens=False))
            offsets = [len(self.tok.decode(ids[:i])) for i in range(len(ids))]
        roles: list[str | None] = []
        j = 0
        for start in offsets:
            while j < len(spans) and spans[j][1] <= start:
                j += 1
            roles.append(spans[j][2] if j < len(spans) and spans[j][0] <= start else None)
        return ids, roles


def _for_template(m: Mapping[str, Any], syntax: ToolSyntax, native: bool, args_as_text: bool = False) -> list[dict[str, Any]]:
    """One OpenAI message → the message(s) the template gets. Content parts become text. A template
    that renders `tool_calls` gets them with their arguments as a mapping (every real template
    iterates or `tojson`s them) and the reasoning; gpt-oss's reads one call per message, so a
    message with several becomes several. Otherwise (`_plain`) calls are written in `syntax`."""
    if not native:
        return [_plain(m, syntax)]
    out: dict[str, Any] = {"role": m["role"], "content": _text(m.get("content"))}
    for key in ("reasoning_content", "name", "tool_call_id"):
        if m.get(key) is not None:
            out[key] = m[key]
    calls = [{"id": c.get("id"), "type": "function",
              "function": {"name": name, "arguments": json.dumps(args) if args_as_text else args}}
             for c in m.get("tool_calls") or [] for name, args in [_call_pair(c)]]
    if not calls:
        return [out]
    if syntax is HARMONY:
        return [{**out, "tool_calls": [c]} if i == 0 else {"role": "assistant", "content": "", "tool_calls": [c]}
                for i, c in enumerate(calls)]
    return [{**out, "tool_calls": calls}]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return content or ""


def _call_pair(c: Mapping[str, Any]) -> tuple[Any, Any]:
    fn = c.get("function", c)
    args = fn.get("arguments", {})
    return fn.get("name"), (json.loads(args) if isinstance(args, str) and args else args or {})


def _plain(m: Mapping[str, Any], syntax: ToolSyntax) -> dict[str, Any]:
    """Content parts → text; assistant tool calls → the text the model would write (its `syntax`)."""
    content = _text(m.get("content"))
    out: dict[str, Any] = {"role": m["role"], "content": content}
    calls = m.get("tool_calls") or []
    if calls:
        pairs = [_call_pair(c) for c in calls]
        out["content"] = (content + "\n" if content else "") + syntax.render(pairs)
    if m["role"] == "tool":
        out["content"] = f"<tool_response>\n{content}\n</tool_response>"
    return out
