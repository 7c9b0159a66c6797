"""The dispatcher's pure parts: dependencies, policies, fair share, templates, backoff."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from necrod.core.config.model import ContainerSpec, KubernetesSpec, RunnerProfile
from necrod.core.scheduler import FairShare, ProfileView, choose_profile, effective_priority, eligible, order
from necrod.core.tasks import Task, body_dependencies, find_cycle, levels, retry_delay
from necrod.core.templates import TemplateError, check, render


def mk(seq: int, **kw: object) -> Task:
    return Task(task_id=f"t-{seq}", seq=seq, pool=str(kw.pop("pool", "p")), submitted_at=0.0, **kw)  # type: ignore[arg-type]


def test_body_dependencies() -> None:
    body = "Fix the parser.\nDepends on #42\nblocked by #7, #8 and #9\nSee #100 (not a dependency)\ndepends on: #42"
    assert body_dependencies(body) == [42, 7, 8, 9]
    assert body_dependencies("no deps here") == []


def test_cycles_and_levels() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    cycle = find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    # The seed's example: 43 depends on 42, 45 on 43; 44 is free.
    assert levels({"42": [], "43": ["42"], "44": [], "45": ["43"]}) == [["42", "44"], ["43"], ["45"]]
    assert levels({"b": ["gone"], "c": ["b"]}) == [["b"], ["c"]]  # finished dependencies do not count
    deep = {f"n{i}": [f"n{i - 1}"] if i else [] for i in range(5000)}
    assert len(levels(deep)) == 5000 and find_cycle(deep) is None


def test_fifo_and_priority_order() -> None:
    tasks = [mk(1), mk(2, priority=5), mk(3, labels=["bug"]), mk(4, labels=["urgent"]), mk(5, priority=5)]
    fair = FairShare()
    assert [t.seq for t in order(tasks, "fifo", label_priority={}, fair=fair, fair_key_by="project", now=0)] == [
        1, 2, 3, 4, 5]  # fmt: skip
    rules = {"urgent": 100, "bug": 50}
    got = order(tasks, "priority", label_priority=rules, fair=fair, fair_key_by="project", now=0)
    assert [t.seq for t in got] == [4, 3, 2, 5, 1]
    assert effective_priority(mk(9, priority=1, labels=["bug", "urgent"]), rules) == 151


def test_fair_share_decays_and_honours_weights() -> None:
    fair = FairShare(half_life_s=100.0)
    fair.add("a", 100.0, now=0.0)
    assert fair.decayed("a", 100.0) == pytest.approx(50.0)
    assert fair.decayed("a", 200.0) == pytest.approx(25.0)
    f = fair.factors(["a", "b"], now=0.0)
    assert f["b"] == 1.0 and f["a"] == pytest.approx(2 ** (-1 / 0.5))
    tasks = [mk(1, project="a"), mk(2, project="a"), mk(3, project="b")]
    assert [t.seq for t in order(tasks, "fair-share", label_priority={}, fair=fair, fair_key_by="project",
                                 now=0.0)] == [3, 1, 2]  # fmt: skip
    # Equal usage, but "a" is entitled to three times the share: "a" goes first.
    even = FairShare(half_life_s=100.0, weights={"a": 3.0})
    even.add("a", 30.0, now=0.0)
    even.add("b", 30.0, now=0.0)
    factors = even.factors(["a", "b"], now=0.0)
    assert factors["a"] > factors["b"]


def test_profiles_by_skill_and_capacity() -> None:
    general = ProfileView("general", frozenset({"python", "go", "rust"}), 2)
    py = ProfileView("py", frozenset({"python"}), 1)
    only_web = ProfileView("web", frozenset({"python"}), 5, frozenset({"web"}))
    task = mk(1, skills=["python"])
    assert [p.name for p in eligible(task, [general, py, only_web])] == ["general", "py"]
    assert choose_profile(task, [general, py], {}, "skill") == py  # best fit
    assert choose_profile(task, [general, py], {"py": 1}, "skill") == general  # py is full
    assert choose_profile(task, [general, py], {"py": 1, "general": 2}, "skill") is None
    assert choose_profile(mk(2, skills=["go"]), [general, py], {}, "fifo") == general
    assert eligible(mk(3, runner="py"), [general, py]) == [py]


def test_a_task_of_a_peer_that_is_not_an_admin_runs_only_where_that_is_no_escalation() -> None:
    """``process`` and ``tmux`` runners run as the daemon's uid, an admin: a non-admin's task
    there would give its submitter the daemon's rights (docs/operations.md, Peers)."""
    daemon = 1000
    plain = RunnerProfile(name="plain")
    boxed = RunnerProfile(name="boxed", launcher="container", container=ContainerSpec(image="i"))
    as_root = RunnerProfile(name="root", launcher="container", container=ContainerSpec(image="i", user="0:0"))
    as_daemon = RunnerProfile(
        name="d", launcher="kubernetes", kubernetes=KubernetesSpec(image="i", user="1000:1000")
    )
    assert not plain.open_to_anyone(daemon) and boxed.open_to_anyone(daemon)
    assert not as_root.open_to_anyone(daemon) and not as_daemon.open_to_anyone(daemon)
    assert RunnerProfile(name="opt-in", submitters="anyone").open_to_anyone(daemon)
    assert not replace(boxed, submitters="admins").open_to_anyone(daemon)
    views = [
        ProfileView(p.name, frozenset({"x"}), 1, open_to_anyone=p.open_to_anyone(daemon))
        for p in (plain, boxed)
    ]
    assert [v.name for v in eligible(mk(1, skills=["x"]), views)] == ["plain", "boxed"]
    assert [v.name for v in eligible(mk(2, skills=["x"], non_admin=True), views)] == ["boxed"]
    assert eligible(mk(3, runner="plain", non_admin=True), views) == []
    assert Task.from_row(mk(4, non_admin=True).to_row()).non_admin  # kept across restarts
    assert not Task.from_row({k: v for k, v in mk(5).to_row().items() if k != "non_admin"}).non_admin


def test_templates() -> None:
    ctx = {"task_id": "t-1", "slot_path": "/s/1", "payload": {"prompt": "fix it; rm -rf / $(x)", "n": 3}}
    assert render(["agent", "--cwd", "{slot_path}", "{payload.prompt}", "{payload.n}"], ctx) == [
        "agent", "--cwd", "/s/1", "fix it; rm -rf / $(x)", "3"]  # fmt: skip
    argv = render("agent --task {task_id} --prompt {payload.prompt} {{literal}}", ctx)
    assert argv == ["/bin/sh", "-c", "agent --task t-1 --prompt 'fix it; rm -rf / $(x)' {literal}"]
    with pytest.raises(TemplateError, match="unknown placeholder"):
        check(["{nope}"], None)
    with pytest.raises(TemplateError, match="payload has no 'missing'"):
        check(["{payload.missing}"], {"other": 1})
    check(["{payload}", "{task_id}"], None)


def test_retry_delay_grows_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    delays = [retry_delay(n, 10.0, 100.0, rng) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(100.0, 10.0 * 2 ** (n - 1))
        assert ceiling / 2 <= d <= ceiling
