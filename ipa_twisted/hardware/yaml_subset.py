"""A strict reader of the small part of YAML that container steps files use, and of JSON.

The reference agent reads ``[container] container_steps_file`` with PyYAML. This agent does
not depend on PyYAML for one small file; it reads what such files hold: block mappings and
block sequences (``key: value``, ``- item``, a sequence under a key at the key's own
indentation as ``yaml.safe_dump`` writes it), plain, single- and double-quoted scalars,
flow sequences of scalars (``[--rm, "--network=host"]``), ``{}``, comments, one leading
``---``, and a whole document in JSON (JSON is YAML too). Scalars mean what YAML 1.1 (PyYAML)
makes of them: ``true``/``yes``/``on`` ..., ``null``/``~``/nothing, decimal integers and
floats; anything else is a string.

Anything outside that subset (anchors, aliases, tags, block scalars ``|``/``>``, flow
mappings, nested flow collections, multi-line plain scalars, tabs in indentation, several
documents, duplicate keys) is refused with ``YamlSubsetError`` naming the line, never read
differently from PyYAML.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


class YamlSubsetError(ValueError):
    """The text is not in the subset of YAML this reader accepts (the line is named)."""


@dataclass
class _Line:
    number: int
    indent: int
    text: str


_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"})
_FALSE = frozenset({"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"})
# PyYAML's (YAML 1.1) implicit int and float forms that we read ...
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)\Z")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+][0-9]+)?\Z")
# ... and those we refuse rather than read differently: octal, hex, binary, sexagesimal,
# underscores, infinities, NaN, timestamps.
_OTHER_NUMBER = re.compile(
    r"([-+]?(0[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"
    r"|[1-9][0-9_]*|[0-9][0-9_]*\.[0-9_]*([eE][-+][0-9]+)?|\.[0-9_]+([eE][-+][0-9]+)?"
    r"|\.(inf|Inf|INF))"
    r"|\.(nan|NaN|NAN)"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?)\Z")
_UNSUPPORTED_START = "&*!|>%@`{},]"


def load(text: str) -> Any:
    """The value the YAML (or JSON) document ``text`` holds; None for an empty one."""
    lines = _lines(text)
    if not lines:
        return None
    if lines[0].text[0] in "{[":
        try:
            return json.loads(text)
        except ValueError as e:
            raise YamlSubsetError(f"line {lines[0].number}: a document starting with "
                                  f"{lines[0].text[0]!r} must be JSON ({e}); flow YAML "
                                  "beyond JSON is not supported") from None
    value, end = _block(lines, 0, lines[0].indent)
    if end < len(lines):
        raise YamlSubsetError(f"line {lines[end].number}: unexpected indentation or "
                              "content after the document")
    return value


def _lines(text: str) -> list[_Line]:
    """The significant lines: comment lines and blank lines dropped, one leading ``---``
    too. A comment after content is dropped where the value is read."""
    found: list[_Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.lstrip(" ")
        if stripped.startswith("\t"):
            raise YamlSubsetError(f"line {number}: tabs are not allowed in indentation")
        body = stripped.rstrip()
        if not body or body.startswith("#"):
            continue
        if body == "---" and not found:
            continue
        if body.startswith(("---", "...", "%")):
            raise YamlSubsetError(f"line {number}: directives and several documents are "
                                  "not supported")
        found.append(_Line(number, len(raw) - len(stripped), body))
    return found


def _comment_only(text: str) -> bool:
    return text == "" or text.startswith("#")


def _block(lines: list[_Line], index: int, indent: int) -> tuple[Any, int]:
    """The mapping or sequence whose lines start at ``index``, indented by ``indent``."""
    if _is_item(lines[index].text):
        return _sequence(lines, index, indent)
    return _mapping(lines, index, indent)


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _sequence(lines: list[_Line], index: int, indent: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while index < len(lines) and lines[index].indent == indent and _is_item(lines[index].text):
        line = lines[index]
        rest = line.text[1:].lstrip(" ")
        if _comment_only(rest):
            value, index = _nested(lines, index + 1, indent, line)
        elif _is_item(rest) or _key_value(rest) is not None:
            # "- key: value" opens a mapping (or "- - x" a sequence) at the column of its
            # first key; read it from a copy of this line starting there.
            column = line.indent + len(line.text) - len(rest)
            lines[index] = _Line(line.number, column, rest)
            value, index = _block(lines, index, column)
        else:
            value = _scalar(rest, line.number)
            index += 1
            _no_continuation(lines, index, indent, line)
        items.append(value)
    _check_dedent(lines, index, indent)
    return items, index


def _mapping(lines: list[_Line], index: int, indent: int) -> tuple[dict[str, Any], int]:
    mapping: dict[str, Any] = {}
    while index < len(lines) and lines[index].indent == indent \
            and not _is_item(lines[index].text):
        line = lines[index]
        pair = _key_value(line.text)
        if pair is None:
            raise YamlSubsetError(f"line {line.number}: expected 'key: value', got "
                                  f"{line.text!r}")
        key, rest = pair
        if key in mapping:
            raise YamlSubsetError(f"line {line.number}: duplicate key {key!r}")
        if rest:
            mapping[key] = _scalar(rest, line.number)
            index += 1
            _no_continuation(lines, index, indent, line)
        elif index + 1 < len(lines) and lines[index + 1].indent == indent \
                and _is_item(lines[index + 1].text):
            # A sequence under a key may sit at the key's own indentation.
            mapping[key], index = _sequence(lines, index + 1, indent)
        else:
            mapping[key], index = _nested(lines, index + 1, indent, line)
    _check_dedent(lines, index, indent)
    return mapping, index


def _nested(lines: list[_Line], index: int, indent: int, owner: _Line) -> tuple[Any, int]:
    """The block under ``owner`` (more indented), or None when there is none."""
    if index < len(lines) and lines[index].indent > indent:
        return _block(lines, index, lines[index].indent)
    return None, index


def _no_continuation(lines: list[_Line], index: int, indent: int, owner: _Line) -> None:
    if index < len(lines) and lines[index].indent > indent:
        raise YamlSubsetError(f"line {lines[index].number}: unexpected indentation after "
                              f"line {owner.number} (multi-line plain scalars are not "
                              "supported)")


def _check_dedent(lines: list[_Line], index: int, indent: int) -> None:
    if index < len(lines) and lines[index].indent > indent:
        raise YamlSubsetError(f"line {lines[index].number}: unexpected indentation")


_KEY = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^'"#\-\[\]{},&*!|>%@`?][^#]*?)"""
                  r""":(?: +(.*))?\Z""")


