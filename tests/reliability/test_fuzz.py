"""Property-based fuzzing of the framing, the envelope and every method's params (hypothesis).

One daemon serves every example, each on a new connection. The property: every line gets a
well-formed JSON-RPC reply whose error kind is one of the closed set (and never ``internal``: that
would be a bug), or none for a notification, or the connection is closed cleanly; then the daemon
serves the next client. NECROD_LONG=1 runs more than 10,000 examples in all.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from necrod.proto.errors import ERROR_CLASSES
from necrod.proto.methods import METHODS, Param
from tests.helpers import Necrod
from tests.reliability.conftest import FIGURES, Raw, daemon_config, scaled

pytestmark = pytest.mark.reliability

#: Examples per property: four properties, so over 10,000 in the long run.
EXAMPLES = scaled(300, 3000)

CODES = {cls.kind: cls.code for cls in ERROR_CLASSES.values() if cls.kind != "unreachable"}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)


class Target:
    """The shared daemon, with names a fuzzer could not guess: a real lease, real slots."""

    def __init__(self, d: Necrod) -> None:
        self.d = d
        with d.client() as c:
            self.lease = c.allocate("repo", ttl_s=3600, holder="fuzz-target")["lease_id"]
        self.sentinels = 0


@pytest.fixture(scope="module")
def target(module_daemon: Callable[..., Necrod]) -> Target:
    d = module_daemon(
        lambda origin: daemon_config(
            {"repo": origin}, {"read_timeout_s": 2}, slots=2, max_slots=4, min_idle=0, lease_ttl_s=5
        )
    )
    return Target(d)


def check_reply(reply: dict[str, Any], id: Any) -> None:
    assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", reply
    if "method" in reply and "id" not in reply:
        return  # an event notification (after an events.subscribe)
    assert "id" in reply, reply
    if id is not ...:
        assert reply["id"] == id or reply["id"] is None, (reply, id)
    FIGURES["fuzz replies: " + ("error" if "error" in reply else "result")] += 1
    if "error" in reply:
        assert set(reply) == {"jsonrpc", "id", "error"}, reply
        error = reply["error"]
        kind = error["data"]["kind"]
        assert kind in CODES, reply
        assert kind != "internal", f"the daemon hit a bug: {reply}"
        assert error["code"] == CODES[kind] and isinstance(error["message"], str), reply
    else:
        assert set(reply) == {"jsonrpc", "id", "result"}, reply


def exchange(t: Target, data: bytes, id: Any = ...) -> int:
    """Send ``data`` then a sentinel request; check every reply up to the sentinel's. Returns the
    number of replies. A connection the daemon closes must leave it serving a new one."""
    t.sentinels += 1
    FIGURES["fuzz inputs"] += 1
    sentinel = f"sentinel-{t.sentinels}"
    replies = 0
    with Raw(t.d.socket, timeout=30) as conn:
        try:
            conn.send(
                data
                + b"\n"
                + json.dumps({"jsonrpc": "2.0", "id": sentinel, "method": "hello"}).encode()
                + b"\n"
            )
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            reply = conn.line()
            if reply is None:
                break  # closed cleanly (an over-long line, or the read deadline)
            if reply.get("id") == sentinel:
                assert "result" in reply, reply
                return replies
            check_reply(reply, id)
            replies += 1
    with Raw(t.d.socket, timeout=30) as fresh:
        reply = fresh.ask(json.dumps({"jsonrpc": "2.0", "id": sentinel, "method": "hello"}).encode() + b"\n")
        assert reply is not None and "result" in reply, "the daemon stopped serving"
    return replies


# --- strategies ---------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def plausible(t: Target, name: str, spec: Param, typed_only: bool) -> st.SearchStrategy[Any]:
    """Values a real client might send for this parameter, right or slightly wrong."""
    names: dict[str, st.SearchStrategy[Any]] = {
        "pool": st.sampled_from(["repo", "nope", "-x", "..", "repo/..", "", "a" * 65]),
        "lease_id": st.sampled_from([t.lease, "l-0", "../x", "-rf", "", "l-" + "f" * 200]),
        "slot_id": st.sampled_from(["repo/1", "repo/2", "repo/99", "repo/0", "repo/-1", "repo", "/1", "x/1"]),
        "ref": st.sampled_from(["main", "HEAD", "origin/main", "no-such", "--upload-pack=x", "a..b", "@{1}"]),
        "branch": st.sampled_from(["fuzz", "HEAD", "refs/heads/x", "-D", "a b", "x.lock"]),
        "state": st.sampled_from([*("creating", "available", "allocated", "cleaning", "error"), "zombie"]),
        "topics": st.lists(
            st.sampled_from(["slots", "leases", "pools", "config", "daemon", "nope"]), max_size=3
        ),
    }
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "string": st.text(max_size=80),
        "integer": st.integers(min_value=-5, max_value=1 << 40),
        "number": st.floats(min_value=-10, max_value=1e7, allow_nan=False) | st.integers(-5, 10),
        "boolean": st.booleans(),
        "object": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "strings": st.lists(st.text(max_size=10), max_size=4),
        "list": st.lists(json_values, max_size=4),
    }
    if name == "command":
        # Commands a task would run: only ones that do nothing, whatever shape they come in.
        return st.sampled_from([["true"], "true", ["/bin/true", "--", "-x"], [], "", 7, None, {"sh": "true"}])
    typed = by_type.get(spec.type, json_values)  # "any", or a type added after this was written
    if typed_only:  # names that exist and values of the right type: calls that reach the engine
        return st.one_of(names[name], names[name], typed) if name in names else typed
    return st.one_of(names.get(name, typed), typed, json_values)


@st.composite
def method_calls(draw: st.DrawFn, t: Target) -> dict[str, Any]:
    method = draw(st.sampled_from(sorted(METHODS)))
    params: dict[str, Any] = {}
    typed_only = draw(st.integers(0, 9)) < 7
    for name, spec in METHODS[method].items():
        if draw(st.integers(0, 9)) < (9 if spec.required else 4):
            params[name] = draw(plausible(t, name, spec, typed_only))
    if not typed_only and draw(st.booleans()):
        params[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    # Keep every call short: a queued allocation or a slot creation may wait at most a moment.
    for bounded in ("wait_s",):
        if (
            bounded in params
            and isinstance(params[bounded], int | float)
            and not isinstance(params[bounded], bool)
        ):
            params[bounded] = min(params[bounded], 0.2)
    if method == "slots.allocate":
        params["ttl_s"] = 2  # what the fuzzer holds comes back soon
    return {
        "jsonrpc": "2.0",
        "id": draw(st.integers(0, 1 << 31) | st.text(max_size=12)),
        "method": method,
        "params": params,
    }


envelopes = st.dictionaries(
    st.sampled_from(["jsonrpc", "id", "method", "params", "extra", "ID", "Method"]),
    st.one_of(
        json_values,
        st.sampled_from(["2.0", "hello", "daemon.status", "pools.list", "slots.list"]),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    ),
)


def mutate(data: bytes, rng: random.Random, edits: int) -> bytes:
    b = bytearray(data)
    for _ in range(edits):
        op = rng.randrange(4)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[min(pos, len(b) - 1)]
        elif op == 1:
            b.insert(pos, rng.randrange(256))
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        else:
            b[pos:pos] = rng.choice(
                [b"\\u", b"\\ud800", b"[", b"{", b"}", b'"', b"\x00", b"1e999", b"NaN", b"\r"]
            )
    return bytes(b)


# --- properties ------------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=st.data())
def test_any_call_to_any_method_gets_a_well_formed_reply(target: Target, data: st.DataObject) -> None:
    call = data.draw(method_calls(target))
    line = json.dumps(call).encode()
    exchange(target, line, call["id"])


@FUZZ_SETTINGS
@given(envelope=envelopes)
def test_any_envelope_gets_a_well_formed_reply_or_none(target: Target, envelope: dict[str, Any]) -> None:
    exchange(target, json.dumps(envelope).encode())


@FUZZ_SETTINGS
@given(seed=st.integers(0, 1 << 32), edits=st.integers(1, 8), data=st.data())
def test_mutated_request_lines_never_confuse_the_framing(
    target: Target, seed: int, edits: int, data: st.DataObject
) -> None:
    call = data.draw(method_calls(target))
    lines = mutate(json.dumps(call).encode(), random.Random(seed), edits)
    exchange(target, lines)


@FUZZ_SETTINGS
@given(
    chunks=st.lists(
        st.binary(max_size=200) | st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
        min_size=1,
        max_size=6,
    )
)
def test_arbitrary_bytes_get_errors_or_a_clean_close(target: Target, chunks: list[bytes]) -> None:
    exchange(target, b"\n".join(chunks))
