"""Finding the exception that matters inside exception groups."""

from __future__ import annotations

from p2pd.excgroups import find


def test_finds_itself_or_the_first_match_in_nested_groups() -> None:
    full = OSError("no space")
    nested = BaseExceptionGroup("outer", [ValueError("x"), ExceptionGroup("inner", [full])])
    assert find(full, OSError) is full
    assert find(nested, OSError) is full
    assert find(nested, KeyError) is None
    assert find(nested, KeyError, ValueError) is nested.exceptions[0]
