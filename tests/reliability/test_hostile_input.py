"""Hostile bytes on the socket, one class of bad input per test case.

Every input gets a well-formed JSON-RPC reply (an error whose ``data.kind`` says what was wrong),
no reply for a notification, or a clean close; after each, the same daemon serves the next
client. The last test sends every class a hundred times and watches the daemon's memory.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from necrod.client import Client
from necrod.proto.jsonrpc import MAX_LINE_BYTES
from necrod.proto.methods import DEFAULT_MAX_REQUEST_BYTES, METHODS
from tests.helpers import Necrod
from tests.reliability.conftest import FIGURES, Raw, daemon_config, request, rss_kb, scaled

pytestmark = pytest.mark.reliability

MB = 1 << 20
#: Passes of every class in the memory test (each pass sends ~25 MB and ~1,500 requests).
MEMORY_PASSES = scaled(25, 100)


@pytest.fixture(scope="module")
def daemon(module_daemon: Callable[..., Necrod]) -> Necrod:
    return module_daemon(lambda origin: daemon_config({"repo": origin}, slots=2, max_slots=4, min_idle=0))


@pytest.fixture(scope="module")
def bystander(daemon: Necrod) -> Iterator[Client]:
    """A well-behaved client connected through everything: it must be served after every class."""
    with daemon.client(timeout=30) as c:
        yield c


# --- what replies must look like -----------------------------------------------------------------


def assert_error(reply: dict[str, Any] | None, kind: str, id: Any = None) -> None:
    assert reply is not None, f"expected a {kind} error, the daemon closed the connection"
    assert set(reply) == {"jsonrpc", "id", "error"}, reply
    assert reply["jsonrpc"] == "2.0" and reply["id"] == id, reply
    error = reply["error"]
    assert isinstance(error["code"], int) and isinstance(error["message"], str) and error["message"]
    assert error["data"]["kind"] == kind, reply


def assert_result(reply: dict[str, Any] | None, id: Any) -> dict[str, Any]:
    assert reply is not None, "expected a result, the daemon closed the connection"
    assert set(reply) == {"jsonrpc", "id", "result"}, reply
    assert reply["jsonrpc"] == "2.0" and reply["id"] == id
    return reply["result"]  # type: ignore[no-any-return]


def still_serves(conn: Raw) -> None:
    assert_result(conn.ask(request("hello", {"client": "after"}, id="next")), "next")


def errors_then_serves(d: Necrod, lines: list[bytes], kind: str, id: Any = None) -> None:
    """Each line on one connection gets ``kind``; the connection then still works."""
    with Raw(d.socket) as conn:
        for line in lines:
            assert_error(conn.ask(line), kind, id)
        still_serves(conn)


def send_in_background(conn: Raw, data: bytes) -> threading.Thread:
    """Send ``data`` from a thread; the daemon may stop reading part-way, and that is fine."""

    def send() -> None:
        try:
            conn.sock.sendall(data)
        except OSError:
            pass

    t = threading.Thread(target=send)
    t.start()
    return t


def valid(method: str = "hello", params: dict[str, Any] | None = None, id: Any = 1) -> bytes:
    return request(method, params if params is not None else {"client": "x"}, id=id)


# --- the classes of bad input ---------------------------------------------------------------------


def line_just_over_the_limit(d: Necrod) -> None:
    head = b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"'
    line = head + b"x" * (MAX_LINE_BYTES + 1 - len(head) - 3) + b'"}}'
    assert len(line) == MAX_LINE_BYTES + 1
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, line + b"\n" + valid(id=2))
        assert_error(conn.line(), "invalid_request")
        assert conn.line() is None, "a request after an over-long line was answered"
        sender.join(30)


def line_exactly_at_the_limit(d: Necrod) -> None:
    # A whole 1 MiB line is framed (the connection stays usable), but hello takes at most its
    # method's bound (issue 16 #7: only tasks.submit may be that large); at that bound it answers.
    body = valid(id="edge").rstrip(b"\n")
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, body + b" " * (MAX_LINE_BYTES - len(body)) + b"\n")
        reply = conn.line()
        assert_error(reply, "invalid_request")
        assert reply is not None and reply["error"]["data"]["limit"] == DEFAULT_MAX_REQUEST_BYTES
        sender.join(30)
        conn.send(body + b" " * (DEFAULT_MAX_REQUEST_BYTES - len(body)) + b"\n")
        assert_result(conn.line(), "edge")
        still_serves(conn)


def ten_megabyte_line(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, b'{"jsonrpc":"2.0","id":1,"method":"' + b"a" * (10 * MB))
        reply = conn.line()
        assert_error(reply, "invalid_request")
        assert reply is not None and "longer than" in reply["error"]["message"]
        assert conn.closed_by_peer(30)
        sender.join(30)


def ten_megabyte_line_then_a_request(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, b"[" + b"1," * (5 * MB) + b"1]\n" + valid(id=2))
        assert_error(conn.line(), "invalid_request")
        assert conn.line() is None
        sender.join(30)


def invalid_utf8(d: Necrod) -> None:
    errors_then_serves(
        d,
        [b'{"jsonrpc":"2.0","id":1,"method":"hello\xff"}\n', b"\xfe\xff\n", b'{"a":"\x80\x80"}\n'],
        "parse_error",
    )


def overlong_utf8(d: Necrod) -> None:
    errors_then_serves(d, [b'{"jsonrpc":"2.0","id":1,"method":"\xc0\xaf"}\n'], "parse_error")


def utf8_encoded_surrogate(d: Necrod) -> None:
    errors_then_serves(
        d, [b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"\xed\xa0\x80"}}\n'], "parse_error"
    )


def raw_nul_bytes(d: Necrod) -> None:
    errors_then_serves(
        d, [b'{"jsonrpc":"2.0",\x00"id":1,"method":"hello"}\n', b"\x00\x00\x00\n", b'"\x00"\n'], "parse_error"
    )


def escaped_nul_in_names(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        for method, params in [
            ("slots.allocate", {"pool": "repo\u0000"}),
            ("slots.heartbeat", {"lease_id": "l-\u0000"}),
            ("slots.remove", {"slot_id": "repo/\u00001"}),
            ("slots.allocate", {"pool": "repo", "ref": "main\u0000"}),
            ("salvage.show", {"lease_id": "\u0000"}),
        ]:
            assert_error(conn.ask(request(method, params, id=7)), "invalid_params", 7)
        still_serves(conn)


def lone_surrogates(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"\\ud800"}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"\\udfff x"}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"\\udc00":1}}\n',
            b'{"jsonrpc":"2.0","id":"\\ud83d","method":"hello"}\n',
        ],
        "invalid_request",
    )


def deep_arrays(d: Necrod) -> None:
    errors_then_serves(d, [b"[" * 100_000 + b"]" * 100_000 + b"\n"], "invalid_request")


def deep_objects(d: Necrod) -> None:
    errors_then_serves(d, [b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n"], "invalid_request")


def deep_unclosed(d: Necrod) -> None:
    errors_then_serves(
        d, [b'{"jsonrpc":"2.0","id":1,"method":"hello","params":' + b"[" * 100_000 + b"\n"], "invalid_request"
    )


def nesting_just_over_the_limit(d: Necrod) -> None:
    metadata: Any = 1
    for _ in range(40):
        metadata = {"k": metadata}
    errors_then_serves(d, [valid("slots.list", {"pool": "repo", "state": [metadata]})], "invalid_request")


def five_thousand_digit_integer(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"hello"}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":-' + b"1" * 5000 + b"}}\n",
        ],
        "invalid_request",
    )


def five_thousand_digit_fraction(d: Necrod) -> None:
    errors_then_serves(
        d,
        [b'{"jsonrpc":"2.0","id":1,"method":"slots.list","params":{"x":0.' + b"1" * 5000 + b"}}\n"],
        "invalid_request",
    )


def numbers_beyond_a_double(d: Necrod) -> None:
    # 1e999 is Infinity by another name: refused like Infinity, or refused as a parameter.
    for text in (b"1e999", b"-1e999", b"1E+400"):
        with Raw(d.socket) as conn:
            line = (
                b'{"jsonrpc":"2.0","id":3,"method":"slots.heartbeat","params":{"lease_id":"l-1","ttl_s":'
                + text
            )
            reply = conn.ask(line + b"}}\n")
            assert reply is not None and reply["error"]["data"]["kind"] in (
                "invalid_request",
                "invalid_params",
            )
            still_serves(conn)


def metadata_beyond_a_double(d: Necrod) -> None:
    # Stored with a lease, where nothing may later fail to encode it: refused at the door.
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":4,"method":"slots.allocate",'
            b'"params":{"pool":"repo","ttl_s":1,"metadata":{"x":1e999}}}\n'
        ],
        "invalid_request",  # refused while decoding, like NaN: the id is null, as JSON-RPC 2.0 says
    )


def nan_and_infinity(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":NaN}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":Infinity}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":-Infinity}}\n',
            b'{"jsonrpc":"2.0","id":NaN,"method":"hello"}\n',
        ],
        "invalid_request",
    )


def duplicate_keys(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":1,"method":"hello","method":"daemon.status"}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"pool":"repo","pool":"other"}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"a","client":"a"}}\n',
            b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"hello"}\n',
        ],
        "invalid_request",
    )


def non_object_json(d: Necrod) -> None:
    errors_then_serves(
        d,
        [b'"hello"\n', b"42\n", b"null\n", b"true\n", b"false\n", b"-0.5e3\n", b'"\\u0000"\n'],
        "invalid_request",
    )


def batches(d: Necrod) -> None:
    errors_then_serves(d, [b"[]\n", b"[" + valid().rstrip(b"\n") + b"]\n", b"[1,2,3]\n"], "invalid_request")


def broken_envelopes(d: Necrod) -> None:
    lines = [
        (b'{"jsonrpc":"1.0","id":1,"method":"hello"}\n', 1),
        (b'{"id":1,"method":"hello"}\n', 1),
        (b'{"jsonrpc":2.0,"id":1,"method":"hello"}\n', 1),
        (b'{"jsonrpc":"2.0","id":1}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":42}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":""}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"hello","extra":true}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":[1]}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":"x"}\n', 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":7}\n', 1),
        (b"{}\n", None),
    ]
    with Raw(d.socket) as conn:
        for line, id in lines:
            assert_error(conn.ask(line), "invalid_request", id)
        still_serves(conn)


def ids_of_the_wrong_type(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":{"a":1},"method":"hello"}\n',
            b'{"jsonrpc":"2.0","id":[1],"method":"hello"}\n',
            b'{"jsonrpc":"2.0","id":1.5,"method":"hello"}\n',
            b'{"jsonrpc":"2.0","id":true,"method":"hello"}\n',
        ],
        "invalid_request",
    )


def a_thousand_pipelined_requests(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, b"".join(valid(id=i) for i in range(1000)))
        for i in range(1000):
            assert_result(conn.line(), i)
        sender.join(30)


def pipelined_mix_with_notifications(d: Necrod) -> None:
    lines = []
    expected: list[tuple[Any, str | None]] = []
    for i in range(300):
        match i % 5:
            case 0:
                lines.append(valid(id=i))
                expected.append((i, None))
            case 1:
                lines.append(b'{"jsonrpc":"2.0","method":"daemon.status"}\n')  # notification: no reply
            case 2:
                lines.append(b"{nope\n")
                expected.append((None, "parse_error"))
            case 3:
                lines.append(b'{"jsonrpc":"2.0","method":"no.such.method","params":{}}\n')  # no reply
            case 4:
                lines.append(request("no.such", {}, id=f"m{i}"))
                expected.append((f"m{i}", "method_not_found"))
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, b"".join(lines))
        for id, kind in expected:
            if kind is None:
                assert_result(conn.line(), id)
            else:
                assert_error(conn.line(), kind, id)
        sender.join(30)
        still_serves(conn)


def half_closed_socket(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        conn.send(valid("daemon.status", {}, id="half") + valid(id="second"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert_result(conn.line(), "half")
        assert_result(conn.line(), "second")
        assert conn.line() is None


def last_request_without_newline(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        conn.send(valid(id="no-newline").rstrip(b"\n"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert_result(conn.line(), "no-newline")
        assert conn.line() is None


def client_vanishes_mid_line(d: Necrod) -> None:
    for _ in range(3):
        conn = Raw(d.socket)
        conn.send(b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"po')
        # RST instead of FIN: the rudest way to go.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def client_vanishes_after_a_request(d: Necrod) -> None:
    for method, params in [
        ("slots.allocate", {"pool": "repo", "ttl_s": 1, "holder": "vanished"}),
        ("daemon.status", {}),
        ("slots.list", {}),
    ]:
        conn = Raw(d.socket)
        conn.send(request(method, params, id=1))
        conn.close()


def byte_order_mark(d: Necrod) -> None:
    errors_then_serves(d, [b"\xef\xbb\xbf" + valid()], "parse_error")


def crlf_line_endings(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        assert_result(conn.ask(valid(id="crlf").rstrip(b"\n") + b"\r\n"), "crlf")


def raw_control_characters(d: Necrod) -> None:
    errors_then_serves(
        d,
        [
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"a\tb"}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"a\x1bb"}}\n',
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"a\rb"}}\n',
        ],
        "parse_error",
    )


def blank_lines(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        conn.send(b"\n\n   \n\t\n\r\n" * 100)
        assert_result(conn.ask(valid(id="after-blanks")), "after-blanks")


def unknown_methods(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        for name in (
            "no.such",
            "../../etc/passwd",
            "__init__",
            "HELLO",
            "hello ",
            "daemon.status\n",
            "x" * 10_000,
        ):
            assert_error(conn.ask(request(name, {}, id=5)), "method_not_found", 5)
        still_serves(conn)


WRONG_VALUES: dict[str, list[Any]] = {
    "string": [7, True, [], {}, 1.5],
    "integer": ["1", 1.5, True, [], {}],
    "number": ["1", True, [], {}],
    "boolean": ["true", 1, 0, [], {}],
    "object": ["{}", 1, [], True],
    "strings": ["a", [1], [None], {}, 1],
    "list": ["a", {}, 1],
}


def wrong_param_types_for_every_method(d: Necrod) -> None:
    lines = []
    for method, params in METHODS.items():
        for name, spec in params.items():
            for value in WRONG_VALUES.get(spec.type, []):  # "any" has no wrong value
                lines.append(request(method, {name: value}, id=f"{method}:{name}"))
    with Raw(d.socket) as conn:
        sender = send_in_background(conn, b"".join(lines))
        for line in lines:
            id = json.loads(line)["id"]
            assert_error(conn.line(), "invalid_params", id)
        sender.join(30)
        still_serves(conn)


def unknown_params_for_every_method(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        for method in METHODS:
            assert_error(conn.ask(request(method, {"surprise": 1}, id=method)), "invalid_params", method)
        still_serves(conn)


def values_out_of_range(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        for method, params in [
            ("slots.allocate", {"pool": "repo", "ttl_s": 0}),
            ("slots.allocate", {"pool": "repo", "ttl_s": -1}),
            ("slots.allocate", {"pool": "repo", "wait_s": 3601}),
            ("slots.allocate", {"pool": "repo", "holder": "h" * 1025}),
            ("slots.allocate", {"pool": "repo", "ref": "r" * 4097}),
            ("slots.allocate", {"pool": "repo", "metadata": {"blob": "m" * 20_000}}),
            ("slots.list", {"state": "zombie"}),
            ("events.subscribe", {"since": -1}),
            ("events.subscribe", {"topics": ["nope"]}),
            ("hello", {"protocol": -1}),
            ("slots.heartbeat", {"lease_id": "l-1", "ttl_s": 1e300}),
        ]:
            assert_error(conn.ask(request(method, params, id=9)), "invalid_params", 9)
        still_serves(conn)


def an_http_request(d: Necrod) -> None:
    with Raw(d.socket) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: necrod\r\nUpgrade: websocket\r\n\r\n")
        for _ in range(3):
            assert_error(conn.line(), "parse_error")
        still_serves(conn)


def random_binary_garbage(d: Necrod) -> None:
    rng = random.Random(7)
    lines = [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b"") for _ in range(50)
    ]
    lines = [line for line in lines if line.strip()]
    with Raw(d.socket) as conn:
        conn.send(b"\n".join(lines) + b"\n")
        for _ in lines:
            reply = conn.line()
            assert reply is not None and reply["error"]["data"]["kind"] in ("parse_error", "invalid_request")
        still_serves(conn)


def unsupported_protocol(d: Necrod) -> None:
    errors_then_serves(d, [valid("hello", {"protocol": 2}, id=3)], "unsupported_protocol", 3)


def connect_and_close_storm(d: Necrod) -> None:
    for i in range(200):
        conn = Raw(d.socket)
        if i % 2:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def a_huge_id(d: Necrod) -> None:
    # An id counts against its method's size bound (issue 16 #7): up to it, it is echoed whole.
    big = "i" * (DEFAULT_MAX_REQUEST_BYTES - 100)
    with Raw(d.socket) as conn:
        assert_result(conn.ask(valid("daemon.status", {}, id=big)), big)
        assert_error(conn.ask(valid("daemon.status", {}, id="i" * 500_000)), "invalid_request")
        still_serves(conn)


CLASSES: dict[str, Callable[[Necrod], None]] = {
    f.__name__.replace("_", "-"): f
    for f in [
        line_just_over_the_limit,
        line_exactly_at_the_limit,
        ten_megabyte_line,
        ten_megabyte_line_then_a_request,
        invalid_utf8,
        overlong_utf8,
        utf8_encoded_surrogate,
        raw_nul_bytes,
        escaped_nul_in_names,
        lone_surrogates,
        deep_arrays,
        deep_objects,
        deep_unclosed,
        nesting_just_over_the_limit,
        five_thousand_digit_integer,
        five_thousand_digit_fraction,
        numbers_beyond_a_double,
        metadata_beyond_a_double,
        nan_and_infinity,
        duplicate_keys,
        non_object_json,
        batches,
        broken_envelopes,
        ids_of_the_wrong_type,
        a_thousand_pipelined_requests,
        pipelined_mix_with_notifications,
        half_closed_socket,
        last_request_without_newline,
        client_vanishes_mid_line,
        client_vanishes_after_a_request,
        byte_order_mark,
        crlf_line_endings,
        raw_control_characters,
        blank_lines,
        unknown_methods,
        wrong_param_types_for_every_method,
        unknown_params_for_every_method,
        values_out_of_range,
        an_http_request,
        random_binary_garbage,
        unsupported_protocol,
        connect_and_close_storm,
        a_huge_id,
    ]
}


@pytest.mark.parametrize(
    "name",
    CLASSES,
)
def test_bad_input_gets_a_structured_error_or_a_clean_close(
    daemon: Necrod, bystander: Client, name: str
) -> None:
    FIGURES["hostile input classes"] += 1
    CLASSES[name](daemon)
    status = bystander.status()
    assert status["state"] in ("running", "degraded") and status["pid"] == daemon.proc.pid  # type: ignore[union-attr]


def run_every_class(d: Necrod) -> None:
    for f in CLASSES.values():
        f(d)


@pytest.mark.timeout(600)
def test_memory_stays_flat_over_many_passes_of_every_class(daemon: Necrod, bystander: Client) -> None:
    pid = daemon.proc.pid  # type: ignore[union-attr]
    run_every_class(daemon)  # warm-up: caches, buffers and the allocator's arenas fill once
    before = rss_kb(pid)
    started = time.monotonic()
    for _ in range(MEMORY_PASSES):
        run_every_class(daemon)
    after = rss_kb(pid)
    assert bystander.status()["pid"] == pid
    print(
        f"\nhostile input: {MEMORY_PASSES} passes of {len(CLASSES)} classes "
        f"in {time.monotonic() - started:.0f}s, "
        f"RSS {before} kB -> {after} kB ({(after - before) / 1024:+.1f} MB)"
    )
    FIGURES["hostile input passes (all classes)"] += MEMORY_PASSES
    FIGURES["daemon RSS growth over those passes (kB)"] = after - before
    assert after - before < 10 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MB"
