"""`factedge convert | verify`: click over factedge.convert (parse, call the library, print)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from factedge.convert.batch import read_batch, run_batch
from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.layouts import load_checkpoint
from factedge.edge.file_types import MMPROJ_TYPES
from factedge.edge.errors import ConfigError, FidelityError
from factedge.edge.progress import step_bars

console = Console(stderr=True)


def _split(value: str) -> list[str]:
    return [v for v in (s.strip() for s in value.split(",")) if v]


def print_fidelity(fidelity: dict) -> None:
    table = Table("file", "check", "figure", title="fidelity vs PyTorch")
    for dtype, figs in fidelity.get("embeddings", {}).items():
        for f in figs:
            table.add_row(f"mmproj {dtype}", f"embeddings {f['image']}", f"min cos {f['min_cosine']:.6f}")
    for dtype, f in fidelity.get("logits", {}).items():
        table.add_row(f"model {dtype}", "top-1 / mean KL", f"{f['top1_agreement'] * 100:.2f}% / {f['mean_kl']:.2e}")
        if "decided_positions" in f:
            table.add_row(f"model {dtype}", "top-1 where PyTorch is decided",
                          f"{f['decided_agreement'] * 100:.2f}% of {f['decided_positions']}")
        table.add_row(f"model {dtype}", "greedy tokens equal", f"{f['greedy_common']}/{len(f['greedy_ref'])}")
    console.print(table)
    for failure in fidelity.get("failures", []):
        console.print(f"[red]below threshold:[/red] {escape(failure)}")


@click.command()
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="bundle folder to create")
@click.option("--batch", "batch_file", type=click.Path(path_type=Path), help="TOML/YAML list of checkpoints")
@click.option("--vision-tower", type=click.Path(path_type=Path), help="CLIP folder (original LLaVA layouts)")
@click.option("--lora", type=click.Path(path_type=Path), help="PEFT adapter folder (found automatically for LLaVA-RLHF)")
@click.option("--merge/--adapter", "merge", default=True, help="merge the LoRA into the model, or keep it as a runtime adapter")
@click.option("--base-type", default="f16", show_default=True, help="unquantized LM type: f32, f16, bf16")
@click.option("--quant", default="Q4_K_M,Q8_0", show_default=True, help="comma-separated LM quant types")
@click.option("--mmproj-type", default="f16", show_default=True, help=f"comma-separated: {', '.join(MMPROJ_TYPES)}")
@click.option("--verify/--no-verify", default=True, show_default=True, help="compare against PyTorch after converting")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--threads", type=int, default=0, help="threads for quantization (0: all)")
def convert(src, out, batch_file, vision_tower, lora, merge, base_type, quant, mmproj_type, verify, overwrite, threads):
    """Convert a LLaVA / LLaVA-RLHF checkpoint (or a batch of them) into a GGUF bundle."""
    if batch_file is not None:
        if src or out:
            raise ConfigError("give either SRC --out DIR or --batch FILE, not both")
        return _convert_batch(batch_file)
    if src is None or out is None:
        raise ConfigError("SRC and --out are required (or --batch FILE)")
    options = ConvertOptions(vision_tower=vision_tower, lora=lora, lora_mode="merge" if merge else "adapter",
                             base_type=base_type, quants=_split(quant), mmproj_types=_split(mmproj_type),
                             verify=verify, overwrite=overwrite, threads=threads)
    with step_bars() as progress:
        manifest = convert_checkpoint(src, out, options, progress)
    click.echo(f"wrote {out} ({len(manifest.files)} files, fingerprint {manifest.fingerprint.id})", err=True)
    if manifest.fidelity:
        print_fidelity(manifest.fidelity)
        if manifest.fidelity.get("failures"):
            raise FidelityError("; ".join(manifest.fidelity["failures"]), out)


def _convert_batch(batch_file: Path) -> None:
    entries = read_batch(batch_file)
    with step_bars() as progress:
        results = run_batch(entries, progress, on_result=lambda r: click.echo(
            f"{r.status:>9}  {r.entry.src}" + (f"  ({r.error})" if r.error else ""), err=True))
    table = Table("checkpoint", "output", "status", "seconds", "error", title="batch summary")
    for r in results:
        table.add_row(*(Text(v) for v in (str(r.entry.src), str(r.entry.out), r.status, f"{r.seconds:.1f}", r.error or "")))
    Console().print(table)
    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("converted", "skipped", "failed")}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()))
    for r in failed:  # one greppable line each; the table may wrap long messages
        click.echo(f"factedge: error: {r.error}", err=True)
    if failed:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--src", required=True, type=click.Path(path_type=Path), help="the checkpoint the bundle came from")
@click.option("--vision-tower", type=click.Path(path_type=Path))
@click.option("--lora", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def verify(bundle, src, vision_tower, lora, as_json):
    """Compare a bundle's GGUF files with the PyTorch checkpoint (embeddings, logits, greedy text)."""
    from factedge.convert.verify import verify_bundle

    ckpt = load_checkpoint(src, vision_tower=vision_tower, lora=lora)
    _, report = verify_bundle(bundle, ckpt)
    data = report.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        print_fidelity(data)
    if data["failures"]:
        raise FidelityError("; ".join(data["failures"]), bundle)
