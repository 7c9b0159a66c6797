"""What an operator of a fleet watches: the probes over HTTP, the watchdog and the STATUS= line
systemd gets, the metrics Prometheus scrapes (every family documented, checked by promtool), and
the alerting rules and the dashboard built on them (each naming only what necrod serves)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from necrod import __version__
from necrod.daemon.metrics import ANOMALY_KINDS, LEASE_ENDS, OUTCOMES
from tests.helpers import Necrod, pool_config, short_tmpdir, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "necrod.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus; .ci/run installs it)"
)
#: A metric name in a PromQL expression (labels and functions have no such prefix).
METRIC_NAME = re.compile(r"\b(?:necrod|process|python)_[a-zA-Z0-9_]+\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, timeout: float = 15.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def served(port: int) -> tuple[str, dict[str, str], set[str]]:
    """A scrape: its text, each family with its type (``# TYPE`` lines) and every sample name."""
    status, body = get(port, "/metrics")
    assert status == 200
    text = body.decode()
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    samples = {
        line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"
    }
    return text, families, samples


def documented() -> dict[str, str]:
    """docs/protocol.md's table of metric families: name → type."""
    section = PROTOCOL.read_text().split("### `metrics.get`", 1)[1].split("\n### ", 1)[0]
    return dict(re.findall(r"^\| `([a-z_]+)` \| (counter|gauge|histogram) \|", section, flags=re.MULTILINE))


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a scrape (its labels exactly these), or None."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z0-9_:]+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


@pytest.fixture
def watched(necrod_factory: Callable[..., Necrod], origin: Path) -> tuple[Necrod, int]:
    """A daemon with its HTTP endpoint, a runner profile and a quick fetch interval."""
    port = free_port()
    config = (
        f"daemon:\n  metrics_listen: 127.0.0.1:{port}\n"
        + pool_config({"repo": origin}, slots=2, min_idle=0, fetch_interval_s=1)
        + 'runners:\n  echo:\n    command: ["sh", "-c", "echo hello"]\n'
    )
    return necrod_factory(config), port


# --- the probes ---------------------------------------------------------------------------------


def test_a_pool_whose_fetch_fails_makes_the_daemon_degraded_not_unready(
    watched: tuple[Necrod, int], origin: Path
) -> None:
    d, port = watched
    assert get(port, "/readyz")[0] == 200
    moved = origin.with_name("origin-gone")
    origin.rename(moved)
    try:
        wait_for(lambda: d.call("daemon.status")["state"] == "degraded", 30, what="a failing fetch")
        status, body = get(port, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["state"] == "degraded", ready
        assert any("pool repo fetch: failing since" in r for r in ready["degraded"]), ready
        assert get(port, "/healthz")[0] == 200
        text, _, _ = served(port)
        assert sample(text, "necrod_fetch_failing", pool="repo") == 1
        assert sample(text, "necrod_degraded") == 1
    finally:
        moved.rename(origin)
    wait_for(lambda: d.call("daemon.status")["state"] == "running", 30, what="fetches to work again")


def test_a_socket_that_does_not_answer_makes_the_daemon_unready_but_alive(
    watched: tuple[Necrod, int],
) -> None:
    d, port = watched
    # The socket file is gone (a tmp cleaner, a careless rm): nobody can reach the daemon.
    d.socket.unlink()
    status, body = get(port, "/readyz")
    assert status == 503, body
    reasons = json.loads(body)["reasons"]
    assert any(str(d.socket) in r and "does not answer" in r for r in reasons), reasons
    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    assert get(port, "/metrics")[0] == 200


def test_the_probes_answer_head_and_refuse_other_methods(watched: tuple[Necrod, int]) -> None:
    _, port = watched
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200 and reply.read() == b""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    with refused.value:
        assert refused.value.code == 405


def test_many_readiness_probes_at_once_are_all_answered(watched: tuple[Necrod, int]) -> None:
    _, port = watched
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: get(port, "/readyz")[0], range(40)))
    assert codes == [200] * 40


# --- systemd: the watchdog and the STATUS= line -------------------------------------------------


