"""Evaluation results as JSON (written atomically) and as one rich table per benchmark.

A results file holds every run of one command (`--compare` makes several): what answered
(`backend`: kind, label, quant, file sizes), the benchmark's figures and the per-item records, so a
figure in a table can always be recomputed from the records.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Column, Table

from factedge.train.evaluate.mmhal import TYPES

SCHEMA_VERSION = 1
_SHORT = {"attribute": "attr", "adversarial object": "adv", "comparison": "comp", "counting": "count",
          "spatial relation": "rel", "environment": "env", "holistic description": "holist", "other": "other"}


def results_document(benchmark: str, runs: list[dict], **context: Any) -> dict:
    """The top-level JSON object: {schema, benchmark, <context>, runs: [{backend, result}]}."""
    return {"schema": SCHEMA_VERSION, "benchmark": benchmark, **context, "runs": runs}


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.1f}" if n else "-"


def _tps(run: dict) -> str:
    tps = run["result"].get("speed", {}).get("tokens_per_s")
    return f"{tps:.1f}" if tps else "-"


def mmhal_table(runs: Sequence[dict], title: str = "MMHal") -> Table:
    """One row per run: mean score, hallucination rate, mean score per question type, tokens/s."""
    types = [t for t in TYPES if any(t in r["result"]["summary"]["per_type"] for r in runs)]
    table = Table(Column("model", no_wrap=True), "MiB", "score", "halluc.", *(_SHORT[t] for t in types), "tok/s",
                  title=title)
    for run in runs:
        s = run["result"]["summary"]
        per = s["per_type"]
        table.add_row(run["backend"]["label"], _mib(run["backend"].get("size_bytes")), f"{s['mean_score']:.2f}",
                      f"{s['hallucination_rate'] * 100:.1f}%",
                      *(f"{per[t]['mean_score']:.2f}" if t in per else "-" for t in types), _tps(run))
    return table


def pope_table(runs: Sequence[dict], title: str = "POPE") -> Table:
    """One row per run: accuracy, precision, recall, F1, yes-ratio over all items, F1 per split, tokens/s."""
    splits = list(dict.fromkeys(s for r in runs for s in r["result"]["metrics"] if s != "all"))
    table = Table(Column("model", no_wrap=True), "MiB", "acc", "prec", "recall", "F1", "yes",
                  *(f"F1 {s}" for s in splits), "tok/s", title=title)
    for run in runs:
        m = run["result"]["metrics"]
        a = m["all"]
        table.add_row(run["backend"]["label"], _mib(run["backend"].get("size_bytes")),
                      *(f"{a[k] * 100:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")),
                      *(f"{m[s]['f1'] * 100:.1f}" if s in m else "-" for s in splits), _tps(run))
    return table


def fidelity_table(report: dict, title: str = "fidelity vs PyTorch on your images") -> Table:
    table = Table("file", "check", "images", "figure", title=title)
    for dtype, figs in report.get("embeddings", {}).items():
        worst = min(f["min_cosine"] for f in figs)
        mean = sum(f["mean_cosine"] for f in figs) / len(figs)
        table.add_row(f"mmproj {dtype}", "embedding cosine min / mean", str(len(figs)), f"{worst:.6f} / {mean:.6f}")
    for dtype, s in report.get("summary", {}).items():
        table.add_row(f"model {dtype}", "top-1 agreement / mean KL", str(s["images"]),
                      f"{s['top1_agreement'] * 100:.2f}% / {s['mean_kl']:.2e}")
        table.add_row(f"model {dtype}", "greedy tokens equal", str(s["images"]),
                      f"{s['greedy_common']}/{s['greedy_total']}")
    return table
