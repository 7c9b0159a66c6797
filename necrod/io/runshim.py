"""The first thing a runner runs: join its cgroups (and so their limits), then exec the command.

``python -m necrod.io.runshim [--cgroup DIR]... -- COMMAND...``

anyio's ``open_process`` has no ``preexec_fn``, and the runner must be in its cgroups before its
own code runs, so this tiny program does it in between. It replaces itself with the command:
the runner's pid, process group and exit status are the command's.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    cgroups: list[str] = []
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--cgroup":
            cgroups.append(argv[i + 1])
            i += 2
        else:
            print(f"runshim: unknown option {argv[i]!r}", file=sys.stderr)
            return 127
    command = argv[i + 1 :]
    if not command:
        print("runshim: no command", file=sys.stderr)
        return 127
    for cgroup in cgroups:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"runshim: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
