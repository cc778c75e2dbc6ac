"""The public API, the error tree and the CLI's foundation commands."""

import inspect
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import lagoon
import lagoon.errors as errors
from lagoon.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_all_is_complete_and_importable():
    exported = set(lagoon.__all__)
    public = {n for n, v in vars(lagoon).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= exported
    for name in exported:
        assert hasattr(lagoon, name), name
    assert set(exported) <= set(dir(lagoon))
    assert all(getattr(lagoon, e) is getattr(errors, e) for e in errors.__all__), "every error is exported"


def test_import_lagoon_does_not_import_torch():
    code = "import sys, lagoon, lagoon.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_lagoon_defers_config_telemetry_and_metadata():
    """`import lagoon` imports neither pydantic's config, prometheus_client nor importlib.metadata;
    their public names import them on first use."""
    heavy = ("lagoon.config", "lagoon.telemetry", "prometheus_client", "importlib.metadata", "pydantic")
    code = f"import sys, lagoon; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import lagoon, lagoon.config, lagoon.telemetry; print(lagoon.LagoonConfig is lagoon.config.LagoonConfig, " \
           "lagoon.Telemetry is lagoon.telemetry.Telemetry, lagoon.load_config is lagoon.config.load_config)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"] * 3


def test_error_tree_docstring_lists_every_error_and_split_is_right():
    doc = errors.__doc__
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert name in doc, f"{name} missing from the tree in errors.py"
        if cls not in (errors.LagoonError,):
            assert issubclass(cls, errors.FatalError) != issubclass(cls, errors.RetryableError) or cls in (
                errors.FatalError,
                errors.RetryableError,
            )
    assert errors.RateLimitError("x", retry_after=2).retry_after == 2
    assert errors.RateLimitError.retryable and not errors.ConfigError.retryable


def test_cli_version_and_help():
    assert runner.invoke(app, ["version"]).stdout.strip() == lagoon.__version__
    result = runner.invoke(app, ["config", "--help"])
    assert result.exit_code == 0 and "validate" in result.stdout


def test_cli_validate_seed_files_ok():
    files = [str(ROOT / "examples/configs/seed-000.yaml"), str(ROOT / "examples/configs/seed-001.yaml")]
    result = runner.invoke(app, ["config", "validate", *files])
    assert result.exit_code == 0, result.output


def test_cli_validate_bad_file_exits_2_with_key_and_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context:\n  maxChunkSzie: 10\nmodel_deployment:\n  routing:\n    temperature: -1\n")
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "context.maxChunkSzie" in result.output and "Did you mean 'maxChunkSize'" in result.output
    assert "model_deployment.expert_routing.temperature" in result.output and "Fix:" in result.output


def test_cli_show_merges_layers_and_prints_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-value")
    result = runner.invoke(
        app,
        ["config", "show", "--format", "json", "-c", str(ROOT / "examples/configs/seed-001.yaml"), "-c", "context.maxChunkSize=77",
         "-c", "routing.reasoningBound.api_key_env=ANTHROPIC_API_KEY"],
    )
    assert result.exit_code == 0, result.output
    assert '"max_chunk_size": 77' in result.stdout
    assert "sk-ant-secret-value" not in result.stdout
    assert '"api_key_env": "ANTHROPIC_API_KEY"' in result.stdout  # the name, never the value


def test_cli_show_bad_override_exits_2():
    result = runner.invoke(app, ["config", "show", "-c", "agent.step_limit=-3"])
    assert result.exit_code == 2 and "agent.step_limit" in result.output


def test_cli_keys_lists_docstrings():
    result = runner.invoke(app, ["config", "keys", "context"])
    assert result.exit_code == 0
    assert "context.max_chunk_size" in result.stdout and "Largest chunk" in result.stdout
    assert "agent.step_limit" not in result.stdout


def _modules():
    import ast

    for path in sorted((ROOT / "src" / "lagoon").rglob("*.py")):
        yield path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"))


def test_every_protocol_lives_in_protocols_py():
    import ast

    elsewhere = [
        f"{path}:{node.name}"
        for path, tree in _modules() if path.name != "protocols.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any((isinstance(b, ast.Name) and b.id == "Protocol") or (isinstance(b, ast.Attribute) and b.attr == "Protocol")
                for b in node.bases)
    ]
    assert not elsewhere, f"Protocols outside lagoon/protocols.py: {elsewhere}"


def test_no_in_package_import_falls_back_on_importerror():
    """A broken `lagoon.*` import must propagate, never switch a feature off."""
    import ast

    bad = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            caught = {getattr(h.type, "id", None) for h in node.handlers}
            if not caught & {"ImportError", "ModuleNotFoundError"}:
                continue
            for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom)
                         else [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                bad += [f"{path}:{inner.lineno}" for n in names if n == "lagoon" or n.startswith("lagoon.")]
    assert not bad, f"in-package imports inside `except ImportError`: {bad}"


def test_no_source_file_passes_500_lines():
    """Past ~500 lines a module is split along a seam (STYLE.md)."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "src").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"split these along a seam: {long}"


def test_config_package_imports_its_names_on_first_use():
    """The engine takes a few sections; the loader (yaml) and the whole LagoonConfig stay unimported,
    and every name of `lagoon.config.__all__` resolves."""
    code = ("import sys; from lagoon.config import EngineSection, ModelDeploymentSection; "
            "print(sorted(m for m in ('yaml', 'lagoon.config.loader', 'lagoon.config.lagoon_config') if m in sys.modules)); "
            "import lagoon.config as c; print(all(getattr(c, n) is not None for n in c.__all__), set(c.__all__) <= set(dir(c)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True True", out
