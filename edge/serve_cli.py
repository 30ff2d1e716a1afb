"""`factedge serve`: run the OpenAI-compatible server over a bundle (the only place that prints)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="a bundle folder from `factedge convert`, or a model GGUF (then give --mmproj)")
@click.option("--mmproj", type=click.Path(path_type=Path), help="mmproj GGUF (when --model is a file)")
@click.option("--adapter", type=click.Path(path_type=Path), help="LoRA adapter GGUF (when --model is a file)")
@click.option("--quant", help="which model file of the bundle (e.g. Q4_K_M, Q8_0, F16)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback exposes the model to the network")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", envvar="FACTEDGE_API_KEY", help="require `Authorization: Bearer KEY` (env FACTEDGE_API_KEY)")
@click.option("--max-request-bytes", type=int, default=32 << 20, show_default=True)
@click.option("--max-queue", type=int, default=4, show_default=True, help="requests waiting beyond this get 429")
@click.option("--n-ctx", type=int, default=4096, show_default=True)
@click.option("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)")
@click.option("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)")
@click.option("--verbose", is_flag=True, help="log every request to stderr")
def serve(model, mmproj, adapter, quant, host, port, api_key, max_request_bytes, max_queue, n_ctx, threads,
          n_gpu_layers, verbose):
    """Serve /v1/chat/completions and /v1/models (OpenAI-compatible) for a converted model."""
    from factedge.edge.chat import SessionOptions
    from factedge.edge.server import ChatServer, ServerOptions
    from factedge.edge.session import ChatOptions, VisionChat

    options = ServerOptions(host=host, port=port, api_key=api_key, max_request_bytes=max_request_bytes,
                            max_queue=max_queue, session=SessionOptions(n_ctx=n_ctx))
    bundle = model if model.is_dir() else None
    log = (lambda line: click.echo(line, err=True)) if verbose else None
    with VisionChat.open(bundle, model=None if bundle else model, mmproj=mmproj, adapter=adapter, quant=quant,
                         options=ChatOptions(n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers)) as chat:
        server = ChatServer(chat, options, log=log)
        try:
            if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
                click.echo(f"warning: listening on {host} without --api-key", err=True)
            click.echo(f"factedge: serving {server.model_name} on http://{host}:{server.port}/v1", err=True)
            server.serve_forever()
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        finally:
            server.server_close()
