"""Click options shared by `factedge ask`, `chat` and `serve`: one definition and one help text each.

The commands took the same model-file, sampling and runtime options, copied three times; a fix to one
copy (a default, a help line) silently missed the others. Each group here is a decorator, and
`open_vision` does the bundle-or-file dance the commands repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from factedge.edge.chat_format import FORMATS


def _stack(*decorators: Callable) -> Callable:
    """Apply click decorators in the order written (the first one is the first option in --help)."""
    def apply(f: Callable) -> Callable:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


def model_options(f: Callable) -> Callable:
    """--model (bundle folder or GGUF), --mmproj, --adapter, --quant, --chat-format."""
    return _stack(
        click.option("--model", "model", required=True, type=click.Path(path_type=Path),
                     help="a bundle folder from `factedge convert`, or a model GGUF (then give --mmproj)"),
        click.option("--mmproj", type=click.Path(path_type=Path), help="mmproj GGUF (when --model is a file)"),
        click.option("--adapter", type=click.Path(path_type=Path), help="LoRA adapter GGUF (when --model is a file)"),
        click.option("--quant", help="which model file of the bundle (e.g. Q4_K_M, Q8_0, F16)"),
        click.option("--chat-format", type=click.Choice(sorted(FORMATS)),
                     help="conversation format (default: the one the model's GGUF chat template renders like)"),
    )(f)


def adapter_scale_option(f: Callable) -> Callable:
    return click.option("--adapter-scale", type=float, default=1.0, show_default=True,
                        help="LoRA scale in [0, 1]")(f)


def image_option(help_text: str) -> Callable:
    return click.option("--image", type=click.Path(path_type=Path), help=help_text)


def n_ctx_option(f: Callable) -> Callable:
    return click.option("--n-ctx", type=int, default=4096, show_default=True, help="context window (positions)")(f)


def sampling_options(f: Callable) -> Callable:
    """--temperature, --top-p, --top-k, --max-tokens, --seed (greedy by default)."""
    return _stack(
        click.option("--temperature", type=float, default=0.0, show_default=True),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True),
        click.option("--max-tokens", type=int, default=256, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
    )(f)


def batch_options(*, parallel: int, seq_ctx: int, when: str, what: str) -> Callable:
    """--parallel, --seq-ctx, --fast-batch (edge/batch.py) for `ask` (many questions) and `serve`."""
    return _stack(
        click.option("--parallel", type=click.IntRange(1, 64), default=parallel, show_default=True,
                     help=f"{what} decoded together"),
        click.option("--seq-ctx", type=int, default=seq_ctx, show_default=True,
                     help=f"{when}: positions each of them may use (images, prompt, history and answer)"),
        click.option("--fast-batch", is_flag=True,
                     help=f"{when}: one llama.cpp call per step for all {what} in flight (faster, most on a GPU; "
                          "an answer may then differ from one-at-a-time where two tokens nearly tie)"),
    )


def runtime_options(f: Callable) -> Callable:
    """--threads, --n-gpu-layers."""
    return _stack(
        click.option("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)"),
        click.option("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)"),
    )(f)


def sampling_from(temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int):
    """SamplingOptions from the `sampling_options` values."""
    from factedge.edge.sampling import SamplingOptions

    return SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)


def open_vision(model: Path, mmproj: Path | None, adapter: Path | None, quant: str | None, options):
    """A VisionModel over a bundle folder, or over explicit GGUF files when --model is a file."""
    from factedge.edge.vision_model import VisionModel

    bundle = model if model.is_dir() else None
    return VisionModel.open(bundle, model=None if bundle else model, mmproj=mmproj, adapter=adapter, quant=quant,
                           options=options)