class NotifySocket:
    """What systemd's end of ``$NOTIFY_SOCKET`` receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return self.messages
            self.messages.append(
                dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            )

    def pings_since(self, index: int) -> int:
        return sum(1 for m in self.drain()[index:] if m.get("WATCHDOG") == "1")

    def last_status(self) -> str | None:
        statuses = [m["STATUS"] for m in self.drain() if "STATUS" in m]
        return statuses[-1] if statuses else None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    directory = short_tmpdir()
    listener = NotifySocket(directory / "notify")
    yield listener
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


def systemd_env(notify: NotifySocket) -> dict[str, str]:
    import os

    return {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}


def test_the_watchdog_is_fed_only_while_the_socket_and_the_store_answer(
    necrod_factory: Callable[..., Necrod], origin: Path, notify: NotifySocket
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0), env=systemd_env(notify))
    wait_for(lambda: any(m.get("READY") == "1" for m in notify.drain()), 10, what="READY=1")
    mark = len(notify.drain())
    time.sleep(3.5)  # a ping every second (half of WATCHDOG_USEC)
    assert notify.pings_since(mark) >= 2
    d.socket.unlink()  # the accept loop can no longer be reached
    time.sleep(1.5)
    mark = len(notify.drain())
    time.sleep(3.5)
    assert notify.pings_since(mark) == 0, "pinged although the socket does not answer"
    status = notify.last_status()
    assert status is not None and status.startswith("not answering: the socket"), status
    assert any(e.get("event") == "watchdog_withheld" for e in d.log_events())


def test_the_status_line_follows_pools_slots_leases_and_tasks(
    necrod_factory: Callable[..., Necrod], origin: Path, notify: NotifySocket
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0), env=systemd_env(notify))
    wait_for(lambda: (s := notify.last_status()) and "2 available" in s, 10, what="the first STATUS=")
    ready = next(m for m in notify.drain() if m.get("READY") == "1")
    assert ready["STATUS"].startswith("1 pool; slots: ")
    with d.client() as c:
        c.allocate("repo", ttl_s=600)
        wait_for(lambda: notify.last_status() == "1 pool; slots: 1 available, 1 allocated; 1 lease", 10,
                 what="the STATUS= line with the lease")  # fmt: skip
        c.submit("repo", command=["sleep", "30"])
        wait_for(lambda: "tasks: 1 running" in (notify.last_status() or ""), 10, what="the running task")


# --- the metrics --------------------------------------------------------------------------------


def test_every_family_served_is_documented_and_every_documented_family_is_served(
    watched: tuple[Necrod, int],
) -> None:
    d, port = watched
    with d.client() as c:
        c.allocate("repo", ttl_s=600)
        task_id = c.submit("repo", runner="echo")["task_id"]
        wait_for(lambda: c.task(task_id)["state"] == "succeeded", 30, what="the task")
    _, families, _ = served(port)
    docs = documented()
    assert docs, "docs/protocol.md has no table of metric families under metrics.get"
    assert set(families) - set(docs) == set(), "served but not in docs/protocol.md"
    assert set(docs) - set(families) == set(), "in docs/protocol.md but not served"
    assert {name: families[name] for name in docs} == docs, "a family's type differs from the docs"


@needs_promtool
def test_promtool_finds_nothing_wrong_with_the_scrape(watched: tuple[Necrod, int]) -> None:
    d, port = watched
    with d.client() as c:
        c.allocate("repo", ttl_s=600)
    text, _, _ = served(port)
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked.stdout + checked.stderr
    )


def test_counters_start_at_zero_for_every_label_they_can_take(watched: tuple[Necrod, int]) -> None:
    _, port = watched
    text, _, _ = served(port)
    for name in ("necrod_allocations_total", "necrod_releases_total", "necrod_cleanup_failures_total",
                 "necrod_salvages_total", "necrod_fetch_failures_total", "necrod_tamper_events_total"):  # fmt: skip
        assert sample(text, name, pool="repo") == 0, name
    for how in LEASE_ENDS:
        assert sample(text, "necrod_lease_expiries_total", pool="repo", how=how) == 0, how
    for kind in ANOMALY_KINDS:
        assert sample(text, "necrod_anomalies_total", pool="repo", kind=kind) == 0, kind
    for outcome in OUTCOMES:
        assert sample(text, "necrod_task_attempts_finished_total", outcome=outcome) == 0, outcome
    for result in ("applied", "rejected"):
        assert sample(text, "necrod_config_reloads_total", result=result) == 0, result
    assert sample(text, "necrod_task_attempt_seconds_count", runner="echo") == 0
    assert sample(text, "necrod_allocation_seconds_count", pool="repo") == 0


def test_the_known_labels_are_the_ones_the_code_gives() -> None:
    """The label values started at zero are the ones necrod's code can pass."""
    source = "\n".join(p.read_text() for p in (ROOT / "necrod" / "daemon").rglob("*.py"))
    assert set(re.findall(r'Anomaly\("([a-z_]+)"', source)) == set(ANOMALY_KINDS)
    assert set(re.findall(r'\.expire\(slot, "([a-z_]+)"\)', source)) == set(LEASE_ENDS)
    comment = (
        (ROOT / "necrod" / "core" / "tasks.py").read_text().split("#: succeeded,", 1)[1].split("\n", 1)[0]
    )
    assert {"succeeded", *(o.strip() for o in comment.split(","))} == set(OUTCOMES)