def _key_value(text: str) -> tuple[str, str] | None:
    """``(key, rest)`` of ``key: rest`` (rest may be empty), or None if not a mapping line."""
    match = _KEY.match(text)
    if match is None:
        return None
    raw_key, rest = match.group(1), (match.group(2) or "").strip()
    if rest.startswith("#"):
        rest = ""
    if ": " in raw_key and raw_key[0] not in "'\"":
        return None
    key = _scalar(raw_key, 0) if raw_key[0] in "'\"" else raw_key.strip()
    return str(key), rest


_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
            "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
            "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _double_quoted(text: str, number: int) -> tuple[str, str]:
    """(the value, what follows it) of the double-quoted scalar ``text`` starts with."""
    out: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(out), text[index + 1:]
        if char == "\\":
            code = text[index + 1:index + 2]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                index += 2
                continue
            width = _HEX_ESCAPES.get(code, 0)
            digits = text[index + 2:index + 2 + width]
            if not width or len(digits) != width or not all(
                    c in "0123456789abcdefABCDEF" for c in digits):
                raise YamlSubsetError(f"line {number}: bad escape in {text}")
            out.append(chr(int(digits, 16)))
            index += 2 + width
            continue
        out.append(char)
        index += 1
    raise YamlSubsetError(f"line {number}: unterminated double-quoted scalar (multi-line "
                          "scalars are not supported)")


