"""``necrod mcp`` as an agent's MCP client meets it: the SDK's own client over stdio, spawning
``python -m necrod mcp --socket ...`` against a real daemon. A workspace is allocated, worked
in, kept alive, released with its work salvaged; a task is submitted, watched and its log
tailed; a session that ends releases its leases, one killed with -9 leaves them to the TTL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from necrod.mcpserver.tools import TOOLS
from tests.helpers import Necrod, pool_config, wait_for
from tests.sshhelpers import Keys, SSHHost

pytestmark = pytest.mark.anyio

PY = sys.executable


def config(origin: Path) -> str:
    runners = "runners:\n  local:\n    launcher: process\ndispatcher:\n  default_runner: local\n"
    return pool_config({"repo": origin}, slots=2, max_slots=2, min_idle=0) + runners


@asynccontextmanager
async def mcp_session(socket: Path | None, log: Path, *args: str) -> AsyncIterator[ClientSession]:
    where = ["--socket", str(socket)] if socket is not None else []
    server = StdioServerParameters(command=PY, args=["-m", "necrod", "mcp", *where, *args],
                                   env={"NECROD_LOG_LEVEL": "debug"})  # fmt: skip
    with log.open("a") as errlog:
        async with (
            stdio_client(server, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


async def call(session: ClientSession, name: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def error_of(session: ClientSession, name: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(name, arguments)
    assert result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    error: dict[str, Any] = result.structured_content["error"]
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(f"{error['kind']}: ") and "Traceback" not in text
    return error


def server_pid(socket: Path) -> int:
    """The ``necrod mcp`` this test process started for ``socket``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"mcp" in argv and str(socket).encode() in argv:
            return int(entry.name)
    raise AssertionError("no necrod mcp process found")


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def until(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """``wait_for`` without blocking the event loop the MCP client runs on."""
    return await anyio.to_thread.run_sync(lambda: wait_for(predicate, timeout, what=what))


def slot_of(d: Necrod, slot_id: str) -> dict[str, Any]:
    return next(s for s in d.call("slots.list", {"pool": "repo"})["slots"] if s["slot_id"] == slot_id)


def salvaged(d: Necrod, lease_id: str) -> dict[str, Any] | None:
    return next((s for s in d.call("salvage.list")["salvage"] if s["lease_id"] == lease_id), None)


@pytest.fixture
def d(necrod_factory: Callable[..., Necrod], origin: Path) -> Necrod:
    return necrod_factory(config(origin))


async def test_the_tools_are_listed_with_schemas_an_agent_can_read(d: Necrod, workdir: Path) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        listed = (await session.list_tools()).tools
    assert [t.name for t in listed] == [t.name for t in TOOLS]
    assert {t.name for t in listed} >= {"workspace_allocate", "workspace_release", "workspace_heartbeat",
                                        "workspace_status", "task_submit", "task_status", "task_logs",
                                        "task_cancel", "salvage_list", "salvage_show"}  # fmt: skip
    for tool in listed:
        assert tool.description and tool.input_schema["type"] == "object"
        assert all(p.get("description") for p in tool.input_schema["properties"].values()), tool.name
    allocate = next(t for t in listed if t.name == "workspace_allocate")
    assert allocate.input_schema["required"] == ["pool"]
    assert {"pool", "ref", "branch", "sparse", "ttl_s", "ports"} <= set(allocate.input_schema["properties"])


async def test_an_agent_allocates_works_is_kept_alive_and_releases_with_its_work_salvaged(
    d: Necrod, workdir: Path
) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        lease = await call(session, "workspace_allocate", pool="repo", ttl_s=2)
        assert {"path", "lease_id", "fencing_token", "ports", "commit", "slot_id"} <= set(lease)
        work = Path(lease["path"])
        (work / "agent-notes.txt").write_text("half done\n")
        (work / "README").write_text("edited by the agent\n")
        # Three TTLs without a word from the agent: the server's own heartbeats keep it.
        await anyio.sleep(6)
        beat = await call(session, "workspace_heartbeat", lease_id=lease["lease_id"], ttl_s=600)
        assert beat["ttl_s"] == 600 and beat["fencing_token"] == lease["fencing_token"]
        status = await call(session, "workspace_status")
        assert [(v["lease_id"], v["kept_alive"]) for v in status["leases"]] == [(lease["lease_id"], True)]
        (pool,) = status["pools"]
        assert pool["name"] == "repo" and pool["allocated"] == 1 and pool["max_slots"] == 2
        one = await call(session, "workspace_status", lease_id=lease["lease_id"])
        assert one["leases"][0]["path"] == lease["path"]

        released = await call(session, "workspace_release", lease_id=lease["lease_id"])
        ref = f"refs/necrod/salvage/{lease['lease_id']}"
        assert released["salvage_ref"] == ref and released["salvage_commit"] == released["salvaged"]["commit"]
        shown = await call(session, "salvage_show", lease_id=lease["lease_id"])
        assert shown["ref"] == ref and {"agent-notes.txt", "README"} <= {f["path"] for f in shown["files"]}
        listed = await call(session, "salvage_list", pool="repo")
        assert [s["lease_id"] for s in listed["salvage"]] == [lease["lease_id"]]
        assert (await call(session, "workspace_status"))["leases"] == []
        # The lease is over: the daemon says so in its stable kind.
        gone = await error_of(session, "workspace_heartbeat", lease_id=lease["lease_id"])
        assert gone["kind"] in ("not_found", "failed_precondition")
    assert not (work / "agent-notes.txt").exists()


async def test_a_task_is_submitted_watched_to_the_end_and_its_log_tailed(d: Necrod, workdir: Path) -> None:
    script = "import os\nfor i in range(3000): print('line', i)\nprint('done in', os.getcwd())"
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        submitted = await call(
            session, "task_submit", pool="repo", command=[PY, "-c", script], labels=["mcp"]
        )
        task_id = submitted["task_id"]
        done = await call(session, "task_status", task_id=task_id, wait_s=60)
        assert done["state"] == "succeeded" and done["attempts"][-1]["exit_code"] == 0
        path = done["attempts"][-1]["path"]
        tail = await call(session, "task_logs", task_id=task_id, max_bytes=200)
        assert tail["data"].endswith(f"line 2999\ndone in {path}\n") and len(tail["data"]) <= 200
        assert tail["truncated"] and tail["eof"] and tail["offset"] == tail["start"] + 200
        head = await call(session, "task_logs", task_id=task_id, offset=0, max_bytes=14)
        assert head["data"] == "line 0\nline 1\n" and head["offset"] == 14 and not head["truncated"]
        # A task that waits for nothing can be cancelled, with a reason.
        slow = await call(
            session, "task_submit", pool="repo", command=[PY, "-c", "import time; time.sleep(60)"]
        )
        await until(lambda: d.call("tasks.get", {"task_id": slow["task_id"]})["state"] == "running")
        await call(session, "task_cancel", task_id=slow["task_id"], reason="not needed", force=True)
        cancelled = await call(session, "task_status", task_id=slow["task_id"], wait_s=30)
        assert cancelled["state"] == "cancelled"


async def test_leases_outlive_a_daemon_restart_and_one_taken_away_is_reported_lost(
    d: Necrod, workdir: Path
) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        kept = await call(session, "workspace_allocate", pool="repo", ttl_s=3)
        taken = await call(session, "workspace_allocate", pool="repo", ttl_s=3)
        d.kill9()
        d.start()
        # Twice the TTL after the restart's grace began: the server found the daemon again.
        await anyio.sleep(7)
        assert slot_of(d, kept["slot_id"])["lease_id"] == kept["lease_id"]
        # An operator takes a slot away: the next heartbeat learns it, and the session says so.
        d.call("slots.remove", {"slot_id": taken["slot_id"], "force": True})
        status: dict[str, Any] | None = None
        for _ in range(50):
            status = await call(session, "workspace_status")
            if status["lost"]:
                break
            await anyio.sleep(0.2)
        assert status is not None
        assert [v["lease_id"] for v in status["leases"]] == [kept["lease_id"]]
        assert [lost["lease_id"] for lost in status["lost"]] == [taken["lease_id"]]
        gone = await error_of(session, "workspace_status", lease_id=taken["lease_id"])
        assert gone["kind"] == "failed_precondition" and gone["lease_id"] == taken["lease_id"]


async def test_a_session_that_ends_releases_what_it_allocated_salvaged_first(
    d: Necrod, workdir: Path
) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        lease = await call(session, "workspace_allocate", pool="repo")
        (Path(lease["path"]) / "unpushed.txt").write_text("work\n")
    # The client closed the server's stdin: the server released the lease before it exited.
    assert wait_for(lambda: salvaged(d, lease["lease_id"]), 30, what="the salvage")
    slot = wait_for(lambda: (s := slot_of(d, lease["slot_id"]))["state"] == "available" and s, 30)
    assert slot["lease_id"] is None and not (Path(lease["path"]) / "unpushed.txt").exists()
    assert '"lease_released_at_session_end"' in (workdir / "mcp.log").read_text()


async def test_sigterm_ends_the_session_and_releases_its_leases(d: Necrod, workdir: Path) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        lease = await call(session, "workspace_allocate", pool="repo")
        (Path(lease["path"]) / "unpushed.txt").write_text("work\n")
        pid = server_pid(d.socket)
        os.kill(pid, signal.SIGTERM)
        assert await until(lambda: salvaged(d, lease["lease_id"]), what="the salvage")
        await until(lambda: exited(pid), what="the server to exit")


async def test_a_session_killed_with_9_leaves_its_leases_to_the_ttl_salvaged_and_clean(
    d: Necrod, workdir: Path
) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        lease = await call(session, "workspace_allocate", pool="repo", ttl_s=2)
        (Path(lease["path"]) / "half-done.txt").write_text("work\n")
        os.kill(server_pid(d.socket), signal.SIGKILL)
        # Nothing released it: it is still held until its TTL runs out.
        assert slot_of(d, lease["slot_id"])["lease_id"] == lease["lease_id"]
    shown = wait_for(lambda: salvaged(d, lease["lease_id"]), 30, what="the TTL's salvage")
    assert shown["pool"] == "repo"
    files = d.call("salvage.show", {"lease_id": lease["lease_id"]})["files"]
    assert "half-done.txt" in {f["path"] for f in files}
    wait_for(lambda: slot_of(d, lease["slot_id"])["state"] == "available", 30)
    assert not (Path(lease["path"]) / "half-done.txt").exists()
    assert '"lease_released_at_session_end"' not in (workdir / "mcp.log").read_text()


async def test_a_new_session_picks_up_where_a_killed_one_stopped(d: Necrod, workdir: Path) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:
        lost = await call(session, "workspace_allocate", pool="repo", ttl_s=2)
        (Path(lost["path"]) / "half-done.txt").write_text("work\n")
        os.kill(server_pid(d.socket), signal.SIGKILL)
    wait_for(lambda: salvaged(d, lost["lease_id"]), 30, what="the TTL's salvage")
    async with mcp_session(d.socket, workdir / "mcp2.log") as session:
        lease = await call(session, "workspace_allocate", pool="repo", from_salvage=lost["lease_id"])
        assert lease["resumed_from"] == lost["lease_id"]
        assert (Path(lease["path"]) / "half-done.txt").read_text() == "work\n"


async def test_errors_are_the_daemons_stable_kinds(d: Necrod, workdir: Path) -> None:
    async with mcp_session(d.socket, workdir / "mcp.log") as session:

        async def kind(tool: str, **arguments: Any) -> str:
            return str((await error_of(session, tool, **arguments))["kind"])

        unknown = await error_of(session, "workspace_allocate", pool="no-such-pool")
        assert unknown["kind"] == "not_found" and "no-such-pool" in unknown["message"]
        assert await kind("workspace_allocate", pool="repo", colour="red") == "invalid_params"
        assert await kind("workspace_release") == "invalid_params"
        assert await kind("workspace_allocate", pool="repo", ttl_s=0) == "invalid_params"
        assert await kind("task_logs", task_id="t-nope", max_bytes=-1) == "invalid_params"
        assert await kind("task_status", task_id="t-nope") == "not_found"
        assert await kind("salvage_show", lease_id="l-0000000000000000") == "not_found"
        # The server's own bounds: an agent cannot make it read or wait without end.
        huge = await error_of(session, "task_logs", task_id="t-nope", max_bytes=1 << 30)
        assert huge["kind"] == "invalid_params" and huge["param"] == "max_bytes"
        forever = await error_of(session, "task_status", task_id="t-nope", wait_s=1e9)
        assert forever["kind"] == "invalid_params" and forever["param"] == "wait_s"
        assert await kind("workspace_release", lease_id="l-x", wait_s="soon") == "invalid_params"
        # Both slots taken: no free workspace is resource_exhausted at once.
        for _ in range(2):
            await call(session, "workspace_allocate", pool="repo")
        assert await kind("workspace_allocate", pool="repo") == "resource_exhausted"
    # No daemon at the socket: the tools say so, the server does not die.
    async with mcp_session(workdir / "none.sock", workdir / "mcp2.log") as session:
        assert (await error_of(session, "workspace_status"))["kind"] == "unreachable"
        assert (await error_of(session, "salvage_list"))["kind"] == "unreachable"


async def test_over_ssh_the_tools_reach_another_hosts_daemon(d: Necrod, workdir: Path) -> None:
    keys = Keys.make(workdir / "keys")
    host = SSHHost(workdir / "host", keys).start()
    try:
        known = host.known_hosts(workdir / "known_hosts")
        ssh = ["-H", host.url(d.socket), "--ssh-key", str(keys.client_key), "--known-hosts", str(known)]
        async with mcp_session(None, workdir / "mcp.log", *ssh) as session:
            lease = await call(session, "workspace_allocate", pool="repo")
            (Path(lease["path"]) / "remote-work.txt").write_text("work\n")
            status = await call(session, "workspace_status")
            assert [v["lease_id"] for v in status["leases"]] == [lease["lease_id"]]
            released = await call(session, "workspace_release", lease_id=lease["lease_id"])
            assert released["salvage_ref"] == f"refs/necrod/salvage/{lease['lease_id']}"
            assert (await error_of(session, "workspace_allocate", pool="nope"))["kind"] == "not_found"
        # A host key it does not know is refused, as necroctl refuses it.
        untrusted = ["-H", host.url(d.socket), "--ssh-key", str(keys.client_key), "--known-hosts", os.devnull]
        async with mcp_session(None, workdir / "mcp2.log", *untrusted) as session:
            assert (await error_of(session, "workspace_status"))["kind"] == "unreachable"
    finally:
        host.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_over_http_on_loopback_with_a_token_and_released_when_the_server_stops(
    d: Necrod, workdir: Path
) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    port, token = free_port(), "s3cret-token"
    url = f"http://127.0.0.1:{port}/mcp"
    with (workdir / "http.log").open("a") as log:
        server = subprocess.Popen(
            [PY, "-m", "necrod", "mcp", "--socket", str(d.socket), "--http", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, "NECROD_MCP_TOKEN": token},
        )  # fmt: skip
    try:
        async with httpx2.AsyncClient() as anonymous:

            async def answers() -> int:
                try:
                    return (await anonymous.post(url, json={})).status_code
                except httpx2.TransportError:
                    return 0

            with anyio.fail_after(30):
                while (status := await answers()) == 0:
                    await anyio.sleep(0.1)
            assert status == 401  # no token, no tools
            wrong = await anonymous.post(url, json={}, headers={"Authorization": "Bearer s3cret-tokeN"})
            assert wrong.status_code == 401
            # A page the agent's browser opened, rebinding a name of its own to 127.0.0.1: refused
            # even with the token (the SDK checks Host and Origin on loopback).
            rebinding = {"Authorization": f"Bearer {token}", "Host": f"evil.example:{port}"}
            assert (await anonymous.post(url, json={}, headers=rebinding)).status_code in (403, 421)
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            assert len((await session.list_tools()).tools) == len(TOOLS)
            lease = await call(session, "workspace_allocate", pool="repo", ttl_s=600)
            (Path(lease["path"]) / "over-http.txt").write_text("work\n")
        # The HTTP session ended, the server did not: the lease is still held and beating.
        assert slot_of(d, lease["slot_id"])["lease_id"] == lease["lease_id"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert await until(lambda: salvaged(d, lease["lease_id"]), what="the salvage")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def test_http_is_served_on_loopback_only() -> None:
    # 127.0.0.2 is loopback too, but the SDK checks Host and Origin only on the usual three.
    for address in (
        "0.0.0.0:8765",
        "192.168.1.10:8765",
        "[::]:8765",
        "example.com:8765",
        "127.0.0.1:0",
        "127.0.0.2:8765",
    ):
        done = subprocess.run([PY, "-m", "necrod", "mcp", "--http", address], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 2 and "--http" in done.stderr, (address, done.stderr)


def test_docs_list_every_tool_and_every_argument() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "mcp.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")
    }
    for tool in TOOLS:
        assert tool.name in rows, f"docs/mcp.md has no row for {tool.name}"
        arguments = rows[tool.name].split("|")[2]
        missing = [name for name in tool.properties if f"`{name}`" not in arguments]
        assert missing == [], f"docs/mcp.md does not list {tool.name}'s {missing}"


def test_without_the_sdk_the_command_names_the_extra_to_install() -> None:
    code = "import sys\nsys.modules['mcp'] = None\nfrom necrod.command import main\nsys.exit(main(['mcp']))\n"
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "pip install 'necrod[mcp]'" in done.stderr and done.stdout == ""
