"""JSON encoding for API answers and outgoing requests."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


class Serializable:
    """Something that turns itself into a JSON-ready dict from ``serializable_fields``."""

    serializable_fields: tuple[str, ...] = ()

    def serialize(self) -> dict[str, Any]:
        """This object as a dict of its serializable fields."""
        return {name: getattr(self, name) for name in self.serializable_fields}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.serialize() == other.serialize()

    __hash__ = None  # type: ignore[assignment]


def _default(obj: Any) -> Any:
    serialize = getattr(obj, "serialize", None)
    if callable(serialize):
        return serialize()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def to_jsonable(obj: Any) -> Any:
    """A plain JSON value (dicts, lists, scalars) equal to what ``encode`` would write."""
    return json.loads(encode(obj))


def encode(obj: Any) -> bytes:
    """UTF-8 JSON for ``obj``; objects with ``serialize()`` and dataclasses are expanded."""
    return json.dumps(obj, default=_default, ensure_ascii=True).encode("ascii")
