"""Does the alignment survive quantization? Hallucination and POPE F1 per quant vs PyTorch.

For one bundle: make the missing LM quants from its F16 file (llama.cpp's quantizer, registered in the
manifest), run shapes-MMHal (hallucination rate = share of ratings < 3) and POPE (F1) on each quant
and on the PyTorch checkpoint, and write report.json, a markdown section (into the bundle's model
card and, if asked, BENCHMARKS.md, between markers so a rerun replaces it) and a PNG of hallucination
rate and tokens/s against file size.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from factedge.edge.errors import InputError, OutputError
from factedge.edge.atomic import write_json, write_text
from factedge.edge.file_types import LM_BASE_TYPES, is_unquantized, quant_model_file
from factedge.edge.manifest import MANIFEST, BundleFile, read_manifest, sha256_file
from factedge.train.evaluate.backends import EdgeOptions
from factedge.train.evaluate.judges import CachedJudge, Judge
from factedge.train.evaluate.mmhal import MMHalOptions, load_mmhal, run_mmhal
from factedge.train.evaluate.pope import PopeOptions, limit_per_split, load_pope, run_pope
from factedge.train.evaluate.report import results_document
from factedge.train.evaluate.runner import BackendSpec, Progress, run_all

QUANTS = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0")
WITHIN_POINTS = 1.0  # issue #5: Q8_0 keeps the hallucination rate within 1 point of PyTorch


@dataclass
class QuantReportOptions:
    quants: Sequence[str] = QUANTS
    limit: int | None = None
    threads: int = 0
    images: Path | None = None
    torch_checkpoint: Path | None = None
    adapter: str | None = "peft"
    out: Path | None = None  # default <bundle>/eval
    benchmarks: Path | None = None  # a BENCHMARKS.md to write the section into
    card: bool = True  # write the section into <bundle>/README.md
    mmhal_max_tokens: int = 256
    pope_max_tokens: int = 16


@dataclass
class QuantRow:
    label: str
    quant: str
    size_bytes: int | None
    hallucination_rate: float
    mean_score: float
    pope_f1: float
    pope_accuracy: float
    yes_ratio: float
    tokens_per_s: float


@dataclass
class QuantReport:
    rows: list[QuantRow]
    markdown: str
    json_path: Path
    markdown_path: Path
    plot_path: Path
    documents: dict = field(default_factory=dict)


def ensure_quants(bundle: Path, quants: Sequence[str], threads: int = 0) -> list[str]:
    """Make every missing LM quant from the bundle's unquantized file; returns the quants made."""
    from factedge.convert.quantize import check_lm_quants, quantize_language_model

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    have = {f.dtype.upper() for f in manifest.by_role("model")}
    wanted = check_lm_quants(list(quants))
    missing = [q for q in wanted if q not in have]
    if not missing:
        return []
    base = next((f for t in ("f16", "bf16", "f32") for f in manifest.by_role("model") if f.dtype.lower() == t), None)
    if base is None:
        raise InputError(f"bundle has no unquantized model file ({', '.join(LM_BASE_TYPES)}) to make "
                         f"{', '.join(missing)} from", bundle / MANIFEST)
    for quant in missing:
        path = quantize_language_model(bundle / base.name, bundle / quant_model_file(quant), quant, threads=threads or None)
        manifest.files.append(BundleFile(path.name, "model", quant, sha256_file(path), path.stat().st_size))
        write_text(bundle / MANIFEST, manifest.to_json())  # after each: a file on disk is always listed
    return missing


def _rows(mmhal_runs: list[dict], pope_runs: list[dict]) -> list[QuantRow]:
    rows = []
    for m, p in zip(mmhal_runs, pope_runs, strict=True):
        b = m["backend"]
        ms, ps = m["result"]["speed"], p["result"]["speed"]
        tokens, seconds = ms["generated_tokens"] + ps["generated_tokens"], ms["generate_s"] + ps["generate_s"]
        s, a = m["result"]["summary"], p["result"]["metrics"]["all"]
        rows.append(QuantRow(b["label"], b.get("quant") or "?", b.get("size_bytes"), s["hallucination_rate"],
                             s["mean_score"], a["f1"], a["accuracy"], a["yes_ratio"],
                             tokens / seconds if seconds else 0.0))
    return rows


