"""Framing and dispatch, without sockets: every line gets a well-formed reply (or none, for a
notification), and the error kind a script would match on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from necrod.proto.errors import ERROR_KINDS, NotFound, error_from_object
from necrod.proto.jsonrpc import (
    MAX_DEPTH,
    BadRequest,
    Request,
    decode_request,
    dump_json,
    encode_error,
    encode_result,
)
from necrod.proto.router import CallContext, Peer, Router

pytestmark = pytest.mark.anyio


def ctx() -> CallContext:
    return CallContext(peer=Peer(pid=1, uid=0, gid=0), connection_id=1)


def kind_of(line: bytes) -> str:
    decoded = decode_request(line)
    assert isinstance(decoded, BadRequest), decoded
    return decoded.error.kind


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"not json", "parse_error"),
        (b'{"jsonrpc": "2.0", "method": "x"', "parse_error"),
        (b"\xff\xfe{}", "parse_error"),
        (b'{"jsonrpc":"2.0","method":"a\x00b","id":1}', "parse_error"),  # raw control char in a string
        (b"[]", "invalid_request"),
        (b'[{"jsonrpc":"2.0","method":"hello","id":1}]', "invalid_request"),
        (b"42", "invalid_request"),
        (b'"hello"', "invalid_request"),
        (b"null", "invalid_request"),
        (b'{"method":"hello","id":1}', "invalid_request"),
        (b'{"jsonrpc":"1.0","method":"hello","id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"","id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":7,"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":[1],"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","id":{"a":1}}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","id":true}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","id":1,"extra":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","id":1,"id":2}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":{"x":NaN},"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":{"x":Infinity},"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":{"x":-Infinity},"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":{"x":"\\ud800"},"id":1}', "invalid_request"),
        (b'{"jsonrpc":"2.0","method":"hello","params":{"x":' + b"9" * 5000 + b'},"id":1}', "invalid_request"),
    ],
)
def test_bad_lines_get_their_error_kind(line: bytes, kind: str) -> None:
    assert kind_of(line) == kind


def test_deep_nesting_is_refused_not_a_crash() -> None:
    for depth in (MAX_DEPTH + 5, 100_000):
        line = b'{"jsonrpc":"2.0","method":"x","id":1,"params":{"a":' + b"[" * depth + b"]" * depth + b"}}"
        assert kind_of(line) == "invalid_request"


def test_a_good_request_decodes() -> None:
    decoded = decode_request(b'{"jsonrpc":"2.0","method":"slots.allocate","params":{"pool":"p"},"id":"abc"}')
    assert decoded == Request("abc", "slots.allocate", {"pool": "p"})
    note = decode_request(b'{"jsonrpc":"2.0","method":"daemon.status"}')
    assert isinstance(note, Request) and note.notification and note.params == {}


def test_replies_are_one_line_of_utf8_json() -> None:
    line = encode_result(7, {"path": "/tmp/ü", "n": 1})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert "/tmp/ü".encode() in line
    assert json.loads(line) == {"jsonrpc": "2.0", "id": 7, "result": {"path": "/tmp/ü", "n": 1}}
    err = json.loads(encode_error(None, NotFound("no pool named 'x'", pool="x")))
    assert err["error"]["data"] == {"kind": "not_found", "pool": "x"}
    assert err["error"]["code"] == -32004


def test_what_orjson_refuses_is_still_answered() -> None:
    """A file name git gave us undecodable (a lone surrogate) and an integer beyond 64 bits
    still make a reply: escaped as the stdlib does, never a failed call."""
    line = encode_result(1, {"paths": ["bad\udcff.txt"], "n": 2**70, 3: "int key"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["result"] == {"paths": ["bad\udcff.txt"], "n": 2**70, "3": "int key"}
    assert dump_json({"kind": "slot", 1: [1.5, None]}) == b'{"kind":"slot","1":[1.5,null]}'


def test_error_objects_round_trip_to_the_same_class() -> None:
    for kind in ERROR_KINDS:
        from necrod.proto.errors import ERROR_CLASSES

        original = ERROR_CLASSES[kind]("message", detail=1)
        rebuilt = error_from_object(original.to_error_object())
        assert type(rebuilt) is type(original) and rebuilt.data == {"detail": 1}


async def test_dispatch_answers_every_outcome() -> None:
    d = Router()

    async def allocate(params: dict[str, Any], c: CallContext) -> Any:
        if params["pool"] == "missing":
            raise NotFound("no pool named 'missing'")
        if params["pool"] == "boom":
            raise RuntimeError("bug")
        return {"pool": params["pool"], "wait_s": params["wait_s"]}

    d.register("slots.allocate", allocate)

    async def reply(line: str) -> dict[str, Any]:
        raw = await d.handle_line(line.encode(), ctx())
        assert raw is not None
        return json.loads(raw)  # type: ignore[no-any-return]

    ok = await reply('{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"pool":"p"}}')
    assert ok["result"] == {"pool": "p", "wait_s": None}
    missing = await reply('{"jsonrpc":"2.0","id":2,"method":"slots.allocate","params":{"pool":"missing"}}')
    assert missing["error"]["data"]["kind"] == "not_found" and missing["id"] == 2
    crash = await reply('{"jsonrpc":"2.0","id":3,"method":"slots.allocate","params":{"pool":"boom"}}')
    assert crash["error"]["data"]["kind"] == "internal"
    unknown = await reply('{"jsonrpc":"2.0","id":4,"method":"slots.steal","params":{}}')
    assert unknown["error"]["data"]["kind"] == "method_not_found"
    for params, why in [
        ("{}", "required"),
        ('{"pool": 5}', "must be a string"),
        ('{"pool": "p", "wait_s": -1}', "at least"),
        ('{"pool": "p", "wait_s": "soon"}', "number"),
        ('{"pool": "p", "ttl_s": true}', "number"),
        ('{"pool": "p", "color": "red"}', "unknown parameter"),
        ('{"pool": "p", "metadata": [1]}', "object"),
    ]:
        bad = await reply(f'{{"jsonrpc":"2.0","id":5,"method":"slots.allocate","params":{params}}}')
        assert bad["error"]["data"]["kind"] == "invalid_params", params
        assert why in bad["error"]["message"], (params, bad["error"]["message"])
    assert (
        await d.handle_line(b'{"jsonrpc":"2.0","method":"slots.allocate","params":{"pool":"p"}}', ctx())
        is None
    )


async def test_restricted_connections_only_answer_operator_methods() -> None:
    d = Router()

    async def status(params: dict[str, Any], c: CallContext) -> Any:
        return {"ok": True}

    async def allocate(params: dict[str, Any], c: CallContext) -> Any:
        return {}

    d.register("daemon.status", status)
    d.register("slots.allocate", allocate)
    c = ctx()
    c.only_methods = frozenset({"daemon.status"})
    ok = json.loads(await d.handle_line(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}', c) or b"")
    assert ok["result"] == {"ok": True}
    refused = json.loads(
        await d.handle_line(b'{"jsonrpc":"2.0","id":2,"method":"slots.allocate","params":{"pool":"p"}}', c)
        or b""
    )
    assert refused["error"]["data"]["kind"] == "resource_exhausted"
