"""Watching pools.yaml for changes (DESIGN.md, trap 4).

The directory is watched, not the file: editors replace files by rename, and Kubernetes updates
a mounted ConfigMap by swapping a ``..data`` symlink, neither of which a watch on the file
itself survives. Any change in the directory makes us compare the content at the config path
(symlinks followed) with what we saw last; only a real difference — including the file going
away, or becoming something that is not a regular file — calls ``on_change``. The content is
read in a worker thread, the way a reload reads it (``read_config_file``): never blocking on a
FIFO, never more than the size cap.

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

from necrod.core.config import ConfigError
from necrod.io.config_files import read_config_file

log = structlog.get_logger("necrod.watcher")


def content_digest(path: Path) -> str:
    """What the watcher compares: a digest of the content, or why there is none to read."""
    try:
        return hashlib.sha256(read_config_file(path)).hexdigest()
    except ConfigError as exc:
        return f"unreadable: {exc.message}"


class ConfigWatcher:
    def __init__(
        self, path: Path, on_change: Callable[[], Awaitable[None]], *, debounce_ms: int = 200
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._debounce_ms = debounce_ms
        self._stop = anyio.Event()
        #: Set from the first look at the file (``run``), and by every reload.
        self.last_digest: str | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        directory = self.path.parent
        if self.last_digest is None:
            self.last_digest = await anyio.to_thread.run_sync(content_digest, self.path)
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
        current = await anyio.to_thread.run_sync(content_digest, self.path)
        if current == self.last_digest:
            return
        self.last_digest = current
        log.info("config_changed", path=str(self.path), readable=not current.startswith("unreadable"))
        await self._on_change()
