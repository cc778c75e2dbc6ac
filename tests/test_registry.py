"""`lagoon.registry.Registry` and the CLI's one `--model` parser built on it."""

import json

import pytest

from lagoon.cli.model_spec import ModelSpec
from lagoon.errors import ConfigError, TaskSpecError
from lagoon.registry import Registry


def test_a_wrong_name_lists_the_valid_ones_and_strings_import_lazily():
    reg = Registry("codec", {"json": "json:dumps", "self": len}, where="x.codec", error=TaskSpecError)
    assert list(reg) == ["json", "self"] and reg["json"] == "json:dumps"
    assert reg.load("json") is json.dumps and reg.load("self") is len
    with pytest.raises(TaskSpecError, match=r"^x\.codec: unknown codec 'yaml'; valid: json, self$"):
        reg.load("yaml")


def test_model_spec_file_dir_and_errors(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["hello"]))
    assert ModelSpec.parse("router") == ModelSpec("router")
    assert ModelSpec.parse("router").factory() is None
    one = ModelSpec.parse(f"scripted:{script}")
    assert one.model(None).chat([]).message.content == "hello"
    (tmp_path / "per-task").mkdir()
    (tmp_path / "per-task" / "t1.json").write_text(json.dumps(["for t1"]))
    per_task = ModelSpec.parse(f"scripted:{tmp_path / 'per-task'}")
    with pytest.raises(ConfigError, match="takes scripted:FILE.json"):
        per_task.model(None)

    class T:
        id = "t1"

    assert per_task.factory()(T()).chat([]).message.content == "for t1"
    assert one.factory()(T()).chat([]).message.content == "hello"  # a file: the same script for every task
    for bad, why in [("gpt", "valid: router, scripted"), ("scripted", "needs a path"),
                     (f"scripted:{tmp_path / 'nope'}", "does not exist"), ("router:x", "takes no argument")]:
        with pytest.raises(ConfigError, match=why):
            ModelSpec.parse(bad)
