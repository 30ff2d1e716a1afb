"""What the benchmark and probe scripts share. Run them as modules from the repository root
(`python -m bench.speed.edge_speed ...`), so they import this and each other as `bench.*`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def factedge_shim(tree: Path) -> Path:
    """A fresh folder holding `factedge/`: symlinks to `tree`'s edge/, convert/, train/ (what the dev
    shim does); put it first on sys.path to import factedge from that tree."""
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="fe_shim_")) / "factedge"
    shim.mkdir()
    for wing in ("edge", "convert", "train"):
        (shim / wing).symlink_to(Path(tree) / wing, target_is_directory=True)
    return shim.parent


def ensure_factedge() -> None:
    """Import factedge from this checkout when it is not installed (a bare GPU machine)."""
    try:
        import factedge.train  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(factedge_shim(ROOT)))


def print_figures(results: dict[str, dict], rows: list[tuple[str, str]]) -> None:
    """A markdown table: one column per run (`results` name -> figures), one row per (label, key)."""
    print("| figure | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{r.get(key, float('nan')):.3f}" for r in results.values()) + " |")
