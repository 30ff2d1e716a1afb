"""`factedge eval pope` now vs at an earlier commit, on the same bundle, items and native libraries
(issue #19's "at least 2x faster than today, same figures").

Each code tree answers in its own subprocess (run_pope through its own EdgeBackend, default options
but the thread count), the two alternating `--reps` times so a slow spell of a shared machine hits
both; the records (question, answer, parsed yes/no) of every run must be identical to the first.
The earlier tree is a git worktree of `--commit` under .cache/ (its Python only: the native libraries
are this checkout's, so pick a commit whose cpp_patches/ are the same).

    python -m bench.speed.pope_since BUNDLE POPE.jsonl --commit 54ff4e8 [--quant Q4_K_M] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT

# runs inside the subprocess: import factedge from the tree given, not from this checkout's install
CHILD = r"""
import json, sys, time
from pathlib import Path
tree, bundle, pope, root = (Path(a) for a in sys.argv[1:5])
quant, threads = sys.argv[5], int(sys.argv[6])
sys.path.insert(0, str(root))
from bench.common import factedge_shim
sys.path.insert(0, str(factedge_shim(tree)))
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # an editable install's finder
import factedge.edge
assert Path(factedge.edge.__file__).resolve().is_relative_to(tree.resolve()), factedge.edge.__file__
from factedge.train.evaluate.backends import EdgeBackend, EdgeOptions
from factedge.train.evaluate.pope import PopeOptions, load_pope, run_pope
items = load_pope([pope])
with EdgeBackend(bundle, quant, options=EdgeOptions(threads=threads)) as backend:
    start = time.perf_counter()
    result = run_pope(backend, items, PopeOptions(max_tokens=64))
    wall = time.perf_counter() - start
m = result.metrics["all"]
print(json.dumps({"wall_s": wall, "f1": m.f1, "yes_ratio": m.yes_ratio,
                  "records": [[r.question_id, r.answer, r.pred] for r in result.records]}))
"""


def worktree(commit: str) -> Path:
    """A checkout of `commit` under .cache/ (made once)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = ROOT / ".cache" / f"tree-{sha[:12]}"
    if not (tree / "edge").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), sha], check=True,
                       capture_output=True)
    return tree


def answer(tree: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(args.bundle), str(args.pope), str(ROOT),
                          args.quant, str(args.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("pope", type=Path)
    p.add_argument("--commit", required=True)
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    trees = {f"at {args.commit}": worktree(args.commit), "now": ROOT}
    walls: dict[str, list[float]] = {name: [] for name in trees}
    first, figures = None, {}
    for _ in range(args.reps):
        for name, tree in trees.items():
            run = answer(tree, args)
            first = first or run["records"]
            if run["records"] != first:
                raise SystemExit(f"{name}: records differ from the first run's")
            walls[name].append(run["wall_s"])
            figures[name] = (run["f1"], run["yes_ratio"])
    then, now = (statistics.median(w) for w in walls.values())
    print(f"{args.bundle.name}:{args.quant}, {len(first)} POPE questions, {args.threads} threads, "
          f"{args.reps} runs each, alternating; every run's records identical")
    print("| code | wall s (median) | runs | questions/min | F1 | yes-ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for name, w in walls.items():
        f1, yes = figures[name]
        print(f"| {name} | {statistics.median(w):.1f} | {', '.join(f'{x:.1f}' for x in w)} | "
              f"{60 * len(first) / statistics.median(w):.0f} | {f1:.4f} | {yes:.4f} |")
    print(f"now / at {args.commit}: {then / now:.2f}x faster")


if __name__ == "__main__":
    main()
