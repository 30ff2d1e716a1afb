"""The ceiling of batched decoding on this machine (issue #19): llama.cpp's own `llama-batched-bench`
decoding B sequences in one call, on the same ~1B LLaMA files as batch_speed.

Why: batch_speed measures what factedge's batch engine and llama-server get end to end. Whether the
issue's "8 sequences >= 3x serial" can be reached at all on a given CPU is a property of llama.cpp's
kernels and the machine, not of either engine: no scheduler on top of llama.cpp can decode faster than
llama.cpp's decode of B rows in one call. This prints that ceiling (aggregate generation tokens/s at B
sequences / at one) per quant type, so a shortfall is attributed to the hardware or to factedge.

    bash bench/speed/build_llama_server.sh 2          # builds llama-batched-bench beside llama-server
    python -m bench.speed.batch_ceiling --threads 2 --quants Q4_K_M,Q4_0,Q8_0 --npl 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from bench.common import ROOT, ensure_factedge

DEFAULT_BENCH = ROOT / ".cache" / "llama-server" / "bin" / "llama-batched-bench"


def run_batched_bench(bench: Path, model: Path, args) -> list[dict]:
    """llama-batched-bench's JSONL rows (one per B) for `model`, prompts not shared."""
    cmd = [str(bench), "-m", str(model), "-c", str(max(args.npl) * (args.pp + args.tg) + 64), "-b", "512",
           "-ub", "512", "-npp", str(args.pp), "-ntg", str(args.tg), "-npl", ",".join(map(str, args.npl)),
           "-t", str(args.threads), "-tb", str(args.threads), "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise SystemExit(f"{bench}: exit {out.returncode} on {model}: {out.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    ensure_factedge()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, default=DEFAULT_BENCH)
    p.add_argument("--bundle", type=Path, help="a bundle holding model-<quant>.gguf (default: the cached ~1B one)")
    p.add_argument("--quants", type=lambda s: s.split(","), default=["Q4_K_M", "Q4_0", "Q8_0"])
    p.add_argument("--npl", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--pp", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--tg", type=int, default=32, help="generated tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="runs per quant; the best S_TG per B is kept")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not args.bench.is_file():
        raise SystemExit(f"{args.bench}: not built (bash bench/speed/build_llama_server.sh 2)")

    bundle = args.bundle
    if bundle is None:
        from bench.speed.edge_vs_torch import ONE_B, ensure_bundle

        bundle = ensure_bundle("1b-ceiling", ONE_B, args.quants, args.out, args.threads)[1]
    rows = []
    for rep in range(args.reps):  # quants interleaved per rep, so a slow spell hits all of them
        for q in args.quants:
            for r in run_batched_bench(args.bench, bundle / f"model-{q}.gguf", args):
                rows.append({"quant": q, "rep": rep, "B": r["pl"], "tg_tps": r["speed_tg"], "pp_tps": r["speed_pp"],
                             "flash_attn": r.get("flash_attn")})
    tps = {(r["quant"], r["rep"], r["B"]): r["tg_tps"] for r in rows}
    print(f"llama-batched-bench, {bundle}, {args.threads} threads, {args.pp} prompt + {args.tg} generated tokens "
          f"per sequence, prompts not shared; best of {args.reps} runs, and the range of the ratio over runs")
    print("| quant | " + " | ".join(f"B={b} gen t/s" for b in args.npl) + " | " +
          " | ".join(f"x B=1 at {b} (range)" for b in args.npl[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(args.npl) - 1))
    for q in args.quants:
        best = [max(tps[(q, rep, b)] for rep in range(args.reps)) for b in args.npl]
        ratios = [[tps[(q, rep, b)] / tps[(q, rep, args.npl[0])] for rep in range(args.reps)] for b in args.npl[1:]]
        print(f"| {q} | " + " | ".join(f"{t:.1f}" for t in best) + " | " +
              " | ".join(f"{t / best[0]:.2f} ({min(r):.2f}-{max(r):.2f})" for t, r in zip(best[1:], ratios)) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
