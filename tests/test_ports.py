"""A block of TCP ports per lease (``ports:``): consecutive, free on the host, never shared by
two live leases, durable across a kill -9, given back with the lease, handed to runners."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from necrod.core.ports import choose_block
from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, pool_config, wait_for

LOW, HIGH = 47000, 47199


def config(origin: Path, **options: Any) -> str:
    text = pool_config({"repo": origin}, slots=20, max_slots=22, min_idle=0, ports=3, **options)
    return f"daemon:\n  port_range: {LOW}-{HIGH}\n" + text


def test_choose_block_skips_taken_and_busy_ports_and_wraps() -> None:
    assert choose_block(3, (100, 110), [], lambda p: True) == [100, 101, 102]
    assert choose_block(3, (100, 110), [101], lambda p: True) == [102, 103, 104]
    assert choose_block(3, (100, 110), [], lambda p: p != 100) == [101, 102, 103]
    assert choose_block(2, (100, 110), [], lambda p: True, start=110) == [100, 101]  # wraps
    assert choose_block(3, (100, 104), [102], lambda p: True) is None
    assert choose_block(0, (100, 104), [100], lambda p: False) == []


def test_twenty_concurrent_leases_never_share_a_port_even_across_a_kill_9(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    # Something else on the host holds the first port of the range: it is skipped.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", LOW))
    squatter.listen()
    try:
        d = necrod_factory(config(origin))
        leases: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def take() -> None:
            try:
                leases.append(d.call("slots.allocate", {"pool": "repo", "wait_s": 30}))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=take) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(leases) == 20
        ports = [p for lease in leases for p in lease["ports"]]
        assert len(ports) == 60 == len(set(ports)) and LOW not in ports
        assert all(
            lease["ports"] == list(range(lease["ports"][0], lease["ports"][0] + 3)) for lease in leases
        )
        assert all(LOW <= p <= HIGH for p in ports)
        d.kill9()
        d.start()
        # The leases kept their ports; new ones get others.
        listed = {s["lease_id"]: s for s in d.call("slots.list", {"pool": "repo"})["slots"] if s["lease_id"]}
        assert len(listed) == 20
        more = [d.call("slots.allocate", {"pool": "repo", "wait_s": 30}) for _ in range(2)]
        assert not {p for lease in more for p in lease["ports"]} & set(ports)
        # Given back with the lease: a released block may be handed out again.
        for lease in leases:
            d.call("slots.release", {"lease_id": lease["lease_id"]})
        one = d.call("slots.allocate", {"pool": "repo", "wait_s": 60, "ports": 1})
        assert len(one["ports"]) == 1
    finally:
        squatter.close()


def test_ports_run_out_and_are_handed_to_runners(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    out = workdir / "env"
    runners = (
        "runners:\n  web:\n    ports: 2\n"
        f"    command: [sh, -c, 'echo $NECROD_PORT $NECROD_PORTS $PORT > {out}']\n"
    )
    text = f"daemon:\n  port_range: {LOW}-{LOW + 4}\n" + pool_config({"repo": origin}, slots=3, min_idle=0)
    d = necrod_factory(text + runners)
    held = d.call("slots.allocate", {"pool": "repo", "ports": 4})
    with pytest.raises(ResourceExhausted, match="consecutive free ports"):
        d.call("slots.allocate", {"pool": "repo", "ports": 2})
    assert d.call("slots.list", {"pool": "repo", "state": "allocated"})["slots"][0]["lease_id"]
    d.call("slots.release", {"lease_id": held["lease_id"]})
    task = d.call("tasks.submit", {"pool": "repo", "runner": "web"})["task_id"]
    wait_for(lambda: d.call("tasks.get", {"task_id": task})["state"] == "succeeded", 30, what="the task")
    first, all_, port = out.read_text().split()
    assert all_ == f"{first},{int(first) + 1}" and port == first and LOW <= int(first) <= LOW + 3
