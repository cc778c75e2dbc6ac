from pathlib import Path


def test_names_normalized():
    names = sorted(p.name for p in Path("/app/docs").iterdir())
    assert names == ["annual_report_2024.txt", "meeting_notes.md", "readme.txt"]


def test_contents_kept():
    assert Path("/app/docs/annual_report_2024.txt").read_text() == "report\n"
    assert Path("/app/docs/meeting_notes.md").read_text() == "notes\n"
