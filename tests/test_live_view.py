"""`lagoon run`'s live view reads the events the agent really writes (typed once, in cli.live_view)."""

from __future__ import annotations

import io

from rich.console import Console

from lagoon.agent import run_task
from lagoon.cli.live_view import LiveView
from lagoon.config import load_config
from lagoon.routing import build_router
from lagoon.testing import ReplayChatModel, ScriptStep


def test_route_column_shows_the_routers_task_type(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    script = [ScriptStep(tool=("bash", {"command": "cat a.txt"})), ScriptStep(tool=("submit", {"summary": "ok"}))]
    cfg = load_config({"context": {"rerank": False}})
    cheap, strong = ReplayChatModel(script, name="cheap"), ReplayChatModel(script, name="strong")
    router = build_router(cfg, backends={"retrieval_bound": cheap, "reasoning_bound": strong})
    view = LiveView(Console(file=io.StringIO(), width=200))
    result = run_task("fix the failing lint test", tmp_path, cfg, model=router, on_event=view)
    assert result.submitted
    bash_row = next(r for r in view.rows if r[1] == "bash")
    assert bash_row[2] == "cat a.txt" and bash_row[3] == "0"
    assert bash_row[4] == "RETRIEVAL_BOUND"  # from the RouteReport's classification, not the backend name
    assert bash_row[5] != "0/0"
