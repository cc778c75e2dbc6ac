"""Evidence: failing tests, traceback frames, called functions and touched files grow the query."""

from __future__ import annotations

from lagoon.context.evidence import Evidence, parse_failing_tests, parse_frames, words_of_test

PYTEST = """\
..F.                                                                     [100%]
=================================== FAILURES ===================================
_______________________________ test_median_even _______________________________

    def test_median_even():
>       assert median([4, 1, 3, 2]) == 2.5
E       assert 3.0 == 2.5
E        +  where 3.0 = median([4, 1, 3, 2])

tests/test_textstats.py:15: AssertionError
=========================== short test summary info ============================
FAILED tests/test_textstats.py::test_median_even - assert 3.0 == 2.5
1 failed, 3 passed in 0.08s
"""

TRACEBACK = """\
Traceback (most recent call last):
  File "/home/u/proj/manage.py", line 22, in <module>
  File "/usr/lib/python3/site-packages/django/db/models/query.py", line 412, in get
    raise self.model.DoesNotExist(
  File "/usr/lib/python3/site-packages/django/db/models/sql/compiler.py", line 1210, in execute_sql
django.core.exceptions.FieldError: Cannot resolve keyword 'x' into field.
"""


def test_pytest_output_gives_failing_tests_frames_and_called_functions():
    failed, passed = parse_failing_tests(PYTEST)
    assert failed == ["tests/test_textstats.py::test_median_even"] and passed == []
    assert [(f.path, f.line) for f in parse_frames(PYTEST)] == [("tests/test_textstats.py", 15)]
    ev = Evidence(root="/repo")
    ev.observe_output("python -m pytest -q", PYTEST, 1)
    assert ev.revision == 1 and list(ev.called) == ["median"]
    q = ev.query("fix the failing test")
    assert q.startswith("fix the failing test\nmedian median") and "textstats median even" in q
    ev.observe_output("python -m pytest -q", PYTEST, 1)  # the same failure again: nothing new
    assert ev.revision == 1


def test_a_passing_run_forgets_the_failure():
    ev = Evidence()
    ev.observe_output("pytest", PYTEST, 1)
    ev.observe_output("python -m pytest -q tests/test_textstats.py", "....\n4 passed in 0.05s\n", 0)
    assert not ev.failing
    ev.observe_output("pytest", PYTEST, 1)
    ev.observe_output("pytest -rA", "PASSED tests/test_textstats.py::test_median_even\n", 0)
    assert not ev.failing


def test_frames_outside_the_repo_map_onto_its_files_or_are_dropped():
    assert parse_frames(TRACEBACK, root="/work/repo") == []  # nothing under the root
    files = frozenset({"django/db/models/query.py", "django/db/models/sql/compiler.py", "manage.py"})
    frames = parse_frames(TRACEBACK, files=files)
    assert [f.path for f in frames] == ["manage.py", "django/db/models/query.py", "django/db/models/sql/compiler.py"]
    ev = Evidence(files=files, max_frames=None)
    ev.observe_output("", TRACEBACK, None)
    q = ev.query("issue")
    # innermost frame first, and the exception line
    assert q.index("django/db/models/sql/compiler.py execute_sql") < q.index("django/db/models/query.py get")
    assert "FieldError: Cannot resolve keyword" in q
    ev.max_frames = 1  # the default: the innermost code frame only
    assert "compiler.py execute_sql" in ev.query("issue") and "query.py get" not in ev.query("issue")


def test_touched_files_join_the_query_without_forcing_a_refresh():
    ev = Evidence()
    ev.observe_files(["pkg/a.py"], edited=False)
    ev.observe_files(["pkg/b.py"], edited=True)
    assert ev.revision == 0 and ev.query("t").splitlines()[-2:] == ["pkg/b.py", "pkg/a.py"]
    assert words_of_test("tests/test_stats.py::TestMedian::test_even_list[1]") == "stats Median even list"
