"""Before/after in one run: a benchmark of this tree against the same benchmark of an older revision, in
alternation, on the same machine, so a slow spell of the machine lands on both.

    .venv/bin/python bench/ab_revisions.py --before /tmp/before --before-python /tmp/bv/bin/python \\
        --before-env MSJAX_M2N_LIB=/tmp/before/build/m2n/libmsjax_m2n.so --rounds 3 --name pipeline-pinned-ab \\
        --keys m --values here_ms,apart_ms -- bench/pipeline_pinned.py --compare-attention-processes --repeats 1

Each round runs the benchmark command in the older tree (`--before`: a checkout of the revision, e.g.
`git worktree add /tmp/before <rev>`, with its native library built) and in this one, the older tree first in
even rounds and second in odd ones (so whatever the first run of a pair leaves behind, a warmer page cache or a
hotter core, lands on both sides alike); each tree runs its own version of the script. The rows each run writes (`bench/results/*.json`, found as the newest file its run
wrote) are collected and removed again; the combined table — per key, the medians of each side's values and
their ratio after / before, and every round's values — is written as `<name>-<hardware>-<date>.md/.json`.

Give the older tree an interpreter that imports its own msjax: a venv without this checkout's editable finder
(`python -m venv --without-pip /tmp/bv`, a .pth with this venv's site-packages as a plain path) and, through
`--before-env MSJAX_M2N_LIB=...`, its own native library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_once(tree: Path, python: str, command: list[str], env: dict) -> list[dict]:
    """Run `command` in `tree`; the rows of the results JSON it wrote (which is then removed)."""
    results = tree / "bench" / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*.json")}
    started = time.time()
    subprocess.run([python, *command], cwd=tree, env={**os.environ, **env}, check=True)
    written = [p for p in results.glob("*.json") if p.stat().st_mtime >= started and before.get(p) != p.stat().st_mtime]
    if len(written) != 1:
        raise RuntimeError(f"{tree}: expected the benchmark to write one results file, found {written}")
    rows = json.loads(written[0].read_text())["rows"]
    if written[0] not in before:  # a file of its own: remove it (the combined table is the result)
        written[0].unlink()
        written[0].with_suffix(".md").unlink(missing_ok=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="checkout of the older revision")
    parser.add_argument("--before-python", default=sys.executable)
    parser.add_argument("--before-env", action="append", default=[], help="NAME=VALUE for the older tree's runs")
    parser.add_argument("--revision", default="", help="what --before holds (for the table)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", required=True, help="results file stem")
    parser.add_argument("--keys", required=True, help="row fields that identify a row (comma-separated)")
    parser.add_argument("--values", required=True, help="numeric row fields to compare (comma-separated)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark script and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    keys, values = args.keys.split(","), args.values.split(",")
    env = dict(item.split("=", 1) for item in args.before_env)
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        sides = (("before", args.before, args.before_python, env), ("after", ROOT, sys.executable, {}))
        for side, tree, python, side_env in sides if r % 2 == 0 else sides[::-1]:
            rows = run_once(tree, python, command, side_env)
            runs[side].append({tuple(row[k] for k in keys): row for row in rows})
            print(f"round {r} {side}: " + "; ".join(f"{k}: " + ", ".join(f"{v} {row[v]}" for v in values)
                                                     for k, row in runs[side][-1].items()), flush=True)
    table = []
    for key in runs["after"][0]:
        row = dict(zip(keys, key))
        for v in values:
            b = [run[key][v] for run in runs["before"]]
            a = [run[key][v] for run in runs["after"]]
            row[f"{v}_before"], row[f"{v}_after"] = statistics.median(b), statistics.median(a)
            row[f"{v}_ratio"] = f"{statistics.median(a) / statistics.median(b):.3f}"
            # each round's after / before, then their median: a slow spell of the machine within one round
            # cancels out, and one outlier round on either side does not decide it
            row[f"{v}_paired"] = f"{statistics.median(y / x for x, y in zip(b, a)):.3f}"
            row[f"{v}_rounds"] = " / ".join(f"{x}, {y}" for x, y in zip(b, a))
        table.append(row)
        print(row, flush=True)
    from bench.common import write_results
    columns = [(k, k) for k in keys]
    for v in values:
        columns += [(f"{v}_before", f"{v} before"), (f"{v}_after", f"{v} after"), (f"{v}_ratio", "after / before"),
                    (f"{v}_paired", "median of round ratios"), (f"{v}_rounds", "rounds (before, after)")]
    notes = (f"Before: {args.revision or args.before} (its own copy of the benchmark); after: this tree. "
             f"{args.rounds} rounds, each the benchmark once in each tree (the older one first in even rounds, "
             f"second in odd ones); the table "
             f"gives the medians over the rounds, their ratio, the median of each round's ratio after / before, "
             f"and every round's values. Benchmark: "
             f"`{' '.join(command)}`.")
    path = write_results(args.name, table, columns, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
