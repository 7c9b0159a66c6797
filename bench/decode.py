"""Issue 16, defect 7: what decoding one 1 MB request line costs, before and after orjson.

``before`` is the decoder necrod had until then, kept here verbatim in spirit: the stdlib
``json`` with a Python callback per number and per object (to refuse NaN, long numbers and
duplicate keys), then a walk of the whole tree for lone surrogates and depth. ``after`` is
``necrod.proto.jsonrpc.decode_request``: orjson in C, the method's size bound, and the strict
checks on the raw bytes. Both decode the same valid ``tasks.submit`` lines (the one method
allowed that large), of four shapes, and the table gives medians and the ratio.

    .venv/bin/python -m bench.decode
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from necrod.proto.jsonrpc import BadRequest, decode_request


def _reject(name: str) -> Any:
    raise ValueError(name)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 30:
        raise ValueError(text)
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if len(text) > 64 or math.isinf(value):
        raise ValueError(text)
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(key)
        obj[key] = value
    return obj


_BEFORE = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_reject, parse_int=_int, parse_float=_float, strict=True
)


def _walk(value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("deep")
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, depth + 1)
            _walk(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk(item, depth + 1)


def before(line: bytes) -> Any:
    value = _BEFORE.decode(line.decode("utf-8"))
    _walk(value)
    return value


def after(line: bytes) -> Any:
    decoded = decode_request(line)
    assert not isinstance(decoded, BadRequest), decoded.error.message
    return decoded


def _line(params: dict[str, Any]) -> bytes:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tasks.submit", "params": {"pool": "p", **params}}
    return json.dumps(body, separators=(",", ":")).encode()


SHAPES: dict[str, bytes] = {
    "numbers": _line({"payload": list(range(150_000))}),
    "objects": _line({"payload": [{"n": i} for i in range(80_000)]}),
    "strings": _line({"payload": ["ten chars!"] * 70_000}),
    "one string": _line({"body": "x" * 1_000_000}),
}


def _median_ms(decode: Callable[[bytes], Any], line: bytes, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        decode(line)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(rounds: int = 15) -> None:
    print(f"{'shape':<12} {'bytes':>9} {'before ms':>10} {'after ms':>9} {'ratio':>6}")
    for name, line in SHAPES.items():
        old = _median_ms(before, line, rounds)
        new = _median_ms(after, line, rounds)
        print(f"{name:<12} {len(line):>9} {old:>10.1f} {new:>9.1f} {old / new:>5.1f}x")


if __name__ == "__main__":
    main()
