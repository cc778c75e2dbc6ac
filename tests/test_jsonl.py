"""`lagoon.jsonl.read_jsonl`: bad lines named by file and line; torn files tolerated on request."""

import pytest

from lagoon.errors import ConfigError, TaskSpecError
from lagoon.jsonl import JsonlRead, read_jsonl


def test_bad_lines_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n{"b": 2}\n{oops\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: expected a JSON object per line, got list"):
        list(read_jsonl(p))
    errors: list = []
    rows = list(read_jsonl(p, error=TaskSpecError, errors=errors))
    assert rows == [(f"{p}:1", {"a": 1}), (f"{p}:4", {"b": 2})]
    assert [type(e) for e in errors] == [TaskSpecError, TaskSpecError] and ":5: not JSON" in str(errors[1])


def test_a_torn_last_line_is_skipped_and_reported(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": 2')
    seen = JsonlRead()
    assert [r for _, r in read_jsonl(p, torn_ok=True, stats=seen)] == [{"a": 1}]
    assert (seen.bad, seen.torn) == (1, True)
