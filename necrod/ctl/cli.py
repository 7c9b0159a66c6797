"""necroctl's command line: every command, its options, examples and exit codes.

Only argparse is imported here: building the parser is on the path of every command, so
``necroctl status`` must not pay for what another command uses.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from necrod import __version__

# --- exit codes (docs/operations.md has the table) ---------------------------------------------

EXIT_OK = 0
#: The daemon answered with an error; for ``status``: degraded but serving.
EXIT_ERROR = EXIT_DEGRADED = 1
EXIT_USAGE = 2
#: Nothing answers (no daemon, wrong socket, connection lost); for ``status``: not running, or stopping.
EXIT_UNREACHABLE = 3
#: ``status`` cannot tell: the daemon answered with an error, or with a state necroctl does not know.
EXIT_UNKNOWN = 4
#: No reply within ``--timeout`` (as coreutils' ``timeout``): the call may still complete.
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

_EXITS = """\
exit status:
  0    done
  1    the daemon refused: "necroctl: KIND: MESSAGE" on stderr (--json: the error object on stdout)
  2    usage error
  3    no daemon answered (not running, wrong --socket or -H, connection lost)
  124  no reply within --timeout: the call may still complete on the daemon
  130  interrupted"""

_STATUS_EXITS = """\
exit status:
  0    healthy: running, nothing degraded
  1    degraded but serving (the reasons are listed: a failing fetch, a rejected config, ...)
  2    usage error
  3    not running: nothing answers at the socket, or the daemon is stopping
  4    unknown: the daemon answered with an error, or with a state necroctl does not know
  124  no reply within --timeout: the daemon may be wedged, or only slow"""

_TOP_EXITS = """\
exit status:
  0    quit (q, or Ctrl-C)
  1    the daemon refused, or dropped the subscription (we fell behind)
  2    usage error
  3    no daemon answered, or the connection was lost
  124  no reply within --timeout to the first calls"""

_RUN_EXITS = """\
exit status:
  N    the command's own status (128+n when signal n killed it)
  2    usage error
  75   the lease was lost while the command ran, so it was stopped (EX_TEMPFAIL)
  125  necroctl run failed before the command started (no daemon, no slot)
  126  the command could not be executed
  127  the command was not found"""

_COMPLETION_EXITS = """\
exit status:
  0    the script was printed
  2    usage error (an unknown shell)"""

#: Examples shown under each command's help, one command per line.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "status": ("necroctl status", "necroctl status --json | jq .degraded",
               "necroctl -H ssh://ops@build-1 status || echo \"build-1: $?\""),
    "top": ("necroctl top", "necroctl top --pool web", "necroctl -H ssh://ops@build-1 top",
            "necroctl top | head -40   # not a terminal: a plain table, refreshed"),
    "pools": ("necroctl pools", "necroctl pools --json | jq '.pools[].fetch'"),
    "slots": ("necroctl slots --pool web --state allocated", "necroctl slots -l"),
    "allocate": ("cd \"$(necroctl allocate web --holder ci-42 --ttl 600)\"",
                 "necroctl allocate web --ref v1.4 --wait 30 --json"),
    "heartbeat": ("necroctl heartbeat l-2dcb5c428104ebab", "necroctl heartbeat l-2dcb5c428104ebab --ttl 1800"),
    "release": ("necroctl release l-2dcb5c428104ebab", "necroctl release l-2dcb5c428104ebab --no-salvage"),
    "add-slot": ("necroctl add-slot web",),
    "remove-slot": ("necroctl remove-slot web/3", "necroctl remove-slot web/3 --force"),
    "reload": ("necroctl reload", "necrod --check-config /etc/necrod/pools.yaml && necroctl reload"),
    "watch": ("necroctl watch", "necroctl watch --topic leases --topic tasks --json",
              "necroctl watch --since 4120"),
    "anomalies": ("necroctl anomalies", "necroctl anomalies --pool web --deep --heal"),
    "recover": ("necroctl recover web/3",),
    "isolate": ("necroctl isolate web/3 --reason 'disk errors; keep for a look'",),
    "metrics": ("necroctl metrics | grep necrod_leases",),
    "hosts": ("necroctl hosts", "necroctl hosts --json | jq '.hosts[] | select(.state != \"up\")'"),
    "submit": ("necroctl submit web -- make test", "necroctl submit web --runner claude --payload '{\"prompt\": \"fix #42\"}'",
               "necroctl submit --file tasks.yaml"),
    "tasks": ("necroctl tasks --state running", "necroctl tasks --batch b-3 --graph"),
    "task": ("necroctl task t-17", "necroctl task t-17 --json | jq .attempts"),
    "cancel": ("necroctl cancel t-17 --reason 'wrong branch'", "necroctl cancel --batch b-3"),
    "retry": ("necroctl retry t-17", "necroctl retry --batch b-3"),
    "update": ("necroctl update t-17 --priority 10", "necroctl update t-17 --label urgent --label bug"),
    "runners": ("necroctl runners",),
    "pause": ("necroctl pause claude --reason 'API quota'",),
    "resume": ("necroctl resume claude",),
    "refs": ("necroctl refs web --pattern 'release/*'",),
    "prepare-log": ("necroctl prepare-log web", "necroctl prepare-log web -f"),
    "logs": ("necroctl logs t-17", "necroctl logs t-17 --attempt 1", "necroctl logs t-17 -f",
             "necroctl logs t-17 --json | jq -r .data"),
    "salvage": ("necroctl salvage list --pool web", "necroctl salvage show l-2dcb5c428104ebab",
                "necroctl salvage diff l-2dcb5c428104ebab | less", "necroctl salvage checkout l-2dcb5c428104ebab",
                "necroctl salvage push l-2dcb5c428104ebab agent/fix-login", "necroctl salvage prune --dry-run"),
    "run": ("necroctl run --pool web -- make test", "necroctl run --pool web --ref \"$GIT_COMMIT\" --salvage always -- ./ci.sh"),
    "completion": ("necroctl completion bash > /etc/bash_completion.d/necroctl",
                   "necroctl completion zsh > \"${fpath[1]}/_necroctl\"",
                   "necroctl completion fish > ~/.config/fish/completions/necroctl.fish"),
}  # fmt: skip

_EXIT_TEXT = {"status": _STATUS_EXITS, "top": _TOP_EXITS, "run": _RUN_EXITS, "completion": _COMPLETION_EXITS}


def epilog(command: str) -> str:
    examples = "\n".join(f"  {line}" for line in EXAMPLES.get(command, ()))
    return (f"examples:\n{examples}\n\n" if examples else "") + _EXIT_TEXT.get(command, _EXITS)


def reach_options() -> argparse.ArgumentParser:
    """How to reach the daemon: --socket, --timeout, -H and the SSH options (``necrod mcp``
    takes the same)."""
    # On every subcommand too, so options work before or after it; SUPPRESS keeps the
    # subcommand's absent option from overwriting the one given before it.
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help="daemon socket (default: $NECROD_SOCKET, the per-user socket, then /run/necrod/necrod.sock); "
        "with -H, the daemon's socket on that host",
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for a reply (default 120)"
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


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False, parents=[reach_options()])
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help='print the daemon\'s result as JSON (errors too: {"error": {"kind": ..., "message": ...}})',
    )
    return common


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True)
    p.add_argument("--ref", help="check out this branch, tag or commit (detached)")
    p.add_argument("--branch", help="create this branch in the slot")
    p.add_argument(
        "--ttl", type=float, help="lease TTL in seconds (default: the pool's); heartbeats every ttl/3"
    )
    p.add_argument("--wait", type=float, help="queue up to this many seconds for a free slot")
    p.add_argument("--holder", help="who holds the lease (default: necroctl-run@HOST:PID)")
    p.add_argument("--salvage", choices=("on-failure", "always", "never"), default="on-failure",
                   help="save what the command left to refs/necrod/salvage/LEASE (default: on-failure, "
                        "a non-zero exit)")  # fmt: skip
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when the command must stop (default 10)")  # fmt: skip
    p.add_argument("--reconnect-for", type=float, default=300.0, metavar="S",
                   help="keep trying to reach a restarting daemon this long (default 300)")  # fmt: skip
    _sparse_options(p)
    p.add_argument("argv", nargs="*", metavar="COMMAND", help="the command and its arguments, after --")


def _sparse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse", action="append", metavar="DIR",
                   help="the slot holds only this directory (repeatable) and the top-level files, for "
                        "this lease (default: the pool's sparse set)")  # fmt: skip
    p.add_argument("--no-sparse", action="store_true", help="the whole checkout, even in a sparse pool")


def sparse_of(args: argparse.Namespace) -> list[str] | None:
    """The ``sparse`` a lease asks for: ``--sparse`` dirs, ``[]`` for ``--no-sparse``, or None."""
    if args.no_sparse and args.sparse:
        raise SystemExit("necroctl: give --sparse or --no-sparse, not both")
    return [] if args.no_sparse else args.sparse


def parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(
        prog="necroctl",
        description="Drive a necrod daemon.",
        parents=[common],
        allow_abbrev=False,
        epilog="Every command takes --json, --socket, --timeout and -H; `necroctl COMMAND --help` shows its "
        "examples and exit codes.\n\n" + _EXITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"necroctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], allow_abbrev=False,
                              epilog=epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    cmd("status", "the daemon's health, config and pools (exit 0 healthy, 1 degraded, 3 not running)")
    t = cmd("top", "a live view of pools, leases, tasks and hosts (keys: q quit, p pause, f/0-9 pool filter)")
    t.add_argument("--pool", help="show only this pool (the f key cycles through the pools)")
    t.add_argument(
        "--interval", type=float, default=2.0, help="seconds between plain tables when not on a terminal"
    )
    t.add_argument("--plain", action="store_true", help="plain refreshing tables even on a terminal")
    t.add_argument("--resync", type=float, default=30.0, metavar="S",
                   help="re-read what the daemon publishes no event for (heartbeats, fetch times, hosts) "
                        "every S seconds (default 30; 0: never)")  # fmt: skip
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
    _sparse_options(a)
    a.add_argument("--from-salvage", metavar="LEASE_ID",
                   help="start where that lost lease stopped: its commits and uncommitted work")  # fmt: skip
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
    sub_.add_argument("--sparse", action="append", metavar="DIR",
                      help="the task's slot holds only this directory (repeatable) and the top-level files")  # fmt: skip
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
    lg = cmd("logs", "a task attempt's output (--json: one chunk object per line)")
    lg.add_argument("task_id")
    lg.add_argument("--attempt", type=int, help="default: the latest")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the attempt ends")
    sv = cmd("salvage", "work salvaged from slots before they were cleaned")
    svsub = sv.add_subparsers(dest="salvage_command", metavar="list|show|diff|checkout|apply|branch|push|prune",
                              required=True)  # fmt: skip

    def salvage_cmd(name: str, help: str) -> argparse.ArgumentParser:
        return svsub.add_parser(name, help=help, description=help, parents=[common], allow_abbrev=False,
                                epilog=epilog("salvage"), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    salvage_cmd("list", "salvage refs, newest first").add_argument("--pool")
    salvage_cmd("show", "what one salvage holds and how to fetch it").add_argument("lease_id")
    salvage_cmd("diff", "everything the lease did since it started, as a patch").add_argument("lease_id")
    sco = salvage_cmd(
        "checkout", "lease a slot that starts where the salvaged lease stopped; prints its path"
    )
    sco.add_argument("lease_id")
    sco.add_argument("--pool", help="default: the pool the salvage is in")
    sco.add_argument("--branch", help="create this branch in the slot at the lease's last commit")
    sco.add_argument("--ttl", type=float, help="seconds the lease lives without a heartbeat")
    sap = salvage_cmd("apply", "apply the salvage's changes to a work tree here (git apply)")
    sap.add_argument("lease_id")
    sap.add_argument("-C", "--directory", default=".", help="the work tree (default: the current directory)")
    for name, text in (("branch", "make a branch of the salvage's work in the pool's mirror"),
                       ("push", "make that branch and push it to the pool's origin")):  # fmt: skip
        sb = salvage_cmd(name, text)
        sb.add_argument("lease_id")
        sb.add_argument("branch")
        sb.add_argument("-m", "--message", help="the commit message (default: names the lease)")
    sp = salvage_cmd("prune", "delete salvage past each pool's salvage_keep_* limits")
    sp.add_argument("--pool")
    sp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    _run_options(cmd("run", "run a command in a leased slot, heartbeating it; exits with its status"))
    co = cmd("completion", "print the shell completion script for bash, zsh or fish")
    co.add_argument("shell", choices=("bash", "zsh", "fish"))
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; for ``submit``, everything after ``--`` is the command, whatever options
    stand before it or after the pool (argparse alone would take the pool and the command as one
    group of positionals and refuse an option between them)."""
    if "--" in argv and "submit" in argv[: argv.index("--")]:
        cut = argv.index("--")
        args = parser().parse_args(argv[:cut])
        args.argv = [*args.argv, *argv[cut + 1 :]]
        return args
    return parser().parse_args(argv)


def reach(opts: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Where the daemon is (a socket path, an ``ssh://`` address, or None for the default) and
    the SSH options, from ``options``: what ``Client`` and ``AsyncClient`` take."""
    host = opts["host"] or os.environ.get("NECROD_HOST") or None
    ssh_options = {"key": opts["ssh_key"], "known_hosts": opts["known_hosts"],
                   "accept_unknown": opts["accept_unknown_host_key"], "socket": opts["socket"] if host else None}  # fmt: skip
    return host or opts["socket"], ssh_options


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The options every command shares, with their defaults."""
    return {name: getattr(args, name, default) for name, default in (
        ("socket", None), ("json", False), ("timeout", 120.0), ("host", None), ("ssh_key", None),
        ("known_hosts", None), ("accept_unknown_host_key", None))}  # fmt: skip
