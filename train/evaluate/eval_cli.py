"""`factedge eval mmhal | pope | fidelity | quant-report`: click over factedge.train.evaluate.

mmhal and pope run on bundles through the edge runtime (no torch unless --torch asks for the
PyTorch reference row); results go to stdout as a table and, with --json, to a file.
"""

from __future__ import annotations

from functools import wraps
from pathlib import Path

import click
from rich.console import Console

from factedge.edge.progress import step_bars
from factedge.train.evaluate.backends import EdgeOptions



def _split(value: str | None) -> list[str]:
    return [v for v in (s.strip() for s in (value or "").split(",")) if v]


def _model_options(func):
    """Options every benchmark command shares: what answers, how, and where results go."""
    options = [
        click.option("--model", type=click.Path(path_type=Path), help="a bundle folder from `factedge convert`"),
        click.option("--quant", help="which model file of --model (e.g. Q4_K_M, Q8_0, F16)"),
        click.option("--compare", help="comma-separated BUNDLE[:QUANT] entries, one table row each"),
        click.option("--torch", "torch_checkpoint", type=click.Path(path_type=Path),
                     help="also run the PyTorch checkpoint (the reference row; needs the convert extra)"),
        click.option("--adapter", type=click.Choice(["peft", "merged", "none"]), default="peft", show_default=True,
                     help="--torch: apply the checkpoint's LoRA unmerged (peft), merged, or not at all"),
        click.option("--vision-tower", type=click.Path(path_type=Path), help="--torch: CLIP folder (original LLaVA)"),
        click.option("--images", type=click.Path(path_type=Path), help="folder holding the benchmark's images"),
        click.option("--limit", type=int, help="evaluate only the first N items (POPE: per split)"),
        click.option("--max-tokens", type=int, help="answer length cap (default: the paper's for the benchmark)"),
        click.option("--prompt-suffix", help="text appended to every question (default: the paper's)"),
        click.option("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)"),
        click.option("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)"),
        click.option("--n-ctx", type=int, default=2048, show_default=True),
        click.option("--reuse-kv/--no-reuse-kv", default=True, show_default=True,
                     help="keep the system prompt + image in the KV cache between questions on the same image"),
        click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="questions a bundle decodes together (same answers; KV memory grows with it)"),
        click.option("--json", "json_out", type=click.Path(path_type=Path), help="write all results to this JSON file"),
    ]
    for option in reversed(options):
        func = option(func)

    @wraps(func)
    def wrapper(**kw):
        from factedge.train.evaluate.runner import backend_specs

        adapter = None if kw["adapter"] == "none" else kw["adapter"]
        kw["specs"] = backend_specs(kw.pop("model"), kw.pop("quant"), _split(kw.pop("compare")),
                                    kw.pop("torch_checkpoint"), adapter, kw.pop("vision_tower"))
        kw.pop("adapter")
        kw["edge"] = EdgeOptions(threads=kw.pop("threads"), n_gpu_layers=kw.pop("n_gpu_layers"),
                                 n_ctx=kw.pop("n_ctx"), reuse_prefix=kw.pop("reuse_kv"), parallel=kw.pop("parallel"))
        return func(**kw)

    return wrapper


def _finish(document: dict, table, json_out: Path | None) -> None:
    from factedge.edge.atomic import write_json

    out = Console()
    if not out.is_terminal:  # a pipe or file: no terminal width to fit, keep the figures whole
        out = Console(width=160)
    out.print(table)
    if json_out is not None:
        write_json(json_out, document)
        click.echo(f"wrote {json_out}", err=True)


@click.group()
def evaluate() -> None:
    """Measure hallucination (MMHal, POPE) and fidelity of bundles and PyTorch models."""


@evaluate.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--judge", "judge_spec", default="world", show_default=True,
              help="'world' (the shapes world's programmatic judge) or an OpenAI-compatible endpoint URL")
@click.option("--judge-model", default="gpt-4-0314", show_default=True, help="model name sent to the endpoint")
@click.option("--judge-key-env", default="OPENAI_API_KEY", show_default=True,
              help="environment variable holding the endpoint's API key")
@click.option("--scenes", type=click.Path(path_type=Path), help="scenes.json for the world judge (default: beside DATA)")
@_model_options
def mmhal(data, judge_spec, judge_model, judge_key_env, scenes, specs, edge, images, limit, max_tokens, prompt_suffix,
          json_out):
    """MMHal-Bench: answers to DATA (json) rated 0-6 by a judge; mean score, hallucination rate, per type."""
    from factedge.train.evaluate.judges import CachedJudge, OpenAIJudgeOptions, make_judge
    from factedge.train.evaluate.mmhal import MMHalOptions, load_mmhal, run_mmhal
    from factedge.train.evaluate.report import mmhal_table, results_document
    from factedge.train.evaluate.runner import run_all

    items = load_mmhal(data, images, scenes)
    judge = CachedJudge(make_judge(judge_spec, OpenAIJudgeOptions(model=judge_model, api_key_env=judge_key_env)))
    options = MMHalOptions(limit=limit)
    if max_tokens is not None:
        options.max_tokens = max_tokens
    if prompt_suffix is not None:
        options.prompt_suffix = prompt_suffix
    n = len(items) if limit is None else min(limit, len(items))
    with step_bars(transient=True) as progress:
        runs = run_all(specs, edge, lambda b, p: run_mmhal(b, items, judge, options, p), n, progress)
    document = results_document("mmhal", runs, data=str(data), judge=judge.name, judge_calls=judge.calls,
                                options=vars(options))
    _finish(document, mmhal_table(runs, f"MMHal ({n} items, judge {judge.name})"), json_out)


