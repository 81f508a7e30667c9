"""The ``clipheads`` command line: a thin layer that parses options and calls the library.

Each concern registers its commands from its own module (``register(app)``).
"""

from __future__ import annotations

import logging
import sys

import typer

try:  # typer >= 0.20 vendors click as typer._click; its usage errors are not click's own classes
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError

from clipheads.errors import ClipHeadsError, OutputError

app = typer.Typer(
    name="clipheads",
    help=("Find the attention heads of CLIP's image encoder that hurt, ablate them at virtually no cost, and "
          "explain what each head does. Heads are written L{layer}.H{head}, 0-based. Every command uses the "
          "small CLIP bundled with clipheads unless you give --model (a Hugging Face id or folder, or "
          "open_clip:ARCH[/TAG]).\n\n"
          "\b\nThe three lines of work, and their commands:\n"
          "  AAT search (find the heads that hurt):  scan, search, bake; finetune compares with fine-tuning\n"
          "  layer-wise cancellation:                layers, captioner\n"
          "  head explanations:                      describe, ccs, prune; patch, maps, atlas to see heads\n"
          "Around them: demo (all of it on the bundled model), info, mask, eval, world."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from clipheads import __version__

        typer.echo(f"clipheads {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Options of ``clipheads`` itself (before the command)."""


def _register_all() -> None:
    from clipheads.cli import captions_cmd, demo_cmd, eval_cmd, explain_cmd, models_cmd, search_cmd, world_cmd  # noqa: I001,E501
    from clipheads.cli import bake_cmd, finetune_cmd
    from clipheads.cli import atlas_cmd, maps_cmd, patch_cmd

    for module in (demo_cmd, models_cmd, bake_cmd, eval_cmd, search_cmd, finetune_cmd, explain_cmd, world_cmd,
                   captions_cmd, patch_cmd, maps_cmd, atlas_cmd):
        module.register(app)


_register_all()


def _quiet_libraries() -> None:
    """Keep the terminal for clipheads' own progress bars and tables."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs to the root logger
    logging.getLogger("clipheads").setLevel(logging.WARNING)  # but clipheads' own warnings reach the user


def _not_printed_by_the_cli(record: logging.LogRecord) -> bool:
    """Log records the CLI prints itself (marked ``extra={"cli_prints": True}``, e.g. a search's "nothing ablated"
    line, printed under its result table) are not printed again by the CLI's log handler."""
    return not getattr(record, "cli_prints", False)


def configure_logging() -> None:
    """Warnings of clipheads' own loggers (``clipheads.*``: retries, skipped images) on stderr; third-party
    libraries (open_clip, transformers, httpx) only at ERROR."""
    handler = logging.StreamHandler()
    handler.addFilter(_not_printed_by_the_cli)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])
    _quiet_libraries()
    logging.getLogger("clipheads").setLevel(logging.WARNING)


def main() -> None:
    configure_logging()
    try:
        code = app(standalone_mode=False)  # click's usage errors become one ``error:`` line below, as ours are
    except UsageError as exc:  # a bad option value, a missing input path, an unknown option or command
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `clipheads`: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx is not None else "clipheads"
        _fail(f"{exc.format_message()} (see '{where} --help')")
    except typer.Abort:  # Ctrl-C at a prompt
        typer.secho("aborted", err=True)
        sys.exit(1)
    except OutputError as exc:
        _fail(_rescue(exc))
    except ClipHeadsError as exc:
        _fail(str(exc))
    except OSError as exc:  # a write that bypasses files.py (library save_pretrained, torch.save ...)
        from clipheads.files import WRITE_ERRNOS, output_error

        if exc.errno not in WRITE_ERRNOS:
            raise
        _fail(str(output_error(exc, exc.filename or "?", action="file-system error at")))
    sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode ends: typer.Exit(code) or 0


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


def _rescue(exc: OutputError) -> str:
    """A result that could not be written is printed on standard output instead of being lost."""
    from clipheads.files import MAX_PAYLOAD

    if exc.payload is None:
        return str(exc)
    if len(exc.payload) > MAX_PAYLOAD:
        return f"{exc} (the unwritten JSON, {len(exc.payload)} characters, was too long to print)"
    sys.stdout.write(exc.payload)
    sys.stdout.flush()
    return f"{exc} (the JSON it would have held is printed on standard output)"
