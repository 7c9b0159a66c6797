"""Item ``mono`` (issue 18): the time from adding a pool to its first ready slot, on a large
generated repository served over the network (``git daemon`` on localhost, protocol v2), with a
full mirror, a partial one (``filter: blob:none``), a sparse pool, and both; medians and ratios
against the full clone measured in the same run, interleaved so that noise hits all alike.

The repository has ``gitrepo``'s layout (``src/m<k>/...``, 1,000 files under each ``m<k>``) and
a long history: every commit rewrites ``churn`` files, so most of its blobs are history that no
checkout needs, as in a real monorepo. The sparse set is ``src/m0``, a twentieth of a 20,000-file
tree. Its size is a parameter (``--mono-files``, ``--mono-commits``, ``--mono-churn``;
``python -m bench.monorepo`` runs this item alone).
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.daemon import Daemon, config_yaml
from bench.gitrepo import GITIGNORE, _blob, _commit, _content, file_paths, git
from bench.report import Row, render
from bench.scratch import Scratch, raise_on_sigterm, rmtree
from bench.stats import median, percentile

SPARSE = ["src/m0"]
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full", {}),
    ("blob:none", {"filter": "blob:none"}),
    ("sparse", {"sparse": SPARSE}),
    ("blob:none + sparse", {"filter": "blob:none", "sparse": SPARSE}),
)
KINDS = ("worktree", "shared-clone")


@dataclass(frozen=True)
class Sizes:
    files: int
    commits: int
    #: Files rewritten by each commit after the first.
    churn: int
    samples: int


QUICK = Sizes(5000, 400, 40, 2)
FULL = Sizes(20_000, 1500, 60, 3)


def make_monorepo(path: Path, sizes: Sizes, seed: int = 18) -> Path:
    """A bare repository at ``path``: ``files`` files on ``main``, ``commits`` commits each
    rewriting ``churn`` of them (one ``git fast-import`` stream, then one pack)."""
    rng = random.Random(seed)
    paths = file_paths(sizes.files)
    out: list[bytes] = []
    mark = 1
    changes = []
    for rel in [*paths, ".gitignore"]:
        _blob(out, mark, GITIGNORE if rel == ".gitignore" else _content(rng, rel, 0))
        changes.append((rel, mark))
        mark += 1
    parent = _commit(out, 1, None, changes)
    for n in range(2, sizes.commits + 1):
        changes = []
        for rel in rng.sample(paths, min(sizes.churn, len(paths))):
            _blob(out, mark, _content(rng, rel, n))
            changes.append((rel, mark))
            mark += 1
        parent = _commit(out, n, parent, changes)
    git("init", "--quiet", "--bare", "--initial-branch=main", str(path))
    git("fast-import", "--quiet", cwd=path, input=b"".join(out))
    git("repack", "-a", "-d", "-q", cwd=path)
    return path


def _config(pools: dict[str, dict[str, Any]]) -> str:
    text = config_yaml(pools, {"allowed_protocols": ["git", "file"], "git_concurrency": 4})
    return text if pools else text.replace("pools:\n", "pools: {}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(scratch: Scratch, sizes: Sizes) -> tuple[str, float, int]:
    """The generated origin behind ``git daemon``: its URL, the seconds it took to make and its
    pack's size in bytes."""
    root = scratch.path("mono-served")
    root.mkdir()
    started = time.perf_counter()
    origin = make_monorepo(root / "mono.git", sizes)
    took = time.perf_counter() - started
    # Hosting services serve filters and single objects; a git daemon does when told so.
    git("config", "uploadpack.allowFilter", "true", cwd=origin)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=origin)
    port = _free_port()
    scratch.spawn(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={root}", "--listen=127.0.0.1",
                   f"--port={port}", str(root)], log=scratch.path("git-daemon.log"))  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    size = sum(p.stat().st_size for p in (origin / "objects" / "pack").glob("*.pack"))
    return f"git://127.0.0.1:{port}/mono.git", took, size


