"""``necroctl``: a thin client that only speaks the protocol.

Exit codes (``necrod.ctl.cli`` has the table each command's help prints, docs/operations.md
explains it): 0 success; 1 the daemon answered with an error (``status``: degraded but
serving); 2 usage; 3 no daemon answered (``status``: not running or stopping); 4 ``status``
could not tell; 124 no reply within ``--timeout`` (the call may still complete); 130
interrupted; ``run`` exits with its command's status (its own codes are in ``necrod.ctl.run``).
Every command takes ``--json`` (the result object as the daemon sent it, and an error as
``{"error": {...}}``), ``--socket`` and ``-H``.

Each command imports what it needs when it runs: ``status`` must answer in the time the
interpreter takes to start, not in the time anyio, YAML or rich take to import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from necrod.client import Client
from necrod.ctl import cli, render, salvage, show
from necrod.ctl.cli import (
    EXIT_DEGRADED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNKNOWN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    sparse_of,
)
from necrod.proto.errors import DaemonUnreachable, NecrodError, ReplyTimeout

__all__ = ["EXIT_DEGRADED", "EXIT_ERROR", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_UNKNOWN", "EXIT_UNREACHABLE",
           "EXIT_USAGE", "main"]  # fmt: skip


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
              "ref", "branch", "sparse", "project", "failure_strategy")  # fmt: skip
    task = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.argv:
        task["command"] = args.argv
    if env:
        task["env"] = env
    return {"pool": args.pool, **task}


def _emit_chunk(chunk: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(chunk), flush=True)
    elif chunk["data"]:
        sys.stdout.write(chunk["data"])
        sys.stdout.flush()


def _prepare_log(args: argparse.Namespace, c: Client, as_json: bool) -> int:
    offset = 0
    while True:
        chunk = c.call("pools.prepare_log", {"pool": args.pool, "offset": offset})
        _emit_chunk(chunk, as_json)
        offset = chunk["offset"]
        if not args.follow or (chunk["eof"] and not chunk["data"]):
            return EXIT_OK
        if not chunk["data"]:
            time.sleep(0.5)


def _logs(args: argparse.Namespace, c: Client, as_json: bool) -> int:
    offset, attempt = 0, args.attempt
    while True:
        chunk = c.logs(args.task_id, attempt=attempt, offset=offset)
        attempt = chunk["attempt"] or attempt
        if chunk["data"] or not args.follow or chunk["eof"]:
            _emit_chunk(chunk, as_json)
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
                sparse=sparse_of(args),
                from_salvage=args.from_salvage,
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
            return salvage.run(args, c)
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


def status_code(result: dict[str, Any]) -> int:
    """``status``'s exit code for the daemon's answer."""
    state = result.get("state")
    if state == "running":
        return EXIT_DEGRADED if result.get("degraded") else EXIT_OK
    if state == "degraded":
        return EXIT_DEGRADED
    if state == "stopping":
        return EXIT_UNREACHABLE
    return EXIT_UNKNOWN


def _failed(exc: NecrodError, command: str, as_json: bool) -> int:
    """Say why the call failed (on stdout as JSON too, with ``--json``) and give its exit code."""
    message = exc.message
    if isinstance(exc, ReplyTimeout):
        message += "; the call may still complete on the daemon (look before repeating it)"
        code = EXIT_TIMEOUT
    elif isinstance(exc, DaemonUnreachable):
        code = EXIT_UNREACHABLE
    else:
        code = EXIT_UNKNOWN if command == "status" else EXIT_ERROR
    if as_json:
        print(json.dumps({"error": {"kind": exc.kind, "message": message, "exit_code": code, **exc.data}},
                         indent=2))  # fmt: skip
    if isinstance(exc, DaemonUnreachable):
        print(f"necroctl: {message}", file=sys.stderr)
    else:
        print(f"necroctl: {exc.kind}: {message}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """The reader of our stdout went away (``necroctl tasks | head -1``): point stdout at
    /dev/null so that the interpreter's last flush does not complain about it either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


#: Commands that print a runner's own output as it wrote it (colours and all); ``top`` draws
#: with rich, its cells as plain text (``top._table``).
RAW_OUTPUT = frozenset({"logs", "prepare-log", "top"})


def _guard_terminals() -> None:
    """stdout and stderr, where they are terminals, through ``render.Terminal``: what the daemon
    relays is the agents' to write. A pipe or a file gets it as it is (``--json`` escapes it)."""
    if sys.stdout.isatty():
        sys.stdout = render.Terminal(sys.stdout)
    if sys.stderr.isatty():
        sys.stderr = render.Terminal(sys.stderr)


def _client(opts: dict[str, Any]) -> Client:
    where, ssh_options = cli.reach(opts)
    return Client(where, timeout=opts["timeout"], ssh_options=ssh_options)


def _call(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    as_json = opts["json"]
    with _client(opts) as client:
        if args.command == "top":
            from necrod.ctl import top

            return top.main(args, client, opts)
        if args.command == "watch":
            return _watch(args, client, as_json)
        if args.command == "logs":
            return _logs(args, client, as_json)
        if args.command == "prepare-log":
            return _prepare_log(args, client, as_json)
        result, present = _run(args, client)
    code = status_code(result) if args.command == "status" else EXIT_OK
    try:
        if as_json:
            print(json.dumps(result, indent=2))
        elif present is not None:
            present(result)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return code


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(sys.argv[1:] if argv is None else list(argv))
    if args.command == "completion":
        from necrod.ctl import completion

        print(completion.script(args.shell), end="")
        return EXIT_OK
    if args.command == "run":
        from necrod.ctl import run

        return run.main(args)
    opts = cli.options(args)
    if args.command not in RAW_OUTPUT:
        _guard_terminals()
    try:
        return _call(args, opts)
    except NecrodError as exc:
        try:
            return _failed(exc, args.command, opts["json"])
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK if args.command in ("watch", "top") else EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
