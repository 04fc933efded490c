"""Finding the exception that matters inside trio's exception groups."""

from __future__ import annotations


def find(exc: BaseException, *kinds: type[BaseException]) -> BaseException | None:
    """`exc` itself if it is one of `kinds`, else the first such exception inside (nested)
    exception groups; None if there is none."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find(inner, *kinds)
            if found is not None:
                return found
    return None
