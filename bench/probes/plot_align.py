"""Hallucination vs coverage per alignment method (issue #16): one point per run, an arrow from the SFT
model each run started from, so "says less" (down and left) is never read as "hallucinates less"
(down at the same coverage); a dashed arrow joins an SFT model to the same seed's longer SFT run.

    python -m bench.probes.plot_align [--runs bench/results/align_methods.json] [--out bench/results/align_methods.png]

The runs file holds {"runs": [{seed, sft_steps, method, halluc, coverage}, ...]}; every (seed,
sft_steps) group needs its "SFT" row, the start of its arrows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import ROOT

RESULTS = ROOT / "bench" / "results"
MARKERS = "osD^v<>pP*Xh"


def load_runs(path: Path) -> list[dict]:
    runs = json.loads(path.read_text())["runs"]
    starts = {(r["seed"], r["sft_steps"]) for r in runs if r["method"] == "SFT"}
    missing = {(r["seed"], r["sft_steps"]) for r in runs} - starts
    if missing:
        raise SystemExit(f"{path}: no SFT row for (seed, sft_steps) {sorted(missing)}")
    return runs


def plot(runs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in runs if r["method"] != "SFT"})
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    groups = sorted({(r["seed"], r["sft_steps"]) for r in runs})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 7))
    for g, (seed, steps) in enumerate(groups):
        colour = colours(g % 10)
        sft = next(r for r in runs if (r["seed"], r["sft_steps"], r["method"]) == (seed, steps, "SFT"))
        ax.scatter(sft["coverage"], sft["halluc"], s=140, color=colour, edgecolor="black", zorder=3,
                   label=f"SFT, seed {seed}, {steps} SFT steps")
        for r in (r for r in runs if (r["seed"], r["sft_steps"]) == (seed, steps) and r["method"] != "SFT"):
            ax.annotate("", (r["coverage"], r["halluc"]), (sft["coverage"], sft["halluc"]),
                        arrowprops=dict(arrowstyle="->", color=colour, alpha=0.5))
            ax.scatter(r["coverage"], r["halluc"], marker=marker[r["method"]], color=colour, s=60, zorder=3)
    sft = {(r["seed"], r["sft_steps"]): r for r in runs if r["method"] == "SFT"}
    for (seed, steps), start in sft.items():  # more SFT from the same seed: a dashed arrow
        longer = [r for (s, n), r in sft.items() if s == seed and n > steps]
        for r in longer:
            ax.annotate("", (r["coverage"], r["halluc"]), (start["coverage"], start["halluc"]),
                        arrowprops=dict(arrowstyle="->", color="black", linestyle="--", alpha=0.6))
    ax.plot([], [], color="black", linestyle="--", label="more SFT steps, same seed")
    for m in methods:
        ax.scatter([], [], marker=marker[m], color="grey", label=m)
    ax.set_xlabel("objects covered (share of the scene's objects the answers identify)")
    ax.set_ylabel("held-out hallucination rate (answers with a false claim)")
    ax.set_title("Alignment methods on the shapes world: down = fewer hallucinations, left = says less")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=RESULTS / "align_methods.json")
    p.add_argument("--out", type=Path, default=RESULTS / "align_methods.png")
    args = p.parse_args(argv)
    print(plot(load_runs(args.runs), args.out))


if __name__ == "__main__":
    main()
