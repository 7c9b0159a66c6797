"""How ``necroctl`` shows a result to a person (``--json`` prints the result as the daemon sent it)."""

from __future__ import annotations

import json
import sys
from typing import Any

from necrod.ctl import render


def status(r: dict[str, Any]) -> None:
    print(f"necrod {r['version']} pid {r['pid']}: {r['state']}, up {render.duration(r['uptime_s'])}")
    for reason in r.get("degraded", []):
        print(f"  ! {reason}")
    cfg = r["config"]
    print(
        f"config:  {cfg['path'] or 'embedded default'} (generation {cfg['generation']}, loaded {render.ago(cfg['loaded_at'])})"
    )
    if cfg.get("last_reload_error"):
        print(f"         last reload rejected: {cfg['last_reload_error']['text']}")
    print(f"socket:  {r['socket']}    state: {r['state_dir']}    git {r['git']['version']}")
    rows = []
    for name, p in r["pools"].items():
        s = p["slots"]
        rows.append(
            (
                name,
                _coming_up(p),
                s["available"],
                s["allocated"],
                s["cleaning"] + s["creating"],
                s["error"],
                p["waiting"],
                p["fetch"],
            )
        )
    if rows:
        print()
        print(
            render.table(
                rows, ("POOL", "STATE", "AVAILABLE", "ALLOCATED", "BUSY", "ERROR", "WAITING", "FETCH")
            )
        )


def pools(r: dict[str, Any]) -> None:
    rows = []
    for p in r["pools"]:
        s = p["slots"]
        f = p["fetch"]
        if f["state"] == "failing":
            fetch = f"failing since {render.iso(f['failing_since'])}: {f['last_error']}"
        else:
            fetch = f"{f['state']} {render.ago(f['last_ok_at'])}" if f["last_ok_at"] else f["state"]
        rows.append(
            (
                p["name"],
                _coming_up(p),
                p["base"],
                render.short(p["base_commit"]),
                f"{s['available']}/{s['allocated']}/{s['cleaning'] + s['creating']}/{s['error']}",
                p["waiting"],
                fetch,
                _prepare(p.get("prepare")),
            )
        )
    print(render.table(rows, ("POOL", "STATE", "BASE", "COMMIT", "AVAIL/ALLOC/BUSY/ERR", "WAITING", "FETCH",
                              "PREPARE")))  # fmt: skip
    for p in r["pools"]:
        prep = p.get("prepare")
        if prep and prep["state"] == "failed":
            print(f"\n{p['name']}: prepare failed: {prep['error']}\n(necroctl prepare-log {p['name']})")


def _coming_up(p: dict[str, Any]) -> str:
    """A pool's state, with its progress while it comes up (``cloning: receiving objects 45%``)."""
    g = p.get("progress")
    if not g:
        return str(p["state"])
    amount = f"{g['percent']}%" if g.get("percent") is not None else str(g.get("done"))
    if g.get("total") and g.get("stage") == "slots":
        amount = f"{g['done']}/{g['total']}"
    return f"{p['state']}: {g['phase']} {amount}"


def _prepare(prep: dict[str, Any] | None) -> str:
    if not prep:
        return "-"
    ready = f" ({render.short(prep['ready'])})" if prep["ready"] and prep["ready"] != prep["key"] else ""
    return f"{prep['state']}{ready}"


def slots(r: dict[str, Any], long: bool) -> None:
    rows = []
    for s in r["slots"]:
        # A held slot shows where its HEAD stands now, not where it was handed out.
        row: list[Any] = [
            s["slot_id"],
            s["state"],
            render.short(s.get("head_commit") or s["commit"]),
            s.get("head_branch") or s["branch"],
            s["holder"],
            render.until(s["expires_at"]) if s["expires_at"] else None,
        ]
        if long:
            row += [
                s["path"],
                render.size(s.get("disk_bytes")),
                s["allocations"],
                f"{s['held_s']:.0f}s" if s.get("held_s") is not None else None,
                render.ago(s["last_released_at"]),
                s["error"],
            ]
        rows.append(row)
    headers = ["SLOT", "STATE", "COMMIT", "BRANCH", "HOLDER", "EXPIRES"]
    if long:
        headers += ["PATH", "DISK", "USES", "HELD", "LAST USED", "ERROR"]
    print(render.table(rows, headers))


