"""`factedge chat`: an interactive multi-turn chat in the terminal (the loop lives in edge.repl)."""

from __future__ import annotations

import sys

import click

from factedge.edge.cli_options import (adapter_scale_option, image_option, model_options, n_ctx_option,
                                       open_vision, runtime_options, sampling_from, sampling_options)


@click.command()
@model_options
@image_option("image attached to the first question")
@adapter_scale_option
@n_ctx_option
@sampling_options
@runtime_options
@click.option("--stats", is_flag=True, help="print image-encode time and tokens/s after each answer")
def chat(model, image, mmproj, adapter, quant, chat_format, adapter_scale, n_ctx, temperature, top_p, top_k, max_tokens, seed,
         threads, n_gpu_layers, stats):
    """Chat with a converted model about images (/help inside lists the commands)."""
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.repl import ChatRepl, ReplOptions
    from factedge.edge.vision_model import ModelOptions

    options = ModelOptions(n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, adapter_scale=adapter_scale,
                           chat_format=chat_format,
                           sampling=sampling_from(temperature, top_p, top_k, max_tokens, seed))
    with open_vision(model, mmproj, adapter, quant, options) as vision, \
            ChatSession(vision, SessionOptions(n_ctx=n_ctx)) as session:
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
