from pathlib import Path

from lagoon.config import config_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_key_is_in_docs_table():
    text = DOC.read_text()
    missing = [k for k in config_keys() if f"| `{k}` |" not in text]
    assert not missing, f"docs/config.md lacks rows for: {missing}"
