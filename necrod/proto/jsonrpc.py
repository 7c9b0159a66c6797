"""JSON-RPC 2.0 over newline-delimited JSON: decoding request lines, encoding replies.

Pure functions on bytes and values; the socket server is a thin shell around them.

The decoder is strict where Python's ``json`` is lenient (DESIGN.md, trap 8): it refuses
``NaN``/``Infinity``, duplicate keys, lone surrogates, absurdly long numbers and deep nesting,
so that nothing it lets through can fail later when it is logged, stored or passed to git.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from necrod.proto.errors import InvalidRequest, NecrodError, ParseError

#: Longest request line accepted, newline excluded (DESIGN.md: 1 MiB).
MAX_LINE_BYTES = 1 << 20

#: Nesting deeper than this is refused: no method takes more than a few levels.
MAX_DEPTH = 32

#: Integers longer than this are refused (Python would build them happily, slowly).
MAX_INT_DIGITS = 30

RequestId = str | int | None


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded call. ``notification`` calls get no reply, as JSON-RPC 2.0 says."""

    id: RequestId
    method: str
    params: dict[str, Any]
    notification: bool = False


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A line that could not be turned into a request: reply with ``error``, keep reading."""

    id: RequestId
    error: NecrodError


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not allowed in requests")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidRequest(f"number with {len(text)} digits is too long (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise InvalidRequest(f"number of {len(text)} characters is too long")
    value = float(text)
    if math.isinf(value):
        raise InvalidRequest(f"number {text} is out of range (JSON has no infinity)")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidRequest(f"duplicate key {key!r}")
        obj[key] = value
    return obj


_decoder = json.JSONDecoder(
    object_pairs_hook=_pairs,
    parse_constant=_reject_constant,
    parse_int=_parse_int,
    parse_float=_parse_float,
    strict=True,
)


def _check_value(value: Any, depth: int = 0) -> None:
    """Refuse lone surrogates anywhere and nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("string contains a lone surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(key, depth + 1)
            _check_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)


def decode_json(line: bytes) -> Any:
    """Decode one line as strict JSON, raising ``ParseError`` or ``InvalidRequest``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"request is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise InvalidRequest(f"nesting deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ParseError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # int() refusing a huge literal
        raise InvalidRequest(str(exc)) from None
    _check_value(value)
    return value


def decode_request(line: bytes) -> Request | BadRequest:
    """Turn one request line (without its newline) into a ``Request`` or a ``BadRequest``."""
    try:
        value = decode_json(line)
    except NecrodError as exc:
        return BadRequest(None, exc)
    if isinstance(value, list):
        return BadRequest(None, InvalidRequest("batch requests are not supported"))
    if not isinstance(value, dict):
        return BadRequest(None, InvalidRequest("a request must be a JSON object"))

    has_id = "id" in value
    raw_id = value.get("id")
    request_id: RequestId = None
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int | None):
        return BadRequest(None, InvalidRequest("id must be a string, an integer or null"))
    request_id = raw_id

    if value.get("jsonrpc") != "2.0":
        return BadRequest(request_id, InvalidRequest('"jsonrpc" must be "2.0"'))
    method = value.get("method")
    if not isinstance(method, str) or not method:
        return BadRequest(request_id, InvalidRequest('"method" must be a non-empty string'))
    unknown = set(value) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        return BadRequest(request_id, InvalidRequest(f"unknown member(s): {', '.join(sorted(unknown))}"))
    params = value.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return BadRequest(request_id, InvalidRequest('"params" must be an object'))
    return Request(request_id, method, params, notification=not has_id)


# Made once: json.dumps with arguments builds a new encoder on every call.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dump(obj: dict[str, Any]) -> bytes:
    return (_encoder.encode(obj) + "\n").encode("ascii")


def encode_result(request_id: RequestId, result: Any) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "result": result})


def encode_error(request_id: RequestId, error: NecrodError) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "error": error.to_error_object()})


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    return _dump({"jsonrpc": "2.0", "method": method, "params": params})


def encode_request(request_id: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
