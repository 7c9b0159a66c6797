"""A container run against an engine that misbehaves the way podman's does now and then.

The real engine (tests/test_containers*.py) cannot be made to do these on demand, so the engine
here is a stand-in: its ``wait`` answers while the container still runs, and its log stream
stops sending before the end and never closes (podman's follow misses a short-lived container's
end). What the attempt gets must not change: the real exit status and all of the output, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from necrod.io import containers
from necrod.io.containers import ContainerRun

pytestmark = pytest.mark.anyio

LINES = [f"line {i} é\n" for i in range(6)]


class Container:
    def __init__(self, *, early_waits: int = 0, stall_after: int | None = None, code: int = 3) -> None:
        self.early_waits = early_waits
        self.stall_after = stall_after
        self.code = code
        self.ended = anyio.Event()
        self.streams = 0
        self.waits = 0

    async def run(self) -> None:
        await anyio.sleep(0.2)
        self.ended.set()

    async def wait(self) -> dict[str, Any]:
        self.waits += 1
        if self.early_waits:
            self.early_waits -= 1
            return {"StatusCode": 0}
        await self.ended.wait()
        return {"StatusCode": self.code}

    async def show(self) -> dict[str, Any]:
        return {"State": {"Status": "exited" if self.ended.is_set() else "running", "OOMKilled": False}}

    def log(self, *, stdout: bool, stderr: bool, follow: bool, since: int) -> AsyncIterator[str]:
        assert stdout and stderr and follow
        self.streams += 1
        return self._stream(first=self.streams == 1)

    async def _stream(self, first: bool) -> AsyncIterator[str]:
        for i, line in enumerate(LINES):
            if first and i == self.stall_after:
                await anyio.sleep_forever()
            yield line
        if first:
            await self.ended.wait()


class Launcher:
    def __init__(self) -> None:
        self.removed: list[Any] = []
        self.given_back: list[str] = []

    async def remove(self, container: Any) -> None:
        self.removed.append(container)

    async def give_back(self, slot: str) -> None:
        self.given_back.append(slot)


async def run(tmp_path: Path, container: Container) -> tuple[containers.Exit, str, Launcher]:
    launcher = Launcher()
    log = tmp_path / "attempt.log"
    log.touch()
    attempt = ContainerRun(launcher, container, "necrod-t-1-1", str(tmp_path / "slot"), log)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(container.run)
        with anyio.fail_after(10):
            exit_ = await attempt.wait()
    return exit_, log.read_text(), launcher


async def test_a_wait_answered_while_the_container_runs_is_asked_again(tmp_path: Path) -> None:
    container = Container(early_waits=2)
    exit_, out, launcher = await run(tmp_path, container)
    assert exit_.code == 3 and not exit_.lost, exit_
    assert container.waits == 3
    assert out == "".join(LINES)
    assert launcher.removed == [container] and launcher.given_back == [str(tmp_path / "slot")]


@pytest.mark.parametrize("stall_after", [0, 4])
async def test_a_log_stream_that_stalls_before_the_end_is_read_again_from_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stall_after: int
) -> None:
    monkeypatch.setattr(containers, "DRAIN_S", 0.2)
    container = Container(stall_after=stall_after)
    exit_, out, _ = await run(tmp_path, container)
    assert exit_.code == 3
    assert container.streams == 2
    assert out == "".join(LINES)  # every line, none twice


async def test_a_stream_that_ends_with_the_container_is_read_once(tmp_path: Path) -> None:
    container = Container()
    exit_, out, _ = await run(tmp_path, container)
    assert exit_.code == 3 and container.streams == 1 and container.waits == 1
    assert out == "".join(LINES)
