"""``necroctl salvage``: find what agents left, look at it, and pick it up."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

from necrod.client import Client
from necrod.ctl import render, show

Shown = tuple[Any, Callable[[Any], None] | None]


def run(args: Any, c: Client) -> Shown:
    match args.salvage_command:
        case "list":
            return c.salvage_list(args.pool), _list
        case "show":
            return c.salvage_show(args.lease_id), _show
        case "diff":
            return c.salvage_diff(args.lease_id), _diff
        case "checkout":
            pool = args.pool or c.salvage_show(args.lease_id)["pool"]
            return c.allocate(pool, holder=f"necroctl salvage checkout {args.lease_id}", ttl_s=args.ttl,
                              branch=args.branch, from_salvage=args.lease_id), show.lease  # fmt: skip
        case "apply":
            return _apply(c, args.lease_id, args.directory), _applied
        case "branch" | "push":
            pushed = args.salvage_command == "push"
            return c.salvage_branch(args.lease_id, args.branch, message=args.message, push=pushed), _branch
        case "prune":
            return c.salvage_prune(args.pool, dry_run=args.dry_run), _pruned
    raise AssertionError(args.salvage_command)


def _list(r: dict[str, Any]) -> None:
    rows = [(i["pool"], i["lease_id"], render.short(str(i["commit"])), render.iso(i["date"]), i["subject"])
            for i in r["salvage"]]  # fmt: skip
    print(render.table(rows, ("POOL", "LEASE", "COMMIT", "DATE", "SUBJECT")))


def _show(r: dict[str, Any]) -> None:
    print(f"{r['ref']} in pool {r['pool']}: {r['commit']}")
    print(f"  {r['subject']} ({render.iso(r['date'])})")
    for f in r["files"]:
        print(f"  {f['status']}\t{f['path']}")
    for sub in r.get("submodules", []):
        print(f"  submodule {sub['path']}: {sub['commit']}")
        for f in sub["files"]:
            print(f"    {f['status']}\t{f['path']}")
    print(f"get it with: {r['fetch']}")


def _diff(r: dict[str, Any]) -> None:
    sys.stdout.write(r["patch"])
    if r["truncated"]:
        print(f"necroctl: the patch was cut short; the whole of it: git -C <mirror> diff {r['start']} "
              f"{r['commit']}", file=sys.stderr)  # fmt: skip


def _apply(c: Client, lease_id: str, directory: str) -> dict[str, Any]:
    found: dict[str, Any] = c.salvage_diff(lease_id, binary=True)
    if found["truncated"]:
        raise SystemExit(f"necroctl: the salvage of {lease_id} is too big to send as a patch; "
                         f"use `necroctl salvage checkout {lease_id}` or branch it")  # fmt: skip
    if not found["patch"]:
        return {**found, "applied": False, "directory": directory}
    applied = subprocess.run(["git", "-C", directory, "apply", "--whitespace=nowarn", "-"],
                             input=found["patch"].encode(), capture_output=True)  # fmt: skip
    if applied.returncode != 0:
        raise SystemExit(
            f"necroctl: git apply failed in {directory}: {applied.stderr.decode(errors='replace').strip()}"
        )
    return {**found, "applied": True, "directory": directory}


def _applied(r: dict[str, Any]) -> None:
    if r["applied"]:
        print(f"applied the work of lease {r['lease_id']} in {r['directory']}")
    else:
        print(f"the salvage of {r['lease_id']} changes nothing")


def _branch(r: dict[str, Any]) -> None:
    where = "in the mirror and on the origin" if r["pushed"] else "in the mirror"
    print(f"branch {r['branch']} at {render.short(r['commit'])} {where}")
    if not r["pushed"]:
        print(f"get it with: {r['fetch']}")


def _pruned(r: dict[str, Any]) -> None:
    verb = "would delete" if r["dry_run"] else "deleted"
    print(f"{verb} {len(r['pruned'])} salvage ref(s)")
    for i in r["pruned"]:
        print(f"  {i['pool']}\t{i['lease_id']}\t{render.iso(i['date'])}\t{i['bytes']} bytes")
