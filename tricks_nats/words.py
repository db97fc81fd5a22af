"""Counted nouns in messages: "1 tag", "2 tags", "1 pod", "0 pods"."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """`n word`, the word in its plural (`many`, default word + "s") unless n is 1."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
