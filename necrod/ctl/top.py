"""``necroctl top``: a live view of one daemon — pools, leases, tasks, hosts and the last events.

It subscribes to events with a snapshot and reads ``tasks.list`` and ``hosts.list`` once; from
then on events move the picture (``necrod.ctl.topmodel``), and the clock alone moves ages and
durations. What the daemon publishes no event for is read again every ``--resync`` seconds
(fetch times, remote hosts, queued tasks' reasons), and at once when a lease outlives the
expiry last seen (a heartbeat moved it). Everything goes over the one connection necroctl has,
so ``-H ssh://`` works as for any command.

On a terminal it is a full-screen dashboard drawn by rich (keys: q quit, p pause, f next pool,
0-9 a pool by number, 0 all); elsewhere (not a TTY, ``TERM=dumb``, ``--plain``) it prints plain
tables every ``--interval`` seconds, and with ``--json`` one JSON object per refresh.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from necrod.client import Client
from necrod.ctl import render
from necrod.ctl.cli import EXIT_ERROR, EXIT_OK
from necrod.ctl.topmodel import Panel, Picture

if TYPE_CHECKING:
    from rich.console import RenderableType

#: How long one look at the socket waits for an event: the keys' latency when nothing happens.
POLL_S = 0.1
#: At most this many redraws a second, however many events arrive.
MAX_FPS = 4.0
#: Ages and durations move by the second: redraw at least this often.
CLOCK_S = 1.0
#: A lease seen past its expiry with no event is read again at most this often.
LEASE_RECHECK_S = 5.0
KEYS = "q quit  p pause  f next pool  1-9 pool  0 all"


class Top:
    """The picture, the pool filter and the pause, and the calls that keep the picture current."""

    def __init__(self, client: Client, *, pool: str | None, resync_s: float) -> None:
        self.client = client
        self.picture = Picture()
        self.pool = pool
        self.paused = False
        self.resync_s = resync_s
        self.last_resync = time.monotonic()
        self.last_lease_check = 0.0
        self.where = client.path

    def start(self) -> None:
        subscribed = self.client.subscribe(snapshot=True)
        tasks = self.client.tasks()["tasks"]
        hosts = self.client.hosts()["hosts"]
        self.picture.load(subscribed, tasks, hosts)

    def pump(self, wait_s: float, budget_s: float = 0.2) -> bool:
        """Apply the events that arrive within ``wait_s`` (at most ``budget_s`` of them when they
        keep coming); whether any did. An ``overflow`` event ends the view."""
        got = False
        deadline = time.monotonic() + budget_s
        for event in self.client.events(timeout=wait_s):
            if event.get("type") == "overflow":
                raise FellBehind
            self.picture.apply(event)
            got = True
            if time.monotonic() > deadline:
                break
        return got

    def resync(self, now_m: float, wall: float) -> bool:
        """Read again what no event reports, when it is due; whether anything was read."""
        if self.resync_s > 0 and now_m - self.last_resync >= self.resync_s:
            self.last_resync = self.last_lease_check = now_m
            self.picture.resync_pools(self.client.pools()["pools"])
            self.picture.resync_slots(self.client.slots()["slots"])
            self.picture.resync_tasks(self.client.tasks()["tasks"])
            self.picture.resync_hosts(self.client.hosts()["hosts"])
            return True
        if now_m - self.last_lease_check >= LEASE_RECHECK_S and self.picture.overdue_leases(wall):
            self.last_lease_check = now_m
            self.picture.resync_slots(self.client.slots()["slots"])
            return True
        return False

    def key(self, char: str) -> bool:
        """Act on one key; False to quit."""
        names = self.picture.pool_names()
        if char in ("q", "Q", "\x03", "\x04"):
            return False
        if char == "p":
            self.paused = not self.paused
        elif char == "f":
            if self.pool not in names:
                self.pool = names[0] if names else None
            else:
                at = names.index(self.pool) + 1
                self.pool = names[at] if at < len(names) else None
        elif char == "0":
            self.pool = None
        elif char.isdigit() and int(char) <= len(names):
            self.pool = names[int(char) - 1]
        return True

    def title(self, wall: float) -> str:
        state = "STOPPING" if self.picture.stopping else ""
        shown = f"pool {self.pool}" if self.pool else "all pools"
        paused = "  [PAUSED: p resumes]" if self.paused else ""
        return (f"necrod at {self.where}  seq {self.picture.seq}  {shown}  {time.strftime('%H:%M:%S', time.localtime(wall))}"
                f"{'  ' + state if state else ''}{paused}")  # fmt: skip


class FellBehind(Exception):
    """The daemon dropped the subscription: this client read its events too slowly."""


# --- full screen -------------------------------------------------------------------------------


def _room(height: int, picture: Picture, pool: str | None, now: float) -> dict[str, int]:
    """Rows each panel may use on a screen ``height`` lines high: pools, leases, tasks and hosts
    first (each at most a third of what is left, at least two rows), the rest to the events."""
    # The title and key lines, and each panel's title, header and rule.
    left = height - 2 - 5 * 3
    wants = {p.title: len(p.rows) for p in picture.panels(now, pool)}
    room = {}
    for title in ("pools", "leases", "tasks", "hosts"):
        room[title] = min(wants[title], max(2, left // 3))
        left -= room[title]
    room["events"] = max(2, left)
    return room


def _table(panel: Panel) -> RenderableType:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{panel.title} ({len(panel.rows) + panel.more})", title_justify="left",
                  box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False)  # fmt: skip
    for header in panel.headers:
        table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=80)
    for row in panel.rows:
        # Text, never markup: a holder like "[link=https://…]" stays what it says.
        table.add_row(*(Text(render.printable(str(cell))) for cell in row))
    if panel.more:
        table.add_row(f"... {panel.more} more", *([""] * (len(panel.headers) - 1)))
    return table


def _screen(top: Top, height: int) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    wall = time.time()
    room = _room(height, top.picture, top.pool, wall)
    tables = [_table(p) for p in top.picture.panels(wall, top.pool, room)]
    return Group(Text(top.title(wall), style="bold reverse"), *tables, Text(KEYS, style="dim"))


@contextmanager
def _keys() -> Iterator[int]:
    """Standard input a key at a time, without echo; restored on the way out."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _full_screen(top: Top) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()

    def draw() -> None:
        # The terminal's own size, read at each frame: it follows a resize, and an exported
        # COLUMNS/LINES (stale after a resize, or 80x24 from some parents) does not win over it.
        console.size = os.get_terminal_size(sys.stdout.fileno())
        live.update(_screen(top, console.size.height), refresh=True)

    with _keys() as fd, Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
        drawn = 0.0
        dirty = True
        while True:
            now_m = time.monotonic()
            if dirty and not top.paused and (now_m - drawn >= 1 / MAX_FPS):
                draw()
                drawn, dirty = now_m, False
            ready, _, _ = select.select([fd], [], [], 0)
            if ready:
                for char in os.read(fd, 32).decode(errors="replace"):
                    if not top.key(char):
                        return EXIT_OK
                draw()
                drawn, dirty = time.monotonic(), False
                continue
            dirty |= top.pump(POLL_S)
            dirty |= top.resync(time.monotonic(), time.time())
            dirty |= time.monotonic() - drawn >= CLOCK_S


