"""`lagoon generate` prints exactly the engine's continuation (no prompt, no template)."""

from __future__ import annotations

from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.engine import load_model
from lagoon.engine.tiny import save_tiny_model


def test_generate_prints_only_the_continuation(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "llama")
    engine = load_model(folder, precision="float32")
    try:
        plain = "".join(engine.stream("hi there", engine.params(max_new_tokens=8, ignore_eos=True)))
        chat_ids = engine.chat_prompt([{"role": "user", "content": "hi there"}])
        chat = "".join(engine.stream(chat_ids, engine.params(max_new_tokens=8, ignore_eos=True)))
    finally:
        engine.close()
    base = ["generate", "--model", str(folder), "--prompt", "hi there", "-n", "8", "--temperature", "0",
            "--ignore-eos", "--precision", "float32", "-c", "engine.max_seq_len=64"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    assert r.stdout == plain + "\n"
    r = CliRunner().invoke(app, [*base, "--chat"])
    assert r.stdout == chat + "\n"
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"])
    assert r.exit_code == 2 and "not found" in r.output
