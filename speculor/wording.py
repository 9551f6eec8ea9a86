"""Small helpers for the words the command line prints, so a count of one does not read "1 tokens"."""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """`count` and the noun that agrees with it, the count with thousands separators: "1 token", "1,024 tokens".
    `plural` is for nouns that do not just add an s ("batch", "batches")."""
    noun = singular if count == 1 else plural or f"{singular}s"
    return f"{count:,} {noun}"