def lease(r: dict[str, Any]) -> None:
    print(r["path"])
    print(
        f"lease {r['lease_id']} on slot {r['slot_id']} at {render.short(r['commit'])}"
        + (f" branch {r['branch']}" if r.get("branch") else "")
        + f", fencing token {r['fencing_token']}, expires {render.until(r['expires_at'])}"
        + (f", ports {','.join(map(str, r['ports']))}" if r.get("ports") else "")
        + (f", sparse {','.join(r['sparse'])}" if r.get("sparse") else ""),
        file=sys.stderr,
    )


def event(e: dict[str, Any]) -> None:
    skip = {"seq", "ts", "topic", "type", "subscription"}
    detail = " ".join(
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in e.items() if k not in skip
    )
    print(f"{render.iso(e.get('ts'))} {e.get('seq') or '-':>6} {e.get('type')} {detail}", flush=True)


def submitted(r: dict[str, Any]) -> None:
    for t in r.get("tasks", [r]):
        key = f" ({t['key']})" if t.get("key") else ""
        salvage = f"; its work is in {t['salvage_ref']}" if t.get("salvage_ref") else ""
        print(f"{t['task_id']}{key}: {t['state']}{salvage}")
    if r.get("batch"):
        print(f"batch {r['batch']}")


def runners(r: dict[str, Any]) -> None:
    rows = [(p["name"], p["launcher"], f"{p['running']}/{p['max_concurrency']}",
             ",".join(p["pools"]) if p["pools"] is not None else "all",
             "paused" + (f": {p['pause']['reason']}" if p["pause"] and p["pause"].get("reason") else "")
             if p["paused"] else "")
            for p in r["runners"]]  # fmt: skip
    print(render.table(rows, ("RUNNER", "LAUNCHER", "RUNNING", "POOLS", "PAUSED")))


def refs(r: dict[str, Any]) -> None:
    rows = [("branch", b["name"], b["commit"]) for b in r["branches"]]
    rows += [("tag", t["name"], t["commit"]) for t in r["tags"]]
    print(render.table(rows, ("KIND", "NAME", "COMMIT")))


def tasks(r: dict[str, Any], graph: bool) -> None:
    if graph:
        for n, level in enumerate(r.get("levels", [])):
            print(f"level {n}: {' '.join(level)}")
        return
    rows = []
    for t in r["tasks"]:
        why = t["waiting_on"] or ""
        if t.get("reason") and t["state"] in ("blocked", "failed", "queued"):
            why = f"{why}: {t['reason']}" if why else t["reason"]
        rows.append((t["task_id"], t["state"], t["pool"], t["runner"], t["priority"], ",".join(t["labels"]),
                     t["attempts"], why))  # fmt: skip
    print(render.table(rows, ("TASK", "STATE", "POOL", "RUNNER", "PRIO", "LABELS", "ATTEMPTS", "WHY")))


def task(t: dict[str, Any]) -> None:
    print(
        f"{t['task_id']}: {t['state']} in pool {t['pool']}" + (f" ({t['reason']})" if t.get("reason") else "")
    )
    if t.get("waiting_on"):
        print(f"  waiting on {t['waiting_on']}")
    if t["depends_on"]:
        print(f"  depends on {' '.join(t['depends_on'])}")
    if t.get("dependents"):
        print(f"  blocks {' '.join(t['dependents'])}")
    if t.get("cancelled_by"):
        by = t["cancelled_by"]
        print(
            f"  cancelled by uid {by.get('uid')} pid {by.get('pid')}"
            + (f" ({by['client']})" if by.get("client") else "")
        )

    def used(a: dict[str, Any]) -> str:
        cpu, peak = a.get("cpu_s"), a.get("peak_memory_bytes")
        return " ".join(filter(None, (f"{cpu:.1f}s cpu" if cpu is not None else "",
                                      f"{peak / (1 << 20):.0f}MiB" if peak is not None else "")))  # fmt: skip

    rows = [(a["number"], a["runner"], a["slot_id"], render.iso(a["started_at"]), render.iso(a["ended_at"]),
             a["outcome"] or "running", a["exit_code"], used(a), a["detail"]) for a in t["attempts"]]  # fmt: skip
    if rows:
        print(
            render.table(
                rows, ("#", "RUNNER", "SLOT", "STARTED", "ENDED", "OUTCOME", "EXIT", "USED", "DETAIL")
            )
        )
