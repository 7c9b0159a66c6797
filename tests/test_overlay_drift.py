"""What an overlay slot's upper holds after its reset (its drift): a few directories are looked
at on the event loop, a deeper upper is walked in a worker thread, and either way anything but
a plain directory is found."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from necrod.daemon.overlayslots import WRITTEN_LOOK, OverlaySlots


def slots(root: Path) -> OverlaySlots:
    mirror = SimpleNamespace(git=None, path=root / "mirror.git")
    return OverlaySlots(mirror, layers=None, root=root, top=tuple)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_drift_of_an_upper_shallow_or_deep(tmp_path: Path) -> None:
    kind = slots(tmp_path)
    upper = tmp_path / "uppers" / "1" / "upper"
    upper.mkdir(parents=True)
    assert await kind.drift("1", "", "c", timeout=5) is None and kind.written("1") is None
    deep = upper.joinpath(*(f"d{i}" for i in range(WRITTEN_LOOK * 2)))
    deep.mkdir(parents=True)
    # Directories only, more than a look takes in: walked whole, nothing found.
    assert await kind.drift("1", "", "c", timeout=5) is None and kind.written("1") is None
    (deep / "planted.txt").write_text("written after the reset\n")
    found = await kind.drift("1", "", "c", timeout=5)
    assert found is not None and "planted.txt" in found
    assert kind.written("1") is None  # a grant's look stops at its few directories
    (upper / "top.txt").write_text("x")
    assert "top.txt" in (await kind.drift("1", "", "c", timeout=5) or "")
    assert "top.txt" in (kind.written("1") or "")
