import json

from typer.testing import CliRunner

from lagoon.cli.moe_cmd import app

runner = CliRunner()


def test_simulate_then_placement(tmp_path):
    snap_path, png = tmp_path / "snap.json", tmp_path / "heat.png"
    res = runner.invoke(
        app,
        [
            "simulate", "--layers", "2", "--hidden", "32", "--intermediate", "16", "--steps", "6", "--tokens", "8",
            "-c", "model_deployment.routing.total_experts=8", "-c", "moe.capacity_factor=1.0",
            "--json", str(snap_path), "--plot", str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    snap = json.loads(snap_path.read_text())
    assert len(snap["layers"]) == 2 and len(snap["layers"][0]["tokens"]) == 8
    assert sum(snap["layers"][0]["tokens"]) == 6 * 8 * 2  # steps * tokens * top-2
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "plan.json"
    res = runner.invoke(app, ["placement", str(snap_path), "--devices", "4", "--redundant", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "balancedness: naive" in res.output
    plan = json.loads(out.read_text())
    assert len(plan["phy2log"]) == 2 and len(plan["phy2log"][0]) == 12


def test_placement_errors_are_clean(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    res = runner.invoke(app, ["placement", str(bad)])
    assert res.exit_code == 2 and "not JSON" in res.output
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([1, 2, 3]))
    res = runner.invoke(app, ["placement", str(loads), "--devices", "2"])
    assert res.exit_code == 2 and "split evenly" in res.output
    res = runner.invoke(app, ["placement", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "no such file" in res.output
