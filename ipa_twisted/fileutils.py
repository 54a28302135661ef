"""Small-file helpers for sysfs and procfs (a few bytes: fine on the reactor thread)."""

from __future__ import annotations


def read_text(path: str) -> str | None:
    """A small file's stripped text, or None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None
