"""`factedge ask` and `factedge inspect`: click over the edge library (no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from factedge.edge.cli_options import (adapter_scale_option, batch_options, image_option, model_options, open_vision,
                                       runtime_options, sampling_from, sampling_options)
from factedge.edge.inspect import check_bundle, describe_gguf


@click.command()
@click.argument("question", required=False)
@model_options
@image_option("image file to ask about")
@click.option("--images", type=click.Path(path_type=Path), help="a folder: ask QUESTION about every image in it")
@click.option("--batch", "batch_file", type=click.Path(path_type=Path),
              help='a JSONL file of {"image": ..., "question": ..., "id": ...} lines (image relative to the file)')
@click.option("--out", type=click.Path(path_type=Path), help="with --images/--batch: the JSONL file of answers")
@batch_options(parallel=4, seq_ctx=1024, when="with --images/--batch", what="questions")
@click.option("--overwrite", is_flag=True, help="with --images/--batch: replace an existing --out file")
@sampling_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="print a JSON object (answer, tokens, stats)")
@click.option("--stats", is_flag=True, help="print load, image-encode and tokens/s figures")
@click.option("--compare-adapters", is_flag=True,
              help="answer with the base (SFT) model and with the LoRA adapter (RLHF), side by side")
@adapter_scale_option
def ask(question, model, image, images, batch_file, out, parallel, seq_ctx, fast_batch, overwrite, mmproj, adapter,
        quant, chat_format, temperature, top_p, top_k, max_tokens, seed, threads, n_gpu_layers, as_json, stats, compare_adapters,
        adapter_scale):
    """Answer QUESTION about --image with a converted model, or many questions (--images, --batch) into a
    JSONL file (resumable: run it again after an interruption)."""
    from factedge.edge.ask_many import check_sources
    from factedge.edge.batch import BatchOptions
    from factedge.edge.vision_model import ModelOptions

    check_sources(image, images, batch_file, question)
    options = ModelOptions(threads=threads, n_gpu_layers=n_gpu_layers, adapter_scale=adapter_scale, chat_format=chat_format,
                          sampling=sampling_from(temperature, top_p, top_k, max_tokens, seed))
    if images is not None or batch_file is not None:
        batch = BatchOptions(parallel=parallel, seq_ctx=seq_ctx, exact=not fast_batch).check()
        _ask_many(question, images, batch_file, out, batch, overwrite, (model, mmproj, adapter, quant), options)
        return
    with open_vision(model, mmproj, adapter, quant, options) as chat:
        if compare_adapters:
            _compare(chat, question, image, adapter_scale, as_json, stats)
            return
        answer = chat.ask(question, image)
    figures = {**asdict(answer.stats), "prompt_tps": answer.stats.prompt_tps, "generate_tps": answer.stats.generate_tps}
    if as_json:
        click.echo(json.dumps({"answer": answer.text, "tokens": answer.tokens, "finish_reason": answer.finish_reason,
                               "stats": figures}))
        return
    click.echo(answer.text)
    if stats:
        s = answer.stats
        click.echo(f"load {s.load_s:.2f} s | image encode {s.image_encode_s:.2f} s | prompt {s.prompt_tokens} tok "
                   f"{s.prompt_tps:.1f} tok/s | generation {s.generated_tokens} tok {s.generate_tps:.1f} tok/s", err=True)


def _ask_many(question, folder, batch_file, out, batch, overwrite, files, options) -> None:
    """--images / --batch: the jobs through the batch engine into --out, a progress bar on stderr."""
    from factedge.edge.ask_many import answer_jobs, jobs_from_folder, jobs_from_jsonl
    from factedge.edge.errors import ConfigError
    from factedge.edge.progress import step_bars

    if out is None:
        raise ConfigError("--images and --batch write their answers to --out FILE.jsonl")
    jobs = jobs_from_folder(folder, question) if folder is not None else jobs_from_jsonl(batch_file, question)
    with open_vision(*files, options) as vision, step_bars() as report:
        s = answer_jobs(vision, jobs, out, batch=batch, overwrite=overwrite, progress=report)
    click.echo(f"{s.out}: {s.answered} answered, {s.failed} failed"
               + (f", {s.resumed} from an earlier run" if s.resumed else "")
               + f" in {s.wall_s:.1f} s ({s.generated_tokens / max(s.wall_s, 1e-9):.1f} generated tokens/s)", err=True)
    if s.failed:
        raise click.exceptions.Exit(1)


def _compare(chat, question, image, scale, as_json, stats) -> None:
    """--compare-adapters: one ChatSession, the image encoded once, two answers."""
    from factedge.edge.adapters import compare_adapters
    from factedge.edge.chat import ChatSession, SessionOptions

    with ChatSession(chat, SessionOptions(n_ctx=chat.options.n_ctx)) as session:
        result = compare_adapters(session, question, image, scale=scale)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(side_by_side(("base (SFT)", result.base.text), (f"adapter x{scale:g} (RLHF)", result.adapter.text)))
    if stats:
        for name, a in (("base", result.base), ("adapter", result.adapter)):
            s = a.stats
            click.echo(f"{name}: image encode {s.image_encode_s:.2f} s | prompt {s.prompt_tokens} tok "
                       f"{s.prompt_tps:.1f} tok/s | generation {s.generated_tokens} tok {s.generate_tps:.1f} tok/s",
                       err=True)


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int | None = None) -> str:
    """Two titled texts in two columns (wrapped), for comparing answers at a glance."""
    import shutil
    import textwrap

    width = width or min(shutil.get_terminal_size((100, 24)).columns, 160)
    col = max((width - 3) // 2, 20)
    cols = [[title, "-" * min(len(title), col)] + (textwrap.wrap(text, col) or [""]) for title, text in (left, right)]
    rows = max(len(c) for c in cols)
    cols = [c + [""] * (rows - len(c)) for c in cols]
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in zip(*cols))


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--no-hash", is_flag=True, help="skip the sha256 check of bundle files")
def inspect(path, no_hash):
    """Show what a GGUF file or a bundle holds (metadata, tensors, fingerprint, pairing)."""
    if path.is_dir():  # a bundle (read_manifest says so when it is not one)
        check = check_bundle(path, hashes=not no_hash)
        m = check.manifest
        click.echo(f"bundle {path}: {m.source.get('layout')} checkpoint, LoRA {m.lora or 'none'}, "
                   f"fingerprint {m.fingerprint.id} (n_embd {m.fingerprint.n_embd}, image {m.fingerprint.image_size} px, "
                   f"{m.fingerprint.tokens_per_image} tokens/image)")
        for entry, summary in zip(m.files, check.files):
            tensors = f"{summary.tensors:4d} tensors" if summary is not None else "unreadable"
            click.echo(f"  {entry.name:<24} {entry.role:<8} {entry.dtype:<7} {entry.size / 2**20:8.1f} MiB {tensors}")
        click.echo("pairing: ok" if check.ok else "pairing: PROBLEMS")
        for problem in check.problems:
            click.echo(f"  - {problem}")
        if not check.ok:
            raise click.exceptions.Exit(1)
        return
    summary = describe_gguf(path)
    click.echo(f"{path}: {summary.tensors} tensors, {summary.n_metadata} metadata keys"
               + (f", vocab {summary.vocab_size}" if summary.vocab_size else ""))
    for key, value in summary.metadata.items():
        click.echo(f"  {key} = {value}")
