"""``necroctl``: a thin client that only speaks the protocol.

Exit codes: 0 success; 1 the daemon answered with an error (its kind and message are printed);
2 usage error; 3 no daemon answered (``status``: also when the daemon is degraded or stopping);
4 ``status`` could not tell; ``run`` exits with its command's status (its own codes are in
``necrod.ctl.run``). Every command takes ``--json`` (the result object as the daemon
sent it) and ``--socket`` (default ``$NECROD_SOCKET``, then the per-user socket, then the
system one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from necrod import __version__
from necrod.client import Client
from necrod.ctl import render, run, show
from necrod.proto.errors import DaemonUnreachable, NecrodError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNKNOWN = 0, 1, 2, 3, 4


def _common() -> argparse.ArgumentParser:
    # On every subcommand too, so options work before or after it; SUPPRESS keeps the
    # subcommand's absent option from overwriting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help="daemon socket (default: $NECROD_SOCKET, the per-user socket, then /run/necrod/necrod.sock); "
        "with -H, the daemon's socket on that host",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the daemon's result as JSON"
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for a reply"
    )
    common.add_argument(
        "-H",
        "--host",
        default=argparse.SUPPRESS,
        metavar="ssh://[USER@]HOST[:PORT][/SOCKET]",
        help="talk to the necrod of another host over SSH (default: $NECROD_HOST)",
    )
    common.add_argument(
        "--ssh-key", default=argparse.SUPPRESS, help="private key for -H (default: agent, ~/.ssh)"
    )
    common.add_argument(
        "--known-hosts", default=argparse.SUPPRESS, help="known_hosts for -H (default: ~/.ssh/known_hosts)"
    )
    common.add_argument(
        "--accept-unknown-host-key",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with -H, connect even when the host key is not in known_hosts",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="necroctl", description="Drive a necrod daemon.", parents=[common])
    p.add_argument("--version", action="version", version=f"necroctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    cmd("status", "the daemon's health, config and pools (exit 0 running, 3 degraded or not running)")
    cmd("pools", "pools with their slots by state and fetch state")
    s = cmd("slots", "slots, their state, commit and lease")
    s.add_argument("--pool")
    s.add_argument("--state", choices=("creating", "available", "allocated", "cleaning", "error", "removing"))
    s.add_argument("-l", "--long", action="store_true", help="also path, disk use and last use")
    a = cmd("allocate", "lease a clean slot; prints its path")
    a.add_argument("pool")
    a.add_argument("--holder", help="who holds the lease (default: necroctl@pid)")
    a.add_argument("--ttl", type=float, help="seconds the lease lives without a heartbeat")
    a.add_argument("--ref", help="check out this branch, tag or commit (detached)")
    a.add_argument("--branch", help="create this branch in the slot")
    a.add_argument("--wait", type=float, help="queue up to this many seconds for a free slot")
    a.add_argument("--metadata", type=json.loads, help="JSON object stored with the lease")
    a.add_argument("--ports", type=int, help="TCP ports to hold with the lease (default: the pool's ports)")
    h = cmd("heartbeat", "keep a lease alive")
    h.add_argument("lease_id")
    h.add_argument("--ttl", type=float)
    r = cmd("release", "give a slot back (it is salvaged and cleaned in the background)")
    r.add_argument("lease_id")
    r.add_argument(
        "--no-salvage", action="store_true", help="discard what the lease left without a salvage ref"
    )
    ad = cmd("add-slot", "add a slot to a pool")
    ad.add_argument("pool")
    rm = cmd("remove-slot", "remove a slot (an allocated one only with --force, which salvages first)")
    rm.add_argument("slot_id")
    rm.add_argument("--force", action="store_true")
    cmd("reload", "re-read pools.yaml and apply it (an invalid file changes nothing)")
    w = cmd("watch", "print events as they happen")
    w.add_argument("--topic", action="append", dest="topics", help="only this topic (repeatable)")
    w.add_argument("--since", type=int, help="first replay events after this seq")
    w.add_argument("--snapshot", action="store_true", help="print the current state first")
    an = cmd("anomalies", "look for broken slots, stray directories, stale locks, overdue leases")
    an.add_argument("--pool")
    an.add_argument(
        "--heal", action="store_true", help="also mend what is found (as the scheduled scan does)"
    )
    an.add_argument("--deep", action="store_true", help="also check every idle slot and the mirror's objects")
    rc = cmd("recover", "rebuild a slot in error (what it holds is salvaged first)")
    rc.add_argument("slot_id")
    iso = cmd("isolate", "take a slot out of rotation, untouched, for inspection")
    iso.add_argument("slot_id")
    iso.add_argument("--reason")
    cmd("metrics", "Prometheus metrics, as text")
    cmd("hosts", "the hosts tasks run on: state, pools, running tasks, last contact")
    sub_ = cmd("submit", "queue a task (or a batch from a YAML file)")
    sub_.add_argument("pool", nargs="?", help="the pool (or set pool: in the file)")
    sub_.add_argument("argv", nargs="*", metavar="COMMAND", help="the command, after --")
    sub_.add_argument("-f", "--file", help="a tasks.yaml batch: top-level keys are defaults, tasks: a list")
    sub_.add_argument("--runner", help="a runner profile from pools.yaml")
    sub_.add_argument("--payload", type=json.loads, help="JSON passed to the runner ($NECROD_PAYLOAD)")
    sub_.add_argument("--priority", type=int)
    sub_.add_argument("--label", action="append", dest="labels")
    sub_.add_argument("--skill", action="append", dest="skills")
    sub_.add_argument("--depends-on", action="append", dest="depends_on", metavar="TASK")
    sub_.add_argument("--max-retries", type=int)
    sub_.add_argument(
        "--task-timeout", type=float, dest="timeout_s", help="stop the task after this many seconds"
    )
    sub_.add_argument("--env", action="append", metavar="NAME=VALUE")
    sub_.add_argument("--ref")
    sub_.add_argument("--branch")
    sub_.add_argument("--project")
    sub_.add_argument("--failure-strategy", choices=("continue", "stop-all", "retry"))
    tl = cmd("tasks", "tasks and their state (--graph: the levels that can run in parallel)")
    tl.add_argument("--state", choices=("queued", "blocked", "running", "succeeded", "failed", "cancelled"))
    tl.add_argument("--pool")
    tl.add_argument("--label")
    tl.add_argument("--batch")
    tl.add_argument("--graph", action="store_true")
    tg = cmd("task", "one task with its attempts")
    tg.add_argument("task_id")
    for name, text in (("cancel", "cancel a task (a running one is stopped, its slot salvaged)"),
                       ("retry", "queue a failed or cancelled task again (and what it blocked)")):  # fmt: skip
        c_ = cmd(name, text)
        c_.add_argument("task_id", nargs="?")
        c_.add_argument("--batch")
        if name == "cancel":
            c_.add_argument("--reason", help="why (kept on the task and its event)")
            c_.add_argument("--force", action="store_true", help="SIGKILL a running task at once, no grace")
    up = cmd("update", "change a queued task's priority or labels (the queue reorders at once)")
    up.add_argument("task_id")
    up.add_argument("--priority", type=int)
    up.add_argument(
        "--label", action="append", dest="labels", help="the task's labels, all of them (repeatable)"
    )
    cmd("runners", "runner profiles: launcher, limits, running tasks, paused or not")
    pa = cmd("pause", "pause a runner profile: it starts nothing; its running tasks finish")
    pa.add_argument("runner")
    pa.add_argument("--reason")
    rs = cmd("resume", "resume a paused runner profile")
    rs.add_argument("runner")
    rf = cmd("refs", "the branches and tags of a pool's origin, with their commits")
    rf.add_argument("pool")
    rf.add_argument("--pattern", help="a glob on the name (release/*)")
    pl = cmd("prepare-log", "the output of a pool's last prepare step")
    pl.add_argument("pool")
    pl.add_argument("-f", "--follow", action="store_true", help="keep printing until the step ends")
    lg = cmd("logs", "a task attempt's output")
    lg.add_argument("task_id")
    lg.add_argument("--attempt", type=int, help="default: the latest")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the attempt ends")
    sv = cmd("salvage", "work salvaged from slots before they were cleaned")
    svsub = sv.add_subparsers(dest="salvage_command", metavar="list|show|prune", required=True)
    sl = svsub.add_parser("list", help="salvage refs, newest first", parents=[common])
    sl.add_argument("--pool")
    ss = svsub.add_parser("show", help="what one salvage holds and how to fetch it", parents=[common])
    ss.add_argument("lease_id")
    sp = svsub.add_parser(
        "prune", help="delete salvage past each pool's salvage_keep_* limits", parents=[common]
    )
    sp.add_argument("--pool")
    sp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    run.configure(cmd("run", "run a command in a leased slot, heartbeating it; exits with its status"))
    return p


def _submission(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        import yaml

        with open(args.file) as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
            raise SystemExit(f"necroctl submit: {args.file} needs a tasks: list")
        if args.pool:
            doc.setdefault("pool", args.pool)
        return doc
    if not args.pool:
        raise SystemExit("necroctl submit: give a pool (or --file)")
    env = {}
    for item in args.env or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"necroctl submit: --env {item!r} is not NAME=VALUE")
        env[name] = value
    fields = ("runner", "payload", "priority", "labels", "skills", "depends_on", "max_retries", "timeout_s",
              "ref", "branch", "project", "failure_strategy")  # fmt: skip
    task = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.argv:
        task["command"] = args.argv
    if env:
        task["env"] = env
    return {"pool": args.pool, **task}


def _prepare_log(args: argparse.Namespace, c: Client) -> int:
    offset = 0
    while True:
        chunk = c.call("pools.prepare_log", {"pool": args.pool, "offset": offset})
        if chunk["data"]:
            sys.stdout.write(chunk["data"])
            sys.stdout.flush()
        offset = chunk["offset"]
        if not args.follow or (chunk["eof"] and not chunk["data"]):
            return EXIT_OK
        if not chunk["data"]:
            time.sleep(0.5)


def _logs(args: argparse.Namespace, c: Client) -> int:
    offset, attempt = 0, args.attempt
    while True:
        chunk = c.logs(args.task_id, attempt=attempt, offset=offset)
        attempt = chunk["attempt"] or attempt
        if chunk["data"]:
            sys.stdout.write(chunk["data"])
            sys.stdout.flush()
        offset = chunk["offset"]
        if not args.follow or (chunk["eof"] and not chunk["data"]):
            if args.follow and attempt is None and not chunk["eof"]:
                time.sleep(0.5)
                continue
            return EXIT_OK
        if not chunk["data"]:
            time.sleep(0.5)


# --- commands ----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, c: Client) -> tuple[Any, Callable[[Any], None] | None]:
    match args.command:
        case "status":
            return c.status(), show.status
        case "pools":
            return c.pools(), show.pools
        case "slots":
            return c.slots(args.pool, args.state), lambda r: show.slots(r, args.long)
        case "allocate":
            if args.metadata is not None and not isinstance(args.metadata, dict):
                raise SystemExit("necroctl: --metadata must be a JSON object")
            holder = args.holder or f"necroctl@{os.getpid()}"
            return c.allocate(
                args.pool,
                holder=holder,
                ttl_s=args.ttl,
                ref=args.ref,
                branch=args.branch,
                wait_s=args.wait,
                metadata=args.metadata,
                ports=args.ports,
            ), show.lease
        case "heartbeat":
            return c.heartbeat(args.lease_id, args.ttl), lambda r: print(
                f"lease {r['lease_id']} expires {render.until(r['expires_at'])}"
            )
        case "release":
            return c.release(args.lease_id, salvage=False if args.no_salvage else None), lambda r: print(
                f"slot {r['slot_id']} released; {r['state']}"
                + (" (salvaging what was left)" if r.get("salvage") else "")
            )
        case "add-slot":
            return c.add_slot(args.pool), lambda r: print(f"slot {r['slot_id']} {r['state']} at {r['path']}")
        case "remove-slot":
            return c.remove_slot(args.slot_id, force=args.force), lambda r: print(
                f"slot {r['slot_id']} {r['state']}"
            )
        case "reload":

            def show_reload(r: dict[str, Any]) -> None:
                print(f"config generation {r['generation']}")
                for change in r.get("changes", []):
                    print(f"  {change}")
                if r.get("note"):
                    print(r["note"])
                if not r.get("changes") and not r.get("note"):
                    print("  nothing changed")

            return c.reload(), show_reload
        case "anomalies":

            def show_anomalies(r: dict[str, Any]) -> None:
                if not r["anomalies"]:
                    print("no anomalies")
                    return
                rows = [
                    (a["pool"], a["slot_id"], a["kind"], a["detail"], a["action"]) for a in r["anomalies"]
                ]
                print(render.table(rows, ("POOL", "SLOT", "KIND", "DETAIL", "ACTION")))

            return c.anomalies(args.pool, heal=args.heal, deep=args.deep), show_anomalies
        case "recover":
            return c.recover(args.slot_id), lambda r: print(f"slot {r['slot_id']} {r['state']}")
        case "isolate":
            return c.isolate(args.slot_id, args.reason), lambda r: print(
                f"slot {r['slot_id']} {r['state']}"
                + (f": {r['error']}" if r.get("error") else " (isolated when released)")
            )
        case "metrics":
            return c.metrics(), lambda r: print(r["text"], end="")
        case "hosts":
            return c.hosts(), lambda r: print(render.table(
                [(h["name"], h["state"], h["address"], ",".join(h["pools"]), f"{len(h['running'])}/{h['max_concurrency']}",
                  " ".join(h["running"]), render.ago(h.get("last_contact")), h.get("error")) for h in r["hosts"]],
                ("HOST", "STATE", "ADDRESS", "POOLS", "RUNNING", "TASKS", "LAST CONTACT", "ERROR")))  # fmt: skip
        case "submit":
            return c.submit(**_submission(args)), show.submitted
        case "tasks":
            return c.tasks(state=args.state, pool=args.pool, label=args.label, batch=args.batch,
                           graph=args.graph), lambda r: show.tasks(r, args.graph)  # fmt: skip
        case "task":
            return c.task(args.task_id), show.task
        case "cancel" | "retry":
            if (args.task_id is None) == (args.batch is None):
                raise SystemExit(f"necroctl {args.command}: give a task id or --batch")
            if args.command == "cancel":
                return c.cancel(args.task_id, batch=args.batch, reason=args.reason,
                                force=args.force or None), show.submitted  # fmt: skip
            return c.retry(args.task_id, batch=args.batch), show.submitted
        case "update":
            if args.priority is None and args.labels is None:
                raise SystemExit("necroctl update: give --priority or --label")
            return c.update(args.task_id, priority=args.priority, labels=args.labels), lambda r: print(
                f"{r['task_id']}: {r['state']}, priority {r['priority']}, labels {','.join(r['labels']) or '-'}"
            )
        case "runners":
            return c.runners(), show.runners
        case "pause":
            return c.pause(args.runner, args.reason), lambda r: print(f"runner {r['runner']} paused")
        case "resume":
            return c.resume(args.runner), lambda r: print(f"runner {r['runner']} resumed")
        case "refs":
            return c.refs(args.pool, args.pattern), show.refs
        case "salvage":
            if args.salvage_command == "list":
                return c.salvage_list(args.pool), lambda r: print(
                    render.table(
                        [
                            (
                                i["pool"],
                                i["lease_id"],
                                render.short(str(i["commit"])),
                                render.iso(i["date"]),
                                i["subject"],
                            )
                            for i in r["salvage"]
                        ],
                        ("POOL", "LEASE", "COMMIT", "DATE", "SUBJECT"),
                    )
                )

            def show_salvage(r: dict[str, Any]) -> None:
                print(f"{r['ref']} in pool {r['pool']}: {r['commit']}")
                print(f"  {r['subject']} ({render.iso(r['date'])})")
                for f in r["files"]:
                    print(f"  {f['status']}\t{f['path']}")
                for sub in r.get("submodules", []):
                    print(f"  submodule {sub['path']}: {sub['commit']}")
                    for f in sub["files"]:
                        print(f"    {f['status']}\t{f['path']}")
                print(f"get it with: {r['fetch']}")

            if args.salvage_command == "prune":

                def show_pruned(r: dict[str, Any]) -> None:
                    verb = "would delete" if r["dry_run"] else "deleted"
                    print(f"{verb} {len(r['pruned'])} salvage ref(s)")
                    for i in r["pruned"]:
                        print(f"  {i['pool']}\t{i['lease_id']}\t{render.iso(i['date'])}\t{i['bytes']} bytes")

                return c.salvage_prune(args.pool, dry_run=args.dry_run), show_pruned
            return c.salvage_show(args.lease_id), show_salvage
    raise AssertionError(args.command)


def _watch(args: argparse.Namespace, c: Client, as_json: bool) -> int:
    result = c.subscribe(args.topics, since=args.since, snapshot=args.snapshot or None)
    if args.snapshot and "snapshot" in result:
        if as_json:
            print(json.dumps({"snapshot": result["snapshot"], "seq": result["seq"]}), flush=True)
        else:
            show.slots({"slots": result["snapshot"]["slots"]}, False)
            print(f"-- events after seq {result['seq']} --", flush=True)
    if result.get("truncated"):
        print("necroctl: events before the oldest kept were pruned; replaying from there", file=sys.stderr)
    for event in c.events(timeout=None):
        if as_json:
            print(json.dumps(event), flush=True)
        else:
            show.event(event)
        if event.get("type") == "overflow":
            print("necroctl: the daemon closed the subscription (we fell behind)", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; for ``submit``, everything after ``--`` is the command, whatever options
    stand before it or after the pool (argparse alone would take the pool and the command as one
    group of positionals and refuse an option between them)."""
    if "--" in argv and "submit" in argv[: argv.index("--")]:
        cut = argv.index("--")
        args = _parser().parse_args(argv[:cut])
        args.argv = [*args.argv, *argv[cut + 1 :]]
        return args
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    if args.command == "run":
        return run.main(args)
    as_json = getattr(args, "json", False)
    host = getattr(args, "host", None) or os.environ.get("NECROD_HOST") or None
    ssh_options = {"key": getattr(args, "ssh_key", None), "known_hosts": getattr(args, "known_hosts", None),
                   "accept_unknown": getattr(args, "accept_unknown_host_key", None),
                   "socket": getattr(args, "socket", None) if host else None}  # fmt: skip
    try:
        client = Client(host or getattr(args, "socket", None), timeout=getattr(args, "timeout", 120.0),
                        ssh_options=ssh_options)  # fmt: skip
    except DaemonUnreachable as exc:
        print(f"necroctl: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with client:
            if args.command == "watch":
                return _watch(args, client, as_json)
            if args.command == "logs":
                return _logs(args, client)
            if args.command == "prepare-log":
                return _prepare_log(args, client)
            result, present = _run(args, client)
    except DaemonUnreachable as exc:
        print(f"necroctl: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except NecrodError as exc:
        if as_json:
            print(json.dumps({"error": {"kind": exc.kind, "message": exc.message, **exc.data}}, indent=2))
        print(f"necroctl: {exc.kind}: {exc.message}", file=sys.stderr)
        return EXIT_UNKNOWN if args.command == "status" else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else 130
    except BrokenPipeError:
        return EXIT_OK
    if as_json:
        print(json.dumps(result, indent=2))
    elif present is not None:
        present(result)
    if args.command == "status" and result.get("state") != "running":
        return EXIT_UNREACHABLE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
