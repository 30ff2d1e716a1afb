"""`factedge eval pope` one question at a time vs `--parallel N` (issue #19): wall time and the figures.

Same bundle, same items, same process, runs interleaved; every run's records must be identical to the
serial run's (answers, parsed yes/no), so the F1 and yes-ratio are the same figures, only sooner.

    python -m bench.speed.pope_parallel BUNDLE POPE.jsonl [--quant Q4_K_M] [--parallel 1,4,8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import ensure_factedge


def main(argv: list[str] | None = None) -> None:
    ensure_factedge()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("pope", type=Path, nargs="+")
    p.add_argument("--quant", default=None)
    p.add_argument("--parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from factedge.train.evaluate.backends import EdgeBackend, EdgeOptions
    from factedge.train.evaluate.pope import PopeOptions, load_pope, run_pope

    items = load_pope(args.pope)
    rows, reference = [], None
    for n in args.parallel:
        with EdgeBackend(args.bundle, args.quant, options=EdgeOptions(threads=args.threads, parallel=n)) as backend:
            start = time.perf_counter()
            result = run_pope(backend, items, PopeOptions(max_tokens=args.max_tokens))
            wall = time.perf_counter() - start
            label = backend.label
        records = [(r.question_id, r.answer, r.pred) for r in result.records]
        reference = reference or (records, wall)
        m = result.metrics["all"]
        rows.append({"parallel": n, "questions": len(records), "wall_s": round(wall, 1),
                     "questions_per_min": round(60 * len(records) / wall, 1),
                     "speedup": round(reference[1] / wall, 2), "f1": m.f1, "yes_ratio": m.yes_ratio,
                     "identical_records": sum(a == b for a, b in zip(records, reference[0]))})
    print(f"{label}, {len(items)} POPE questions, {args.threads} threads, max {args.max_tokens} tokens")
    print("| parallel | wall s | questions/min | x serial | F1 | yes-ratio | records identical to parallel "
          f"{args.parallel[0]} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['parallel']} | {r['wall_s']:.1f} | {r['questions_per_min']:.1f} | {r['speedup']:.2f} | "
              f"{r['f1']:.4f} | {r['yes_ratio']:.4f} | {r['identical_records']}/{r['questions']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
