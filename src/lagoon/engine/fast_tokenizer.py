"""`FastTokenizer`: a `tokenizers` backend plus the few facts transformers adds to it (named
special tokens and their ids, the chat template), read from one JSON record, so that a warm start
never imports transformers (its import and `AutoTokenizer.from_pretrained` cost ~0.5 s of CPU on
2 cores).

The record (``lagoon-tokenizer-v<FORMAT>.json`` in a tokenizer cache folder, `FORMAT` in it too) is a snapshot of
a transformers tokenizer *as transformers loaded it* (`write_record`): its backend's JSON after
transformers' own edits (post-processor, special tokens added; a BPE model's merges in the older
``"left right"`` form, which `tokenizers` parses ~2.5x faster), its `special_tokens_map`, the ids of
the named specials and its chat template. So encoding, decoding and offsets are the same Rust
calls transformers makes, and rendering is `ChatTemplate`'s copy of transformers'. A tokenizer whose
behaviour lives in Python (a slow one, a dict of templates, clean-up of decoded spaces on a non-BPE
model) gets no record and stays a transformers object. `read_record` returns None for a folder
without one; a record it cannot read raises (the caller deletes it and loads through transformers).

It offers the part of transformers' tokenizer API Lagoon uses (`encode`, `decode`, `__call__` with
offsets, `apply_chat_template(tokenize=False)`, `eos_token_id`, `backend_tokenizer`, `get_added_vocab`,
`len`, `save_pretrained`); it is *not* a general replacement for transformers' tokenizers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from lagoon.atomic import write_json_atomic

if TYPE_CHECKING:
    from lagoon.engine.chat_template import ChatTemplate

__all__ = ["FastTokenizer", "read_record", "write_record", "RECORD", "FORMAT"]

FORMAT = 2  # raise when what a record holds changes (2: compact merges)
# the format is in the name: a checkout of another format sharing the cache keeps its own record
# (one name for all had them rewrite each other's, ~3 s through transformers on every start)
RECORD = f"lagoon-tokenizer-v{FORMAT}.json"
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class FastTokenizer:
    """A `tokenizers.Tokenizer` with transformers' named special tokens and chat template."""

    def __init__(self, backend: Tokenizer, *, chat_template: str | None, special_tokens: Mapping[str, str],
                 special_ids: Mapping[str, int | None], source: Path | None = None) -> None:
        self._tokenizer = backend
        self.source = source  # the folder transformers saved it to (`save_pretrained` copies its config)
        self.special_tokens_map = dict(special_tokens)
        self._ids = dict(special_ids)
        self._template: ChatTemplate | None = None  # compiled at the first `apply_chat_template`
        self.chat_template = chat_template

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._chat_template, self._template = source, None

    def __getattr__(self, name: str) -> Any:  # bos_token, eos_token_id, ... (None when the tokenizer has none)
        if name.endswith("_token_id") and name[: -len("_id")] in _NAMED:
            return self.__dict__["_ids"].get(name[: -len("_id")])
        if name in _NAMED:
            return self.__dict__["special_tokens_map"].get(name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict[str, list]:
        enc = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list] = {"input_ids": enc.ids, "attention_mask": enc.attention_mask}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None, *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """The rendered conversation (ids without added special tokens when `tokenize`)."""
        unsupported = {"chat_template", "continue_final_message", "return_assistant_tokens_mask", "return_dict"} & set(kwargs)
        if unsupported:
            raise TypeError(f"FastTokenizer.apply_chat_template does not take {', '.join(sorted(unsupported))}")
        if not self._chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            # jinja2 is imported at the first chat, not at every load
            from lagoon.engine.chat_template import ChatTemplate

            self._template = ChatTemplate(self._chat_template, self.special_tokens_map)
        text = self._template.render(conversation, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


    def save_pretrained(self, folder: str | Path) -> None:
        """Write a folder transformers loads as this tokenizer (`lagoon.moe.moefy` ships one with a
        moefied model): the source folder's files as transformers wrote them, the backend and the
        chat template as they are now (`ChatFormat` may have made syntax tokens non-special)."""
        if self.source is None:
            raise ValueError("this FastTokenizer was not read from a folder; it has no config to save")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.source.iterdir():
            if f.is_file() and not f.name.startswith("lagoon-tokenizer") and f.name not in ("tokenizer.json", "chat_template.jinja"):
                shutil.copyfile(f, out / f.name)
        (out / "tokenizer.json").write_text(self._tokenizer.to_str(), encoding="utf-8")
        if self._chat_template is not None:
            (out / "chat_template.jinja").write_text(self._chat_template, encoding="utf-8")


def write_record(hf_tokenizer: Any, folder: Path) -> bool:
    """Snapshot a transformers tokenizer (loaded from `folder`) into `folder`'s record; False (and
    nothing written) when its behaviour is not all in the snapshot."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    template = getattr(hf_tokenizer, "chat_template", None)
    if backend is None or not (template is None or isinstance(template, str)):
        return False
    if getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) and type(backend.model).__name__ != "BPE":
        return False  # transformers cleans decoded text up in Python for these
    spec = json.loads(backend.to_str())
    spec["truncation"] = spec["padding"] = None  # transformers switches both off for unpadded calls
    _compact_merges(spec)
    record = {
        "format": FORMAT, "backend": json.dumps(spec), "chat_template": template,
        "special_tokens": dict(hf_tokenizer.special_tokens_map),
        "special_ids": {name: getattr(hf_tokenizer, f"{name}_id", None) for name in _NAMED},
    }
    write_json_atomic(folder / RECORD, record, indent=None)
    return True


def _compact_merges(spec: dict[str, Any]) -> None:
    """A BPE model's merges as ``"left right"`` strings, the older form `tokenizers` still reads:
    parsing it is ~2.5x faster than the ``[left, right]`` pairs it writes now (SmolLM2's 49k merges:
    0.19 -> 0.07 s of every warm start). Left as pairs when a token holds a space (the string form
    splits on it) or the merges are not pairs."""
    model = spec.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges:
        return
    if not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return
    model["merges"] = [f"{a} {b}" for a, b in merges]


def read_record(folder: Path) -> FastTokenizer | None:
    """The tokenizer `folder`'s record describes; None without a record or with an older format."""
    path = folder / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT:
        return None
    return FastTokenizer(Tokenizer.from_str(record["backend"]), chat_template=record["chat_template"],
                         special_tokens=record["special_tokens"], special_ids=record["special_ids"], source=folder)
