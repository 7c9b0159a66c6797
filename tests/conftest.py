from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.helpers import Necrod, cleanup_dir, make_origin, pool_config, short_tmpdir


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    cleanup_dir(path)


@pytest.fixture
def origin(workdir: Path) -> Path:
    return make_origin(workdir / "origin")


@pytest.fixture(params=["worktree", "shared-clone", "overlay"])
def slot_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per kind of slot (``pytestmark = pytest.mark.usefixtures("slot_kind")``)."""
    monkeypatch.setattr(helpers, "POOL_DEFAULTS", {**helpers.POOL_DEFAULTS, "isolation": request.param})
    return str(request.param)


@pytest.fixture
def necrod_factory(workdir: Path) -> Iterator[Callable[..., Necrod]]:
    started: list[Necrod] = []

    def make(config: str | None = None, *, name: str = "d", start: bool = True, **kwargs: Any) -> Necrod:
        root = workdir / name
        root.mkdir(exist_ok=True)
        daemon = Necrod(root, config, **kwargs)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def necrod(necrod_factory: Callable[..., Necrod], origin: Path) -> Necrod:
    """A daemon serving one pool ``repo`` (2 slots) of ``origin``."""
    return necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0))
