"""The engine picks a checkpoint's tool-call syntax from its chat template, and from the model's
family (`model_type`) when the template writes no calls of its own."""

from __future__ import annotations

from lagoon.engine import load_model
from lagoon.engine.tiny import save_tiny_model
from lagoon.tool_syntax import HERMES, QWEN3_CODER

PLAIN = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


def test_the_family_decides_when_the_template_names_no_syntax(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "qwen3_moe")
    e = load_model(folder, precision="float32")
    try:
        assert e.chat_format.tool_syntax is HERMES  # the tiny template writes Hermes <tool_call> blocks
    finally:
        e.close()
    (folder / "chat_template.jinja").write_text(PLAIN)
    e = load_model(folder, precision="float32")
    try:
        assert e.chat_format.tool_syntax is QWEN3_CODER  # qwen3_moe: Qwen3-Coder's XML calls
    finally:
        e.close()