def markdown_section(rows: Sequence[QuantRow], *, title: str, judge: str, n_mmhal: int, n_pope: int,
                     command: str, plot: str | None) -> str:
    """The section for the model card / BENCHMARKS.md: table, the judge's definition, the verdict."""
    ref = next((r for r in rows if r.quant == "PyTorch"), None)
    lines = [f"## {title}", "",
             f"shapes-MMHal: {n_mmhal} items, judge `{judge}` (ratings 0-6 on MMHal-Bench's rubric; "
             f"hallucination = rating < 3). POPE: {n_pope} items, F1 with \"yes\" positive. Greedy decoding; "
             "tokens/s = generation speed over both runs.", "",
             "| model | size (MiB) | hallucination rate | Δ vs PyTorch (points) | MMHal score | POPE F1 | POPE acc "
             "| yes-ratio | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if ref is None or r is ref else f"{(r.hallucination_rate - ref.hallucination_rate) * 100:+.1f}"
        size = f"{r.size_bytes / 2**20:.1f}" if r.size_bytes else "-"
        lines.append(f"| {r.label} | {size} | {r.hallucination_rate * 100:.1f}% | {delta} | {r.mean_score:.2f} | "
                     f"{r.pope_f1 * 100:.1f} | {r.pope_accuracy * 100:.1f} | {r.yes_ratio * 100:.1f}% | "
                     f"{r.tokens_per_s:.1f} |")
    if ref is not None:
        lines += ["", _verdict(rows, ref)]
    if plot:
        lines += ["", f"![hallucination rate and tokens/s against file size]({plot})"]
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def _verdict(rows: Sequence[QuantRow], ref: QuantRow) -> str:
    """Which quants keep the hallucination rate within WITHIN_POINTS of PyTorch, largest first."""
    quantized = sorted((r for r in rows if r is not ref and r.size_bytes), key=lambda r: -r.size_bytes)
    kept = [r.quant for r in quantized if abs(r.hallucination_rate - ref.hallucination_rate) * 100 <= WITHIN_POINTS]
    lost = [r.quant for r in quantized if r.quant not in kept]
    text = f"Within {WITHIN_POINTS:g} point of PyTorch's hallucination rate: {', '.join(kept) or 'none'}."
    if lost:
        text += f" Outside it: {', '.join(lost)}."
    return text


def plot_rows(rows: Sequence[QuantRow], path: Path, title: str) -> Path:
    """Two panels against file size: hallucination rate (PyTorch as a dashed line) and tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((r for r in rows if r.size_bytes), key=lambda r: r.size_bytes)
    ref = next((r for r in rows if r.quant == "PyTorch"), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r.size_bytes / 2**20 for r in points]
    for ax, values, ylabel in ((left, [r.hallucination_rate * 100 for r in points], "hallucination rate (%)"),
                               (right, [r.tokens_per_s for r in points], "tokens/s (generation)")):
        ax.plot(sizes, values, "o-")
        for x, y, r in zip(sizes, values, points):
            ax.annotate(r.quant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("model file size (MiB)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if ref is not None:
        left.axhline(ref.hallucination_rate * 100, linestyle="--", color="gray", label=ref.label)
        left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the plot: {exc.strerror or exc}", path) from exc
    finally:
        plt.close(fig)
    return path


def put_section(path: Path, key: str, text: str) -> Path:
    """Insert or replace the section between `<!-- factedge:KEY -->` markers (file created if missing)."""
    begin, end = f"<!-- factedge:{key} begin -->", f"<!-- factedge:{key} end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    write_text(path, new)
    return path


def _command(bundle: Path, mmhal: Path, pope: Sequence[Path], judge: str, o: QuantReportOptions) -> str:
    args = ["factedge", "eval", "quant-report", "--model", str(bundle), "--mmhal", str(mmhal)]
    for p in pope:
        args += ["--pope", str(p)]
    args += ["--quants", ",".join(o.quants), "--judge", "URL" if judge.startswith("openai") else judge,
             "--mmhal-max-tokens", str(o.mmhal_max_tokens), "--pope-max-tokens", str(o.pope_max_tokens)]
    if o.torch_checkpoint:
        args += ["--torch", str(o.torch_checkpoint)]
    if o.limit is not None:
        args += ["--limit", str(o.limit)]
    if o.images:
        args += ["--images", str(o.images)]
    return shlex.join(args)


def quant_report(bundle: Path, mmhal: Path, pope: Sequence[Path], judge: Judge,
                 options: QuantReportOptions | None = None, progress: Progress | None = None) -> QuantReport:
    o = options or QuantReportOptions()
    bundle = Path(bundle)
    ensure_quants(bundle, [q for q in o.quants if not is_unquantized(q)], o.threads)
    items = load_mmhal(mmhal, o.images)
    probes = load_pope(list(pope), o.images)
    specs = ([BackendSpec("torch", Path(o.torch_checkpoint), adapter=o.adapter)] if o.torch_checkpoint else []) + \
        [BackendSpec("edge", bundle, q) for q in o.quants]
    edge = EdgeOptions(threads=o.threads)
    cached = CachedJudge(judge)
    m_opts = MMHalOptions(max_tokens=o.mmhal_max_tokens, limit=o.limit)
    p_opts = PopeOptions(max_tokens=o.pope_max_tokens, limit=o.limit)
    n_mmhal = len(items) if o.limit is None else min(o.limit, len(items))
    mmhal_runs = run_all(specs, edge, lambda b, p: run_mmhal(b, items, cached, m_opts, p), n_mmhal, progress)
    pope_runs = run_all(specs, edge, lambda b, p: run_pope(b, probes, p_opts, p),
                        len(limit_per_split(probes, o.limit)), progress)
    rows = _rows(mmhal_runs, pope_runs)
    out = Path(o.out) if o.out else bundle / "eval"
    out.mkdir(parents=True, exist_ok=True)
    title = f"Hallucination after quantization: {bundle.name}"
    plot = plot_rows(rows, out / "quant_report.png", title)
    n_pope = pope_runs[0]["result"]["metrics"]["all"]["n"]
    command = _command(bundle, Path(mmhal), [Path(p) for p in pope], cached.name, o)
    documents = {"mmhal": results_document("mmhal", mmhal_runs, data=str(mmhal), judge=cached.name),
                 "pope": results_document("pope", pope_runs, data=[str(p) for p in pope])}
    json_path = write_json(out / "quant_report.json",
                           {"schema": 1, "benchmark": "quant-report", "bundle": str(bundle), "command": command,
                            "rows": [vars(r) for r in rows], **documents})
    section = markdown_section(rows, title=title, judge=cached.name, n_mmhal=n_mmhal, n_pope=n_pope, command=command,
                               plot=plot.name)
    md_path = out / "quant_report.md"
    write_text(md_path, section)
    if o.card:
        rel = plot.relative_to(bundle) if plot.is_relative_to(bundle) else plot
        put_section(bundle / "README.md", "quant-report", section.replace(f"]({plot.name})", f"]({rel})"))
    if o.benchmarks:
        bench = Path(o.benchmarks)
        rel = Path(_relpath(plot, bench.parent))
        put_section(bench, f"quant-report:{bundle.name}", section.replace(f"]({plot.name})", f"]({rel})"))
    return QuantReport(rows, section, json_path, md_path, plot, documents)


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())