# --- plain -------------------------------------------------------------------------------------


def _plain(top: Top, interval: float, as_json: bool) -> int:
    while True:
        wall = time.time()
        if as_json:
            print(json.dumps({"at": wall, **top.picture.as_json(top.pool)}), flush=True)
        else:
            print(f"== {top.title(wall)}")
            for panel in top.picture.panels(wall, top.pool):
                print(f"\n{panel.title} ({len(panel.rows)})")
                if panel.rows:
                    print(render.table(panel.rows, panel.headers))
            print(flush=True)
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            top.pump(min(left, 1.0), budget_s=left)
            top.resync(time.monotonic(), time.time())


def can_draw() -> bool:
    """Whether the full-screen view can run here: both ends a terminal that is not dumb."""
    term = os.environ.get("TERM", "")
    return sys.stdout.isatty() and sys.stdin.isatty() and term not in ("", "dumb", "unknown")


def main(args: argparse.Namespace, client: Client, opts: dict[str, Any]) -> int:
    # Events arrive whenever they happen: no reply deadline on the subscription itself, but the
    # first calls keep the command's --timeout.
    top = Top(client, pool=args.pool, resync_s=args.resync)
    top.start()
    try:
        if opts["json"] or args.plain or not can_draw():
            return _plain(top, args.interval, opts["json"])
        return _full_screen(top)
    except FellBehind:
        print("necroctl: the daemon closed the subscription (we fell behind)", file=sys.stderr)
        return EXIT_ERROR
