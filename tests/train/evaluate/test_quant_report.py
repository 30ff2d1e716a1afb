"""Quantization report: the markdown section (verdict, deltas), section replacement, the plot."""

from __future__ import annotations

import pytest

from factedge.train.evaluate.quant_report import QuantRow, markdown_section, plot_rows, put_section

ROWS = [QuantRow("pytorch (peft)", "PyTorch", None, 0.20, 3.5, 0.80, 0.81, 0.5, 10.0),
        QuantRow("b:F16", "F16", 200 * 2**20, 0.20, 3.5, 0.80, 0.81, 0.5, 20.0),
        QuantRow("b:Q8_0", "Q8_0", 110 * 2**20, 0.205, 3.4, 0.79, 0.80, 0.5, 35.0),
        QuantRow("b:Q4_0", "Q4_0", 60 * 2**20, 0.25, 3.0, 0.70, 0.72, 0.6, 50.0)]


def test_markdown_section():
    text = markdown_section(ROWS, title="Hallucination after quantization: b", judge="world", n_mmhal=96, n_pope=300,
                            command="factedge eval quant-report --model b", plot="quant_report.png")
    lines = text.splitlines()
    assert lines[0] == "## Hallucination after quantization: b"
    assert "| pytorch (peft) | - | 20.0% | - | 3.50 | 80.0 | 81.0 | 50.0% | 10.0 |" in lines
    assert "| b:Q8_0 | 110.0 | 20.5% | +0.5 | 3.40 | 79.0 | 80.0 | 50.0% | 35.0 |" in lines
    assert "| b:Q4_0 | 60.0 | 25.0% | +5.0 | 3.00 | 70.0 | 72.0 | 60.0% | 50.0 |" in lines
    assert "Within 1 point of PyTorch's hallucination rate: F16, Q8_0. Outside it: Q4_0." in lines
    assert "hallucination = rating < 3" in text and "96 items" in text and "300 items" in text
    assert "![hallucination rate and tokens/s against file size](quant_report.png)" in lines
    assert lines[-1] == "Reproduce: `factedge eval quant-report --model b`"


def test_put_section_replaces_in_place(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# bundle\n\nintro\n")
    put_section(card, "quant-report", "## A\nfirst")
    put_section(card, "other", "## B")
    put_section(card, "quant-report", "## A\nsecond")
    text = card.read_text()
    assert text.count("<!-- factedge:quant-report begin -->") == 1 and "first" not in text and "second" in text
    assert text.index("# bundle") < text.index("## A") < text.index("## B")  # kept its place
    assert put_section(tmp_path / "new.md", "k", "x").read_text() == "<!-- factedge:k begin -->\nx\n<!-- factedge:k end -->\n"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_rows(ROWS, tmp_path / "q.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))
