"""The benchmark harness runs end to end on tiny shapes (numbers are not checked, only sanity)."""

from lagoon.moe.benchmark import balance_rows, format_balance, format_speed, speed_rows


def test_speed_rows_tiny():
    rows = speed_rows([(4, 2, 16, 8)], [1, 6], reps_decode=1, reps_prefill=1)
    assert {r.path for r in rows} == {"hf eager", "hf grouped_mm", "lagoon loop", "lagoon grouped_mm"}
    assert all(r.max_err < 1e-5 and r.ms > 0 for r in rows)
    assert "lagoon loop" in format_speed(rows)


def test_balance_rows_tiny():
    rows = balance_rows(weights=(0.0, 5.0), num_experts=8, top_k=2, hidden=16, steps=20, batch=4, vocab=32)
    off, on = rows
    assert off.kl == 0.0 and off.changed == 0.0 and off.cv_on == off.cv_off
    assert on.cv_on < on.cv_off and on.kl > 0
    assert "KL" in format_balance(rows)
