"""Redis replies in tests: the clients here never set decode_responses, yet redis-py types a
reply as `bytes | str`; `as_text` is the one place that says which."""

from __future__ import annotations


def as_text(reply: bytes | str) -> str:
    """A Redis reply as text (UTF-8, as every key and value of the service is written)."""
    return reply.decode() if isinstance(reply, bytes) else reply