def _first_slot(daemon: Daemon, name: str, pool: dict[str, Any]) -> float:
    """Seconds from the reload that adds ``pool`` to its first available slot."""
    daemon.config.write_text(_config({name: pool}))
    started = time.perf_counter()
    daemon.call("daemon.reload")
    while True:
        got = daemon.call("pools.get", {"pool": name})
        if got["slots"]["available"] >= 1:
            return time.perf_counter() - started
        if got["state"] == "failed":
            raise RuntimeError(f"pool {name} failed: {got['error']}")
        time.sleep(0.02)


def _drop(daemon: Daemon, name: str) -> int:
    """Remove the pool and its directory; the bytes its mirror's objects took."""
    workspace = daemon.state_dir / "workspaces" / name
    objects = workspace / "mirror.git" / "objects"
    size = sum(p.stat().st_size for p in objects.rglob("*") if p.is_file())
    daemon.config.write_text(_config({}))
    daemon.call("daemon.reload")
    deadline = time.monotonic() + 120
    while any(p["name"] == name for p in daemon.call("pools.list")["pools"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    rmtree(workspace)
    return size


def measure(scratch: Scratch, sizes: Sizes, say: Callable[[str], None] = lambda _: None) -> list[Row]:
    url, took, pack = serve(scratch, sizes)
    label = f"{sizes.files:,} files, {sizes.commits:,} commits of {sizes.churn} files"
    say(f"mono: generated {label} ({pack / 1e6:.0f} MB packed) in {took:.1f} s, served at {url}")
    daemon = Daemon(scratch, "mono", _config({})).start()
    times: dict[tuple[str, str], list[float]] = {}
    sizes_mb: dict[tuple[str, str], int] = {}
    n = 0
    for sample in range(sizes.samples):
        for kind in KINDS:
            for variant, options in VARIANTS:
                n += 1
                name = f"m{n}"
                pool = {"repo_url": url, "base": "main", "slots": 1, "min_idle": 0, "max_slots": 1,
                        "fetch_interval_s": 0, "isolation": kind, **options}  # fmt: skip
                took_s = _first_slot(daemon, name, pool)
                times.setdefault((kind, variant), []).append(took_s)
                sizes_mb[(kind, variant)] = _drop(daemon, name)
                say(f"mono: sample {sample + 1}, {kind}, {variant}: {took_s:.2f} s")
    daemon.stop()
    rows = [Row("mono", f"origin: {label}, served by git daemon", "MB", float(pack))]
    for kind in KINDS:
        base = median(times[(kind, "full")])
        for variant, _ in VARIANTS:
            got = times[(kind, variant)]
            ratio = {} if variant == "full" else {"ratio": median(got) / base, "ratio_to": "full clone"}
            rows.append(Row("mono", f"pool added to first ready slot, {variant}, {kind} pool", "ms",
                            median(got) * 1000, percentile(got, 99) * 1000, len(got), **ratio))  # fmt: skip
            rows.append(Row("mono", f"  mirror objects, {variant}", "MB", float(sizes_mb[(kind, variant)])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monorepo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK.files:,} files, {QUICK.commits:,} commits"
    )
    parser.add_argument("--mono-files", type=int, help=f"files in the tree (default {FULL.files:,})")
    parser.add_argument("--mono-commits", type=int, help=f"commits of history (default {FULL.commits:,})")
    parser.add_argument("--mono-churn", type=int, help=f"files each commit rewrites (default {FULL.churn})")
    parser.add_argument("--samples", type=int, help=f"samples per variant (default {FULL.samples})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    sizes = Sizes(args.mono_files or plan.files, args.mono_commits or plan.commits,
                  args.mono_churn or plan.churn, args.samples or plan.samples)  # fmt: skip
    raise_on_sigterm()
    scratch = Scratch(keep=args.keep)
    started = time.perf_counter()
    try:
        rows = measure(scratch, sizes, lambda text: print(f"[bench {time.strftime('%H:%M:%S')}] {text}",
                                                          file=sys.stderr, flush=True))  # fmt: skip
    finally:
        scratch.close()
    print(render(rows, [f"took {time.perf_counter() - started:.0f} s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
