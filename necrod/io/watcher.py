"""Watching pools.yaml for changes (DESIGN.md, trap 4).

The directory is watched, not the file: editors replace files by rename, and Kubernetes updates
a mounted ConfigMap by swapping a ``..data`` symlink, neither of which a watch on the file
itself survives. Any change in the directory makes us compare the content at the config path
(symlinks followed) with what we saw last; only a real difference — including the file going
away — calls ``on_change``.

``stop()`` must be called before the task is cancelled: watchfiles' worker thread only
returns promptly when its stop event is set (otherwise cancelling takes its full timeout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog
import watchfiles

log = structlog.get_logger("necrod.watcher")


def content_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    def __init__(
        self, path: Path, on_change: Callable[[], Awaitable[None]], *, debounce_ms: int = 200
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._debounce_ms = debounce_ms
        self._stop = anyio.Event()
        self.last_digest = content_digest(path)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        directory = self.path.parent
        while not self._stop.is_set():
            if not directory.is_dir():
                await self._sleep(1.0)  # the directory itself went away: wait for it
                continue
            try:
                async for _ in watchfiles.awatch(
                    directory, stop_event=self._stop, debounce=self._debounce_ms, step=50, recursive=False,
                    rust_timeout=2000, watch_filter=None, yield_on_timeout=True,
                ):  # fmt: skip
                    await self._check()
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                log.warning("watch_failed", directory=str(directory), error=str(exc))
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    async def _check(self) -> None:
        current = content_digest(self.path)
        if current == self.last_digest:
            return
        self.last_digest = current
        log.info("config_changed", path=str(self.path), present=current is not None)
        await self._on_change()
