"""kill -9 at random moments under load: nothing acknowledged is lost, nothing is handed out twice.

Sixteen clients allocate, heartbeat, write work into their slots and release, against a real
daemon that is killed with SIGKILL at a random moment and restarted, round after round. Each
client keeps a ledger of what the daemon *acknowledged* (the reply arrived); after every restart
the daemon's state must agree with it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from necrod.client import Client
from necrod.core.config.model import ISOLATIONS as KINDS
from necrod.proto.errors import DaemonUnreachable, NecrodError, ResourceExhausted
from tests.helpers import Necrod, git
from tests.reliability.conftest import (
    FIGURES,
    LONG,
    daemon_config,
    index_locks,
    scaled,
    slots_by_id,
    wait_settled,
    workspaces_of,
)

pytestmark = pytest.mark.reliability

ROUNDS = scaled(20, 500)
CLIENTS = 16
SLOTS = 8
#: Long enough that no lease a client holds can expire during a round and its checks.
TTL_S = 600.0


@dataclass
class Held:
    slot_id: str
    client: int
    holder: str
    token: int
    wrote: bool = False


@dataclass
class Ledger:
    """What the daemon acknowledged, as the clients saw it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Leases whose allocate reply arrived and that were not released (with a reply) since.
    held: dict[str, Held] = field(default_factory=dict)
    #: Leases whose release reply arrived: lease id -> whether work had been written.
    released: dict[str, bool] = field(default_factory=dict)
    #: A release was sent but the daemon died before replying: either outcome is allowed.
    releasing: dict[str, Held] = field(default_factory=dict)
    #: Allocations sent without a reply, by their unique holder name: either outcome is allowed.
    allocating: dict[str, int] = field(default_factory=dict)
    #: Highest fencing token seen per slot.
    tokens: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def mine(self, client: int) -> list[str]:
        with self.lock:
            return [lease for lease, h in self.held.items() if h.client == client]


def run_client(index: int, socket: Path, ledger: Ledger, stop: threading.Event, rng: random.Random) -> None:
    """One agent: allocate, write work, heartbeat, release, until the daemon dies or ``stop``."""
    c = Client(socket, timeout=30)
    try:
        c.connect()
    except DaemonUnreachable:
        return
    try:
        while not stop.is_set():
            mine = ledger.mine(index)
            if not mine or (len(mine) < 2 and rng.random() < 0.5):
                if not allocate(c, index, ledger, rng):
                    return
            else:
                lease = rng.choice(mine)
                action = heartbeat if rng.random() < 0.4 else release
                if not action(c, lease, ledger):
                    return
    finally:
        c.close()


def allocate(c: Client, index: int, ledger: Ledger, rng: random.Random) -> bool:
    with ledger.lock:
        ledger.stats["allocate_sent"] += 1
        holder = f"c{index}-{ledger.stats['allocate_sent']}"
        ledger.allocating[holder] = index
    try:
        lease = c.allocate("repo", holder=holder, ttl_s=TTL_S, wait_s=rng.choice([0, 0.2, 1.0]))
    except DaemonUnreachable:
        return False
    except ResourceExhausted:
        with ledger.lock:
            del ledger.allocating[holder]
            ledger.stats["allocate_refused"] += 1
        time.sleep(rng.uniform(0.005, 0.05))
        return True
    except NecrodError as exc:
        ledger.violation(f"allocate failed unexpectedly: {exc.kind}: {exc}")
        return False
    sid = lease["slot_id"]
    with ledger.lock:
        del ledger.allocating[holder]
        ledger.stats["allocated"] += 1
        for other, h in ledger.held.items():
            if h.slot_id == sid:
                ledger.violations.append(f"{sid} granted to {lease['lease_id']} while {other} holds it")
        if lease["fencing_token"] <= ledger.tokens.get(sid, 0):
            ledger.violations.append(f"{sid}: fencing token {lease['fencing_token']} did not grow")
        ledger.tokens[sid] = lease["fencing_token"]
        held = ledger.held[lease["lease_id"]] = Held(sid, index, holder, lease["fencing_token"])
    # Work the agent leaves behind: it must end up in the lease's salvage ref.
    (Path(lease["path"]) / f"work-{lease['lease_id']}.txt").write_text(f"{holder}\n")
    held.wrote = True
    return True


def heartbeat(c: Client, lease: str, ledger: Ledger) -> bool:
    try:
        c.heartbeat(lease)
    except DaemonUnreachable:
        return False
    except NecrodError as exc:
        ledger.violation(f"heartbeat of acknowledged lease {lease}: {exc.kind}: {exc}")
        return False
    with ledger.lock:
        ledger.stats["heartbeats"] += 1
    return True


def release(c: Client, lease: str, ledger: Ledger) -> bool:
    with ledger.lock:
        ledger.releasing[lease] = ledger.held.pop(lease)
    try:
        c.release(lease)
    except DaemonUnreachable:
        return False
    except NecrodError as exc:
        ledger.violation(f"release of acknowledged lease {lease}: {exc.kind}: {exc}")
        return False
    with ledger.lock:
        ledger.released[lease] = ledger.releasing.pop(lease).wrote
        ledger.stats["released"] += 1
    return True


