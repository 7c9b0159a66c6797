"""Which TCP ports a lease gets: a block of consecutive ports from ``daemon.port_range`` that no
live lease holds and nothing on the host is bound to. Pure: the host is asked through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def choose_block(
    count: int, port_range: tuple[int, int], taken: Iterable[int], free_on_host: Callable[[int], bool],
    start: int | None = None,
) -> list[int] | None:  # fmt: skip
    """``count`` consecutive ports in ``port_range`` (both ends included) none of which is in
    ``taken`` and all of which ``free_on_host``; looked for from ``start`` (the port after the
    block handed out last, so a port just given back is not handed out again at once), round
    the range once. None when there is no such block."""
    low, high = port_range
    if count <= 0:
        return []
    width = high - low + 1
    if count > width:
        return None
    held = set(taken)
    first = start if start is not None and low <= start <= high else low
    candidate = first
    for _ in range(width):
        if candidate + count - 1 > high:
            candidate = low
        block = range(candidate, candidate + count)
        clash = next((p for p in block if p in held), None)
        if clash is None:
            busy = next((p for p in block if not free_on_host(p)), None)
            if busy is None:
                return list(block)
            clash = busy
        candidate = clash + 1
        if candidate > high:
            candidate = low
        if candidate == first:
            break
    return None
