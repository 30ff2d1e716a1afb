"""`factedge demo`: click over factedge.train.demo."""

from __future__ import annotations

import click
from rich.console import Console

from factedge.convert.cli import _Bars, _progress, print_fidelity
from factedge.train.demo import QUESTION, run_demo

console = Console(stderr=True)


@click.command()
@click.option("--question", default=QUESTION, show_default=True)
@click.option("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)")
def demo(question, threads):
    """Convert a LLaVA-RLHF-layout checkpoint, verify it against PyTorch and ask about an image."""
    with _progress() as progress:
        result = run_demo(question=question, threads=threads, progress=_Bars(progress),
                          log=lambda m: console.print(f"[bold]demo:[/bold] {m}"))
    console.print(f"bundle: {result.bundle} ({'converted now' if result.converted else 'cached'})")
    print_fidelity(result.manifest.fidelity)
    click.echo(f"\nimage: {result.image}\nquestion: {question}")
    for quant, answer in result.answers.items():
        s = answer.stats
        click.echo(f"[{quant}] {answer.text!r}")
        click.echo(f"        image encode {s.image_encode_s * 1000:.0f} ms, prompt {s.prompt_tokens} tokens at "
                   f"{s.prompt_tps:.0f} tok/s, {s.generated_tokens} tokens at {s.generate_tps:.0f} tok/s")
    click.echo("\n(The tiny model has random weights: its answer shows the path, not understanding.)")
