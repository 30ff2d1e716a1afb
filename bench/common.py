"""What the benchmark and probe scripts share. Run them as modules from the repository root
(`python -m bench.speed.edge_speed ...`), so they import this and each other as `bench.*`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def ensure_factedge() -> None:
    """Import factedge from this checkout when it is not installed (a bare GPU machine): a namespace
    folder of symlinks to edge/, convert/, train/ on sys.path (what the dev shim does)."""
    try:
        import factedge.train  # noqa: F401
    except ImportError:
        import tempfile

        shim = Path(tempfile.mkdtemp(prefix="fe_shim_")) / "factedge"
        shim.mkdir()
        for wing in ("edge", "convert", "train"):
            (shim / wing).symlink_to(ROOT / wing, target_is_directory=True)
        sys.path.insert(0, str(shim.parent))


def print_figures(results: dict[str, dict], rows: list[tuple[str, str]]) -> None:
    """A markdown table: one column per run (`results` name -> figures), one row per (label, key)."""
    print("| figure | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{r.get(key, float('nan')):.3f}" for r in results.values()) + " |")
