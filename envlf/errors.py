"""One-line error text, shared by the readers that turn an exception into a user's one line."""

from __future__ import annotations


def first_line(e: BaseException, typed: bool = False, limit: int = 300) -> str:
    """The first line of an exception's message ("Type: line" when typed), at most `limit`
    characters; the type's name when the message is empty."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return (f"{type(e).__name__}: {lines[0]}" if typed else lines[0])[:limit]
