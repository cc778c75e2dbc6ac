"""The joined-regex gitignore matcher decides exactly as pathspec's GitIgnoreSpec does."""

from __future__ import annotations

import pathspec
from hypothesis import given, settings
from hypothesis import strategies as st

from lagoon.context.fileset import ignore_matcher

_NAMES = ["a", "b", "keep.pyc", "build", "src", "x.py", "y.pyc", "data.bin", ".env", "node_modules", "doc.md"]
_PATTERNS = [
    "*.pyc", "build/", "/src/", "node_modules", "**/data.*", "a/**/x.py", "doc.md", ".env", "b/*",
    "!keep.pyc", "!b/x.py", "# comment", "", "x?py", "[ab]/", "src/**",
]
paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4).map("/".join)
probes = st.tuples(paths, st.booleans()).map(lambda t: t[0] + ("/" if t[1] else ""))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from(_PATTERNS), max_size=6), probe_list=st.lists(probes, min_size=1, max_size=20))
def test_matcher_agrees_with_pathspec(lines, probe_list):
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    match = ignore_matcher(lines)
    for probe in probe_list:
        expected = spec.match_file(probe)
        got = bool(match(probe)) if match is not None else False
        assert got == expected, (lines, probe)


def test_joined_regex_only_without_negation():
    assert ignore_matcher(["# only a comment", ""]) is None
    plain = ignore_matcher(["*.pyc", "build/"])
    assert not isinstance(getattr(plain, "__self__", None), pathspec.PathSpec)  # the joined regex
    negated = ignore_matcher(["*.pyc", "!keep.pyc"])
    assert isinstance(negated.__self__, pathspec.PathSpec)  # order matters: pathspec decides
    assert negated("a.pyc") and not negated("keep.pyc")