@evaluate.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@_model_options
def pope(data, specs, edge, images, limit, max_tokens, prompt_suffix, json_out):
    """POPE: yes/no object probes in DATA (jsonl, one per split); accuracy, precision, recall, F1, yes-ratio."""
    from factedge.train.evaluate.pope import PopeOptions, limit_per_split, load_pope, run_pope
    from factedge.train.evaluate.report import pope_table, results_document
    from factedge.train.evaluate.runner import run_all

    items = load_pope(list(data), images)
    options = PopeOptions(limit=limit)
    if max_tokens is not None:
        options.max_tokens = max_tokens
    if prompt_suffix is not None:
        options.prompt_suffix = prompt_suffix
    n = len(limit_per_split(items, limit))
    with step_bars(transient=True) as progress:
        runs = run_all(specs, edge, lambda b, p: run_pope(b, items, options, p), n, progress)
    document = results_document("pope", runs, data=[str(d) for d in data], options=vars(options))
    _finish(document, pope_table(runs, f"POPE ({n} items)"), json_out)


@evaluate.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="a bundle folder")
@click.option("--src", required=True, type=click.Path(path_type=Path), help="the checkpoint the bundle came from")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="folder of your images")
@click.option("--vision-tower", type=click.Path(path_type=Path))
@click.option("--lora", type=click.Path(path_type=Path), help="PEFT adapter folder (LLaVA-RLHF's is found automatically)")
@click.option("--quant", help="only this LM file (default: every one in the bundle)")
@click.option("--limit", type=int, help="first N images (by name)")
@click.option("--question", default="What is in this image? Describe it in detail.", show_default=True)
@click.option("--n-greedy", type=int, default=32, show_default=True, help="greedy tokens compared per image")
@click.option("--threads", type=int, default=0)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the figures to this JSON file")
def fidelity(model, src, images, vision_tower, lora, quant, limit, question, n_greedy, threads, json_out):
    """Embedding cosine, top-1 agreement, KL and greedy tokens vs PyTorch, on a folder of your images."""
    from factedge.train.evaluate.image_fidelity import FidelityOptions, folder_fidelity
    from factedge.train.evaluate.report import fidelity_table

    options = FidelityOptions(question=question, n_greedy=n_greedy, limit=limit, quant=quant, threads=threads)
    report = folder_fidelity(model, src, images, vision_tower=vision_tower, lora=lora, options=options)
    _finish({"schema": 1, "benchmark": "fidelity", "bundle": str(model), "src": str(src), **report},
            fidelity_table(report), json_out)


@evaluate.command("quant-report")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="the bundle (its F16 file is quantized)")
@click.option("--mmhal", "mmhal_data", required=True, type=click.Path(path_type=Path), help="shapes-MMHal json")
@click.option("--pope", "pope_data", required=True, multiple=True, type=click.Path(path_type=Path),
              help="POPE jsonl (repeat per split)")
@click.option("--torch", "torch_checkpoint", type=click.Path(path_type=Path), help="the PyTorch reference checkpoint")
@click.option("--adapter", type=click.Choice(["peft", "merged", "none"]), default="peft", show_default=True)
@click.option("--quants", default="F16,Q8_0,Q5_K_M,Q4_K_M,Q4_0", show_default=True)
@click.option("--judge", "judge_spec", default="world", show_default=True)
@click.option("--judge-model", default="gpt-4-0314", show_default=True)
@click.option("--images", type=click.Path(path_type=Path))
@click.option("--limit", type=int, help="first N MMHal items and N POPE items per split")
@click.option("--mmhal-max-tokens", type=int, default=256, show_default=True)
@click.option("--pope-max-tokens", type=int, default=16, show_default=True)
@click.option("--threads", type=int, default=0)
@click.option("--out", type=click.Path(path_type=Path), help="folder for report.json, report.md, plot PNG "
              "(default: <bundle>/eval)")
@click.option("--benchmarks", type=click.Path(path_type=Path), help="also write the section into this BENCHMARKS.md")
@click.option("--card/--no-card", default=True, show_default=True, help="write the section into the bundle's README.md")
def quant_report_cmd(model, mmhal_data, pope_data, torch_checkpoint, adapter, quants, judge_spec, judge_model, images,
                     limit, mmhal_max_tokens, pope_max_tokens, threads, out, benchmarks, card):
    """Hallucination rate and POPE F1 per quant vs PyTorch, tokens/s and file size: table, plot, model card."""
    from factedge.train.evaluate.judges import OpenAIJudgeOptions, make_judge
    from factedge.train.evaluate.quant_report import QuantReportOptions, quant_report

    options = QuantReportOptions(quants=_split(quants), limit=limit, threads=threads, images=images,
                                 torch_checkpoint=torch_checkpoint, adapter=None if adapter == "none" else adapter,
                                 out=out, benchmarks=benchmarks, card=card, mmhal_max_tokens=mmhal_max_tokens,
                                 pope_max_tokens=pope_max_tokens)
    judge = make_judge(judge_spec, OpenAIJudgeOptions(model=judge_model))
    with step_bars(transient=True) as progress:
        report = quant_report(model, mmhal_data, list(pope_data), judge, options, progress)
    click.echo(report.markdown)
    click.echo(f"wrote {report.json_path}, {report.markdown_path}, {report.plot_path}", err=True)
