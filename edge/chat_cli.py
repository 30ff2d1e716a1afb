"""`factedge chat`: an interactive multi-turn chat in the terminal (the loop lives in edge.repl)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="a bundle folder from `factedge convert`, or a model GGUF (then give --mmproj)")
@click.option("--image", type=click.Path(path_type=Path), help="image attached to the first question")
@click.option("--mmproj", type=click.Path(path_type=Path), help="mmproj GGUF (when --model is a file)")
@click.option("--adapter", type=click.Path(path_type=Path), help="LoRA adapter GGUF (when --model is a file)")
@click.option("--adapter-scale", type=float, default=1.0, show_default=True, help="LoRA scale in [0, 1]")
@click.option("--quant", help="which model file of the bundle (e.g. Q4_K_M, Q8_0, F16)")
@click.option("--n-ctx", type=int, default=4096, show_default=True, help="context window (positions)")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)")
@click.option("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)")
@click.option("--stats", is_flag=True, help="print image-encode time and tokens/s after each answer")
def chat(model, image, mmproj, adapter, adapter_scale, quant, n_ctx, temperature, top_p, max_tokens, seed, threads,
         n_gpu_layers, stats):
    """Chat with a converted model about images (/help inside lists the commands)."""
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.repl import ChatRepl, ReplOptions
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.session import ChatOptions, VisionChat

    sampling = SamplingOptions(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    options = ChatOptions(n_ctx=64, threads=threads, n_gpu_layers=n_gpu_layers, sampling=sampling,
                          adapter_scale=adapter_scale)  # n_ctx 64: the VisionChat's own context stays unused
    bundle = model if model.is_dir() else None
    with VisionChat.open(bundle, model=None if bundle else model, mmproj=mmproj, adapter=adapter, quant=quant,
                         options=options) as vision, ChatSession(vision, SessionOptions(n_ctx=n_ctx)) as session:
        repl_options = ReplOptions(stats=stats, image=image)
        out = sys.stdout
        if sys.stdin.isatty():
            _enable_history()
            ChatRepl(session, out, input, repl_options).run()
        else:
            ChatRepl.over_stream(session, sys.stdin, out, repl_options).run()


def _enable_history() -> None:
    """Line editing and up-arrow history for `input()` where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what hooks it into input())
    except ImportError:  # Windows without pyreadline: plain input
        pass