def test_a_removed_pool_takes_its_series_with_it(watched: tuple[Necrod, int], workdir: Path) -> None:
    from tests.helpers import make_origin

    d, port = watched
    other = make_origin(workdir / "other")
    assert d.config_path is not None
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace("pools:\n", f"pools:\n  extra:\n    repo_url: {other}\n    slots: 1\n")
    )
    wait_for(lambda: sample(served(port)[0], "necrod_allocations_total", pool="extra") == 0, 20,
             what="the new pool's counters")  # fmt: skip
    d.config_path.write_text(text)
    wait_for(lambda: sample(served(port)[0], "necrod_allocations_total", pool="extra") is None, 20,
             what="the removed pool's counters to go")  # fmt: skip


def test_build_info_fetch_times_and_the_oldest_lease_are_served(watched: tuple[Necrod, int]) -> None:
    d, port = watched
    text, _, _ = served(port)
    git = d.call("daemon.status")["git"]["version"]
    info = [line for line in text.splitlines() if line.startswith("necrod_build_info{")]
    assert len(info) == 1 and f'version="{__version__}"' in info[0] and f'git="{git}"' in info[0], info
    last_ok = sample(text, "necrod_fetch_last_success_timestamp_seconds", pool="repo")
    assert last_ok is not None and time.time() - 120 < last_ok <= time.time()
    assert sample(text, "necrod_fetch_interval_seconds", pool="repo") == 1
    assert sample(text, "necrod_lease_oldest_age_seconds", pool="repo") is None  # no lease held
    with d.client() as c:
        c.allocate("repo", ttl_s=600)
        time.sleep(1.2)
        c.allocate("repo", ttl_s=600)
        age = sample(served(port)[0], "necrod_lease_oldest_age_seconds", pool="repo")
    assert age is not None and 1.0 <= age < 60, age
    # Fetches go on every second: the last success moves forward.
    wait_for(lambda: (s := sample(served(port)[0], "necrod_fetch_last_success_timestamp_seconds", pool="repo"))
             and s > last_ok, 20, what="a later fetch")  # fmt: skip
    assert sample(text, "process_start_time_seconds") is not None
    assert sample(text, "process_open_fds") is not None


# --- the alerts and the dashboard ---------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


@needs_promtool
def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a unit test.
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    covered = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert covered == {rule["alert"] for rule in alert_rules()}


def test_the_alerts_cover_what_the_issue_asks_for() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    wanted = {"NecrodMirrorStale", "NecrodPoolFetchFailing", "NecrodPoolNotReady", "NecrodDiskLow",
              "NecrodSlotsExhausted", "NecrodTasksStuck", "NecrodTamper"}  # fmt: skip
    assert wanted <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_alerts_and_the_dashboard_name_only_series_necrod_serves(watched: tuple[Necrod, int]) -> None:
    d, port = watched
    with d.client() as c:
        c.allocate("repo", ttl_s=600)
    _, _, samples = served(port)
    # Series that need a histogram observation or a task to show are still families necrod serves.
    _, families, _ = served(port)
    names = samples | {
        f"{f}_{s}" for f, t in families.items() if t == "histogram" for s in ("bucket", "sum", "count")
    }
    names |= set(families)
    for rule in alert_rules():
        unknown = set(METRIC_NAME.findall(rule["expr"])) - names
        assert not unknown, f"alert {rule['alert']} names {unknown}, which necrod does not serve"
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        unknown = set(METRIC_NAME.findall(expr)) - names
        assert not unknown, f"dashboard query {expr!r} names {unknown}, which necrod does not serve"


def test_the_dashboard_shows_every_signal_the_alerts_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    shown = {name for expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    for rule in alert_rules():
        watched_names = set(METRIC_NAME.findall(rule["expr"]))
        assert watched_names <= shown, (
            f"{rule['alert']} watches {watched_names - shown}, not on the dashboard"
        )
    for expr in dashboard_queries():
        assert '$instance"' in expr or "$instance" in expr, f"{expr!r} ignores the instance variable"


def test_a_metrics_port_in_use_stops_the_start_with_one_line(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = necrod_factory(f"daemon:\n  metrics_listen: 127.0.0.1:{port}\n" + pool_config({"repo": origin}),
                           start=False)  # fmt: skip
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(30) == 1
    lines = [line for line in d.log().splitlines() if line.startswith("necrod: ")]
    assert lines == [f"necrod: cannot serve metrics on 127.0.0.1:{port}: Address already in use"], d.log()
    assert "Traceback" not in d.log()
