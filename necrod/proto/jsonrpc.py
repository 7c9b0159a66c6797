"""JSON-RPC 2.0 over newline-delimited JSON: decoding request lines, encoding replies.

Pure functions on bytes and values; the socket server is a thin shell around them.

The decoder is strict where Python's ``json`` is lenient (DESIGN.md, trap 8): it refuses
``NaN``/``Infinity``, duplicate keys, lone surrogates, numbers of more than 30 digits and deep
nesting, so that nothing it lets through can fail later when it is logged, stored or passed to
git. And it is cheap (issue 16, defect 7): orjson parses the line in C, with no Python called
per value; the method's size bound (``proto.methods.max_request_bytes``) is checked as soon as
the method is known, before anything else looks at the line; and the strict checks run on the
raw bytes with C-speed ``bytes`` operations (``_strict_problem``), not by walking the decoded
tree. BENCHMARKS.md has the measurement (``bench/decode.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from necrod.proto.errors import InvalidRequest, NecrodError, ParseError
from necrod.proto.methods import DEFAULT_MAX_REQUEST_BYTES, MAX_REQUEST_BYTES, max_request_bytes

#: Longest request line accepted, newline excluded (DESIGN.md: 1 MiB).
MAX_LINE_BYTES = 1 << 20

#: Nesting deeper than this is refused: no method takes more than a few levels.
MAX_DEPTH = 32

#: Numbers with more digits in a row than this are refused (integers beyond 64 bits would
#: silently become floats; nobody needs more digits than a double holds).
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


def _outside_strings(line: bytes) -> bytes:
    """The JSON text ``line`` (already parsed: it is valid) without its string literals.

    Escaped backslashes go first, then escaped quotes; every quote left opens or closes a
    string, so the even pieces between quotes are what lies outside them."""
    unescaped = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(unescaped.split(b'"')[::2])


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TOO_MANY_DIGITS = b"0" * (MAX_INT_DIGITS + 1)


def _too_deep(skeleton: bytes) -> bool:
    """Whether containers nest deeper than MAX_DEPTH: each pass removes the innermost ones."""
    brackets = skeleton.translate(_ONE_BRACKET, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _strict_problem(line: bytes, value: Any) -> str | None:
    """What trap 8 refuses that orjson lets through, found on the raw bytes: nesting deeper
    than MAX_DEPTH, overlong numbers, and duplicate keys (orjson keeps the last one silently:
    the source then has more ``key:`` pairs than the decoded value has members)."""
    skeleton = _outside_strings(line)
    if _too_deep(skeleton):
        return f"nesting deeper than {MAX_DEPTH} levels"
    if _TOO_MANY_DIGITS in skeleton.translate(_DIGITS_AS_ZERO):
        return f"a number has more than {MAX_INT_DIGITS} digits"
    if skeleton.count(b":") != _outside_strings(orjson.dumps(value)).count(b":"):
        return "duplicate key in an object"
    return None


def _decode_error(line: bytes, exc: orjson.JSONDecodeError) -> NecrodError:
    """orjson's refusal as our error kind: what is JSON but not allowed is ``invalid_request``,
    what is not JSON at all is ``parse_error``."""
    message = str(exc.msg)
    at = line[exc.pos : exc.pos + 8]
    if "surrogate" in message and "UTF-8" not in message:
        return InvalidRequest("string contains a lone surrogate")
    if "infinity" in message:
        return InvalidRequest("number out of range (JSON has no infinity)")
    if "depth" in message:
        return InvalidRequest(f"nesting deeper than {MAX_DEPTH} levels")
    if at.startswith((b"NaN", b"Infinity")):
        return InvalidRequest("NaN and Infinity are not allowed in requests")
    return ParseError(f"invalid JSON: {message} at column {exc.colno}")


def decode_json(line: bytes) -> Any:
    """Decode one line as strict JSON, raising ``ParseError`` or ``InvalidRequest``."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(line, exc) from None
    problem = _strict_problem(line, value)
    if problem is not None:
        raise InvalidRequest(problem)
    return value


def decode_request(line: bytes) -> Request | BadRequest:
    """Turn one request line (without its newline) into a ``Request`` or a ``BadRequest``."""
    if len(line) > DEFAULT_MAX_REQUEST_BYTES and not any(
        f'"{m}"'.encode() in line for m in MAX_REQUEST_BYTES
    ):
        # No method that takes this much is even named: not worth decoding.
        return BadRequest(
            None,
            InvalidRequest(
                f"request of {len(line)} bytes is over the {DEFAULT_MAX_REQUEST_BYTES}-byte limit "
                f"(only {', '.join(MAX_REQUEST_BYTES)} may be longer)",
                limit=DEFAULT_MAX_REQUEST_BYTES,
            ),
        )
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return BadRequest(None, _decode_error(line, exc))
    if isinstance(value, list):
        return BadRequest(None, InvalidRequest("batch requests are not supported"))
    if not isinstance(value, dict):
        return BadRequest(None, InvalidRequest("a request must be a JSON object"))
    method = value.get("method")
    if isinstance(method, str) and len(line) > (limit := max_request_bytes(method)):
        # Refused before the strict checks look at the rest: their cost grows with the line.
        return BadRequest(
            None,
            InvalidRequest(
                f"request of {len(line)} bytes is over the {limit}-byte limit of {method}", limit=limit
            ),
        )
    problem = _strict_problem(line, value)
    if problem is not None:
        return BadRequest(None, InvalidRequest(problem))

    has_id = "id" in value
    raw_id = value.get("id")
    request_id: RequestId = None
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int | None):
        return BadRequest(None, InvalidRequest("id must be a string, an integer or null"))
    request_id = raw_id

    if value.get("jsonrpc") != "2.0":
        return BadRequest(request_id, InvalidRequest('"jsonrpc" must be "2.0"'))
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


def dump_json(obj: Any, *, line: bool = False) -> bytes:
    """Compact JSON as UTF-8 (with ``line``, ending in a newline): orjson (a few microseconds
    where ``json`` costs tens on a reply or a slot row, the allocation path's largest encoder
    cost; 3 ms where it costs 31 for 10,000 tasks), else ``json`` for what orjson refuses: a
    lone surrogate (a path name git gave us undecodable), an integer beyond 64 bits."""
    try:
        return orjson.dumps(obj, option=_AS_LINE if line else orjson.OPT_NON_STR_KEYS)
    except TypeError:
        text = _encoder.encode(obj).encode("ascii")
        return text + b"\n" if line else text


_AS_LINE = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE


def _dump(obj: dict[str, Any]) -> bytes:
    return dump_json(obj, line=True)


def encode_result(request_id: RequestId, result: Any) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "result": result})


def encode_error(request_id: RequestId, error: NecrodError) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "error": error.to_error_object()})


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    return _dump({"jsonrpc": "2.0", "method": method, "params": params})


def encode_request(request_id: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
