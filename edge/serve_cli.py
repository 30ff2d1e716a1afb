"""`factedge serve`: run the OpenAI-compatible server over a bundle (the only place that prints)."""

from __future__ import annotations

from pathlib import Path

import click

from factedge.edge.cli_options import batch_options, model_options, n_ctx_option, open_vision, runtime_options


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback exposes the model to the network")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", envvar="FACTEDGE_API_KEY", help="require `Authorization: Bearer KEY` (env FACTEDGE_API_KEY)")
@click.option("--max-request-bytes", type=int, default=32 << 20, show_default=True)
@click.option("--max-queue", type=int, default=4, show_default=True, help="requests waiting beyond this get 429")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(path_type=Path),
              help="a folder whose image files clients may name by local path (repeatable); "
                   "by default clients send images as data: URIs and no local file is read")
@click.option("--allow-host", "allowed_hosts", multiple=True,
              help="a Host name to accept besides IP addresses and localhost (repeatable)")
@click.option("--socket-timeout", type=float, default=30.0, show_default=True,
              help="seconds any one read or write on a client connection may take")
@click.option("--max-connections", type=int, default=32, show_default=True,
              help="open connections; more are refused with 503")
@batch_options(parallel=1, seq_ctx=2048, when="with --parallel > 1", what="requests")
@n_ctx_option
@runtime_options
@click.option("--verbose", is_flag=True, help="log every request to stderr")
def serve(model, mmproj, adapter, quant, chat_format, host, port, api_key, max_request_bytes, max_queue, allow_dirs,
          allowed_hosts, socket_timeout, max_connections, parallel, seq_ctx, fast_batch, n_ctx, threads, n_gpu_layers,
          verbose):
    """Serve /v1/chat/completions and /v1/models (OpenAI-compatible) for a converted model."""
    from factedge.edge.chat import SessionOptions
    from factedge.edge.server import ChatServer, ServerOptions
    from factedge.edge.vision_model import ModelOptions

    options = ServerOptions(host=host, port=port, api_key=api_key, max_request_bytes=max_request_bytes,
                            max_queue=max_queue, session=SessionOptions(n_ctx=n_ctx), allow_dirs=tuple(allow_dirs),
                            allowed_hosts=tuple(allowed_hosts), socket_timeout_s=socket_timeout,
                            max_connections=max_connections, parallel=parallel, seq_ctx=seq_ctx,
                            exact=not fast_batch).check()
    log = (lambda line: click.echo(line, err=True)) if verbose else None
    with open_vision(model, mmproj, adapter, quant, ModelOptions(n_ctx=n_ctx, threads=threads,
                                                                n_gpu_layers=n_gpu_layers, chat_format=chat_format)) as chat:
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
