"""The daily stats store: the reasoning-share alert across processes, `lagoon stats`, and the
Prometheus endpoint of `lagoon metrics serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.config import load_config
from lagoon.routing import build_router
from lagoon.stats import StatsStore
from lagoon.telemetry import Telemetry
from lagoon.testing import ScriptedChatModel

REASONING = "design a new architecture and refactor the scheduler"
RETRIEVAL = "fix the failing test and lint the file"


def _router(cfg):
    tel = Telemetry(cfg.telemetry)
    backends = {"retrieval_bound": ScriptedChatModel(["ok"]), "reasoning_bound": ScriptedChatModel(["ok"])}
    return build_router(cfg, tel, backends=backends), tel


def test_twelve_routers_one_per_run_fire_the_share_alert_once(tmp_path):
    cfg = load_config({"telemetry": {"stats_path": str(tmp_path / "s.sqlite")}})
    fired = []
    for i in range(12):  # each run builds its own router (and store connection), as a process would
        router, tel = _router(cfg)
        router.set_task(REASONING if i % 2 else RETRIEVAL, 0)
        fired.append(tel.value("lagoon_alerts_total", {"name": "reasoning_share"}) or 0)
        router.metrics.store.close()
    # no single router saw more than one classification; the tenth of the day (5 of 10) fired, once
    assert fired == [0] * 9 + [1, 0, 0]
    store = StatsStore(tmp_path / "s.sqlite")
    w = store.window()
    assert w.tasks == 12 and w.classifications == {"reasoning_bound": 6, "retrieval_bound": 6}
    (alert,) = store.alerts()
    assert alert["firing"] and "50%" in alert["message"]
    out = CliRunner().invoke(app, ["stats", "--json", "-c", f"telemetry.stats_path={tmp_path / 's.sqlite'}"])
    data = json.loads(out.stdout)
    assert out.exit_code == 0 and data["over_limit"] and data["rolling_day"]["reasoning_share"] == 0.5
    assert data["days"][0]["tasks"] == 12 and data["alerts"][0]["firing"]


def test_the_alert_fires_in_one_process_only_and_rearms_below_the_limit(tmp_path):
    path = tmp_path / "s.sqlite"
    a, b = StatsStore(path), StatsStore(path)
    assert a.transition("reasoning_share", True, "over") and not b.transition("reasoning_share", True, "over")
    assert not b.transition("reasoning_share", False) and b.transition("reasoning_share", True, "again")


def test_persist_stats_off_keeps_nothing_and_the_limit_comes_from_config(tmp_path):
    cfg = load_config({"telemetry": {"stats_path": str(tmp_path / "s.sqlite"), "persist_stats": False}})
    router, _ = _router(cfg)
    assert router.metrics.store is None
    router.set_task(REASONING, 0)
    assert not (tmp_path / "s.sqlite").exists()
    # with a 60% limit, 6 of 12 does not fire
    cfg = load_config({"telemetry": {"stats_path": str(tmp_path / "t.sqlite"), "reasoning_share_alert": 0.6}})
    for i in range(12):
        router, _ = _router(cfg)
        router.set_task(REASONING if i % 2 else RETRIEVAL, 0)
    assert not any(x["firing"] for x in StatsStore(tmp_path / "t.sqlite").alerts())


def test_validations_and_drift_reach_the_daily_table(tmp_path):
    cfg = load_config({"telemetry": {"stats_path": str(tmp_path / "s.sqlite")}})
    router, _ = _router(cfg)
    for ok in (True, True, False, True):
        router.record_validation(ok)
    router.record_assumption_drift(2)
    (day,) = StatsStore(tmp_path / "s.sqlite").days()
    assert (day.validations_passed, day.validations_failed, day.assumption_drift) == (3, 1, 2)
    assert day.validation_pass_rate == 0.75


def test_metrics_endpoint_serves_the_store(tmp_path):
    from lagoon.cli.stats_cmd import metrics_server

    store = StatsStore(tmp_path / "s.sqlite")
    for label in ("reasoning_bound", "retrieval_bound", "retrieval_bound", "retrieval_bound"):
        store.record("classification", label)
    store.record("validation", "passed")
    store.record("drift", value=3)
    server = metrics_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "lagoon_stats_reasoning_share 0.25" in body
    assert 'lagoon_stats_classifications{type="retrieval_bound"} 3.0' in body
    assert "lagoon_stats_assumption_drift 3.0" in body and "lagoon_stats_validation_pass_rate 1.0" in body


@pytest.mark.slow
def test_twelve_lagoon_route_processes_fire_the_alert_in_lagoon_stats(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    lagoon = [sys.executable, "-c", "from lagoon.cli.app import main; main()"]
    for i in range(12):
        subprocess.run([*lagoon, "route", REASONING if i % 2 else RETRIEVAL], env=env, check=True,
                       capture_output=True, timeout=120)
    out = subprocess.run([*lagoon, "stats"], env=env, check=True, capture_output=True, text=True, timeout=120)
    assert "ALERT reasoning_share" in out.stdout and "50%" in out.stdout
    data = json.loads(subprocess.run([*lagoon, "stats", "--json"], env=env, check=True, capture_output=True,
                                     text=True, timeout=120).stdout)
    assert data["rolling_day"]["tasks"] == 12 and data["over_limit"]
