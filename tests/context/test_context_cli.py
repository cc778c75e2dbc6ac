"""`lagoon index` and `lagoon search`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lagoon.cli.app import app

runner = CliRunner()


def test_index_then_update_then_search_json(repo):
    first = runner.invoke(app, ["index", str(repo), "-c", "context.rerank=false"])
    assert first.exit_code == 0, first.output
    assert "chunks" in first.output and "already up to date" not in first.output
    second = runner.invoke(app, ["index", str(repo)])
    assert "already up to date" in second.output
    out = runner.invoke(app, ["search", str(repo), "http header parse", "-k", "2", "--json", "--no-rerank"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert len(data["hits"]) <= 2
    top = data["hits"][0]
    assert top["path"] == "pkg/geometry.py" and top["symbol"] == "parse_http_header"
    assert top["start_line"] <= top["end_line"] and top["score"] > 0


def test_search_table_and_bad_repo(repo, tmp_path):
    out = runner.invoke(app, ["search", str(repo), "evict oldest", "--no-rerank"])
    assert out.exit_code == 0 and "Cache.evict_oldest" in out.output
    bad = runner.invoke(app, ["index", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "not a directory" in bad.output


def test_search_files_ranks_files(repo):
    out = runner.invoke(app, ["search", str(repo), "circle radius area", "--files", "-k", "2", "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)["hits"]
    assert hits[0]["path"] == "pkg/geometry.py" and len({h["path"] for h in hits}) == len(hits) <= 2
