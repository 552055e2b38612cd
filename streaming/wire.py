"""What clients send, checked before anything acts on it: one parsing layer for HTTP bodies, websocket messages and
data-channel messages.

Every check fails with :class:`WireError`, which carries the HTTP status that fits (``400`` malformed, ``413`` too
large) and a message naming the problem; a transport turns it into a 4xx response or a control error reply. Nothing
here raises anything else on bad input: sizes are bounded before decoding, text must be UTF-8, and JSON nesting is
measured before ``json.loads`` sees it (CPython's parser recurses, so a deeply nested body would otherwise end in a
``RecursionError`` inside whatever handler parsed it).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_JSON_DEPTH = 32  # a control message is flat; an /offer body is one object of strings

# a JSON string (with its escapes): removed before brackets are counted, so "[" inside a string does not count
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class WireError(ValueError):
    """Input a client sent cannot be used; ``status`` is the HTTP status that answers it (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_size(data: bytes | str, what: str, limit: int) -> None:
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > limit:
        raise WireError(f"{what} is too large ({size} bytes, limit {limit})", status=413)


def as_text(data: bytes | str, what: str, limit: int) -> str:
    """``data`` as text: at most ``limit`` bytes of valid UTF-8 (strings from a transport are checked for size only)."""
    check_size(data, what, limit)
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


def nesting_depth(text: str, stop_above: int | None = None) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (0 for a scalar); stops counting above ``stop_above``."""
    depth = peak = 0
    for match in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > peak:
            peak = depth
            if stop_above is not None and peak > stop_above:
                break
    return peak


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json(data: bytes | str, what: str, limit: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: bounded size and depth, UTF-8, no NaN/Infinity, no duplicate keys."""
    text = as_text(data, what, limit)
    depth = nesting_depth(text, stop_above=max_depth)
    if depth > max_depth:
        raise WireError(f"{what} nests arrays/objects more than {max_depth} levels deep")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)
    except ValueError as exc:  # JSONDecodeError, and the hooks' refusals
        raise WireError(f"{what} is not valid JSON: {exc}") from None


def parse_json_object(data: bytes | str, what: str, limit: int, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    value = parse_json(data, what, limit, max_depth)
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def require_fields(obj: dict[str, Any], what: str, types: dict[str, type | tuple[type, ...]]) -> None:
    """Exactly the keys of ``types``, each of its type (strict: an unknown key is an error that names it)."""
    unknown = sorted(set(obj) - set(types))
    if unknown:
        raise WireError(f"{what} has unknown key(s) {unknown}; expected {sorted(types)}")
    for key, kind in types.items():
        if key not in obj:
            raise WireError(f"{what} lacks {key!r}")
        value = obj[key]
        # bool is an int in Python; JSON tells them apart
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            raise WireError(f"{what}: {key!r} must be {_type_name(kind)}, got {_json_type(value)}")


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_json_type_of(k) for k in kinds)


def _json_type_of(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}.get(
        kind, "an array" if kind is list else kind.__name__
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _json_type_of(type(value))