def check_after_restart(d: Necrod, ledger: Ledger, round_no: int) -> None:
    """The daemon's state, after a restart, against what clients were told before the kill."""
    slots = slots_by_id(d)
    by_lease = {s["lease_id"]: s for s in slots.values() if s["lease_id"]}
    problems = []
    for lease, h in ledger.held.items():
        s = slots.get(h.slot_id)
        if s is None or s["state"] != "allocated" or s["lease_id"] != lease:
            problems.append(f"acknowledged lease {lease} on {h.slot_id} lost: {s}")
    for lease in ledger.released:
        if lease in by_lease:
            problems.append(f"acknowledged release of {lease} undone: {by_lease[lease]}")
    # Unacknowledged calls may have happened or not; the ledger learns which.
    for lease, h in list(ledger.releasing.items()):
        del ledger.releasing[lease]
        if lease in by_lease:
            ledger.held[lease] = h
        else:
            ledger.released[lease] = h.wrote
    for lease, s in by_lease.items():
        if lease in ledger.held:
            continue
        client = ledger.allocating.get(s["holder"])
        if client is None:
            problems.append(f"{s['slot_id']} is held by lease {lease} that no client asked for: {s}")
            continue
        ledger.stats["adopted"] += 1
        ledger.held[lease] = Held(s["slot_id"], client, s["holder"], s["fencing_token"])
        ledger.tokens[s["slot_id"]] = max(ledger.tokens.get(s["slot_id"], 0), s["fencing_token"])
    ledger.allocating.clear()
    seen: Counter[str] = Counter(h.slot_id for h in ledger.held.values())
    problems += [f"{sid} held by {n} acknowledged leases" for sid, n in seen.items() if n > 1]
    assert not problems, f"round {round_no}: " + "\n".join(problems)


def check_settled(d: Necrod, ledger: Ledger, round_no: int, workspaces: Path) -> None:
    """Within one cleanup cycle: every slot available or held by a lease the ledger knows."""
    slots = wait_settled(d, timeout=60)
    quarantined = [s["slot_id"] for s in slots.values() if s["state"] == "error"]
    assert not quarantined, f"round {round_no}: slots in error after recovery: {quarantined}"
    wrong = [
        s
        for s in slots.values()
        if not (s["state"] == "available" or (s["state"] == "allocated" and s["lease_id"] in ledger.held))
    ]
    assert not wrong, f"round {round_no}: slots neither available nor legitimately held: {wrong}"
    locks = index_locks(workspaces)
    assert not locks, f"round {round_no}: stale index.lock after the pool settled: {locks}"
    salvaged = {item["lease_id"] for item in d.call("salvage.list", {"pool": "repo"})["salvage"]}
    lost = [lease for lease, wrote in ledger.released.items() if wrote and lease not in salvaged]
    assert not lost, f"round {round_no}: released work not salvaged: {lost}"


@pytest.mark.timeout(scaled(600, 6 * 3600))
@pytest.mark.parametrize("isolation", KINDS)
def test_kill9_under_load_loses_nothing_acknowledged(
    necrod_factory: Callable[..., Necrod], origin: Path, isolation: str
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = necrod_factory(
        daemon_config({"repo": origin}, slots=SLOTS, max_slots=SLOTS, min_idle=0, isolation=isolation)
    )
    workspaces = workspaces_of(d)
    ledger = Ledger()
    started = time.monotonic()
    for round_no in range(ROUNDS):
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=run_client,
                args=(i, d.socket, ledger, stop, random.Random(rng.random())),
                name=f"client-{i}",
            )
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 1.0))
        d.kill9()
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client did not notice the daemon died"
        assert not ledger.violations, f"round {round_no} (seed {seed}): " + "\n".join(ledger.violations)
        d.start()
        check_after_restart(d, ledger, round_no)
        check_settled(d, ledger, round_no, workspaces)
        ledger.stats["rounds"] += 1
        FIGURES["kill -9 rounds"] += 1
        FIGURES["leases checked after a restart"] += len(ledger.held)

    # Finally everything comes back clean.
    with d.client() as c:
        for lease in list(ledger.held):
            c.release(lease)
    slots = d.wait_slots("repo", "available", SLOTS, timeout=60)
    base = git(origin, "rev-parse", "HEAD")
    for s in slots:
        assert (
            git(
                s["path"],
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--ignored",
                "--untracked-files=all",
            )
            == ""
        )
        assert git(s["path"], "rev-parse", "HEAD") == base
    assert not index_locks(workspaces)
    elapsed = time.monotonic() - started
    report = dict(ledger.stats, seconds=round(elapsed, 1), seed=seed, long=LONG)
    print(f"\ncrash rounds: {report}")
    FIGURES["kill -9 acknowledged allocations"] += ledger.stats["allocated"]
    FIGURES["kill -9 acknowledged releases"] += ledger.stats["released"]
    FIGURES["kill -9 acknowledged heartbeats"] += ledger.stats["heartbeats"]
    FIGURES["kill -9 replies lost with the daemon (resolved after restart)"] += ledger.stats["adopted"]
    FIGURES["kill -9 seconds per round"] = round(elapsed / ROUNDS, 2)
    FIGURES["acknowledged operations lost"] += len(ledger.violations)
    assert ledger.stats["rounds"] == ROUNDS and ledger.stats["allocated"] > ROUNDS
