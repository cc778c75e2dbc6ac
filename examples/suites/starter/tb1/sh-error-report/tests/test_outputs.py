def test_report_exact():
    with open("/app/report.txt") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    assert lines == ["api 3", "auth 2", "db 2"]