def _single_quoted(text: str, number: int) -> tuple[str, str]:
    """(the value, what follows it) of the single-quoted scalar ``text`` starts with."""
    out: list[str] = []
    index = 1
    while index < len(text):
        if text[index] == "'":
            if text[index + 1:index + 2] == "'":
                out.append("'")
                index += 2
                continue
            return "".join(out), text[index + 1:]
        out.append(text[index])
        index += 1
    raise YamlSubsetError(f"line {number}: unterminated single-quoted scalar (multi-line "
                          "scalars are not supported)")


def _only_comment_after(rest: str, number: int, what: str) -> None:
    if rest.strip() and not (rest[0] == " " and rest.strip().startswith("#")):
        raise YamlSubsetError(f"line {number}: text after a {what}: {rest.strip()!r}")


def _scalar(text: str, number: int) -> Any:
    """The value of ``text``: a scalar, a flow sequence or ``{}``, maybe with a comment."""
    if text[0] in "'\"":
        value, rest = (_double_quoted if text[0] == '"' else _single_quoted)(text, number)
        _only_comment_after(rest, number, "quoted scalar")
        return value
    if text[0] == "[":
        return _flow_sequence(text, number)
    if text[0] == "#":
        return None
    plain = text.split(" #", 1)[0].rstrip()
    if plain == "{}":
        return {}
    if plain[0] in _UNSUPPORTED_START:
        raise YamlSubsetError(f"line {number}: {plain[0]!r} (anchors, aliases, tags, block "
                              "scalars, flow mappings, reserved indicators) is not "
                              "supported")
    if plain in ("-", "?", ":", "=", "<<") or plain.startswith(("- ", "? ", ": ")):
        raise YamlSubsetError(f"line {number}: unexpected {plain!r}")
    if ": " in plain or plain.endswith(":"):
        raise YamlSubsetError(f"line {number}: a mapping cannot follow a key on its line")
    return _plain(plain, number)


def _plain(text: str, number: int) -> Any:
    if text in _NULLS:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if _OTHER_NUMBER.match(text):
        raise YamlSubsetError(f"line {number}: {text!r} would be read by YAML as a number "
                              "or a date in a form not supported here; quote it for a "
                              "string")
    return text


def _flow_sequence(text: str, number: int) -> list[Any]:
    """The items of the flow sequence ``text`` holds (scalars only, on one line)."""
    items: list[Any] = []
    index = 1
    while True:
        while text[index:index + 1] == " ":
            index += 1
        if index >= len(text):
            raise YamlSubsetError(f"line {number}: a flow sequence must end on its line")
        char = text[index]
        if char == "]":
            _only_comment_after(text[index + 1:], number, "flow sequence")
            return items
        if char in "'\"":
            value, rest = (_double_quoted if char == '"' else _single_quoted)(
                text[index:], number)
            items.append(value)
            index = len(text) - len(rest)
        elif char in "[{":
            raise YamlSubsetError(f"line {number}: nested flow collections are not "
                                  "supported")
        elif char == ",":
            raise YamlSubsetError(f"line {number}: empty item in a flow sequence")
        else:
            end = index
            while end < len(text) and text[end] not in ",]":
                end += 1
            item = text[index:end].strip()
            if " #" in item or any(c in item for c in "[{}"):
                raise YamlSubsetError(f"line {number}: {item!r}: comments and nested "
                                      "collections are not supported in a flow sequence")
            items.append(_scalar(item, number))
            index = end
        while text[index:index + 1] == " ":
            index += 1
        if text[index:index + 1] == ",":
            index += 1
        elif text[index:index + 1] != "]":
            raise YamlSubsetError(f"line {number}: expected ',' or ']' in a flow sequence")
