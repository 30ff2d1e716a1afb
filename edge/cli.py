"""The `factedge` command: a thin click layer. Subcommands of other wings load lazily.

`factedge ask` works on a base install (no torch); `convert`, `verify`, `inspect` and `demo` are
imported only when named, so `factedge --help` stays fast and torch-free.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from factedge.edge.errors import FactedgeError

# command name -> "module:attribute"
LAZY_COMMANDS = {
    "ask": "factedge.edge.ask_cli:ask",
    "chat": "factedge.edge.chat_cli:chat",
    "convert": "factedge.convert.convert_cli:convert",
    "inspect": "factedge.edge.ask_cli:inspect",
    "verify": "factedge.convert.convert_cli:verify",
    "demo": "factedge.train.demo.demo_cli:demo",
    "serve": "factedge.edge.serve_cli:serve",
    "train": "factedge.train.train_cli:train",
    "data": "factedge.train.world.data_cli:data",
    "eval": "factedge.train.evaluate.eval_cli:evaluate",
}
# what `factedge --help` lists, without importing the commands (which would pull torch and llama.cpp)
SHORT_HELP = {
    "ask": "Answer a question about an image with a converted model.",
    "chat": "Chat interactively (multi-turn, streaming) with a converted model about images.",
    "convert": "Convert a LLaVA / LLaVA-RLHF checkpoint (or a batch) into a GGUF bundle.",
    "inspect": "Show what a GGUF file or a bundle holds, and whether its files pair.",
    "verify": "Compare a bundle's GGUF files with the PyTorch checkpoint.",
    "demo": "Train a small LLaVA with Fact-RLHF on a synthetic world, convert it, compare SFT vs RLHF answers.",
    "serve": "Serve a converted model over an OpenAI-compatible HTTP API (loopback by default).",
    "train": "Run the Fact-RLHF recipe: SFT, fact-augmented reward model, PPO (or GRPO/RLOO).",
    "data": "Write the synthetic shapes world: training data, facts, preferences, MMHal/POPE sets.",
    "eval": "Measure hallucination (MMHal, POPE) and fidelity of bundles and PyTorch models.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(LAZY_COMMANDS)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in self.list_commands(ctx)])

    def get_command(self, ctx, name):
        target = LAZY_COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise click.ClickException(
                f"`factedge {name}` needs an extra that is not installed ({exc.name}); "
                "install with `pip install factedge[convert]`"
            ) from exc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("factedge")
    except PackageNotFoundError:  # running from a source tree
        return "unknown (not installed)"


@click.group(cls=LazyGroup)
@click.version_option(version=_version(), prog_name="factedge")
def cli() -> None:
    """factedge: LLaVA / LLaVA-RLHF to GGUF, verified, and chat on a laptop."""


def run(args: list[str] | None = None) -> int:
    """Run the group on `args` (default: sys.argv[1:]); print typed errors as one line; return the exit code."""
    try:
        # standalone_mode=False hands typed errors to us, but also *returns* the code of a
        # `click.exceptions.Exit` (e.g. inspect's "pairing: PROBLEMS") instead of exiting with it
        code = cli.main(args=args, prog_name="factedge", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except FactedgeError as exc:
        click.echo(f"factedge: error: {exc.one_line()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Terminated:
        click.echo("terminated", err=True)
        return 143
    except RecursionError:
        click.echo("factedge: error: input nested too deeply to read", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - the promise is one line, even for a bug
        if os.environ.get("FACTEDGE_DEBUG"):
            raise
        reason = " ".join(str(exc).split())
        click.echo(f"factedge: error: unexpected {type(exc).__name__}: {reason} "
                   "(a bug in factedge; FACTEDGE_DEBUG=1 shows the traceback)", err=True)
        return 70


class Terminated(BaseException):
    """SIGTERM as an exception, so `finally` blocks run: staging folders are removed and child
    processes (the quantize worker) are stopped before the process exits."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    code = run()
    if code:
        sys.exit(code)
