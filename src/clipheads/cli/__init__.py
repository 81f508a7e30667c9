"""The ``clipheads`` command line: a thin layer that parses options and calls the library.

Each concern registers its commands from its own module (``register(app)``).
"""

from __future__ import annotations

import logging
import sys

import typer

from clipheads.errors import ClipHeadsError

app = typer.Typer(
    name="clipheads",
    help=("Find the attention heads of CLIP's image encoder that hurt, ablate them at virtually no cost, and "
          "explain what each head does. Heads are written L{layer}.H{head}, 0-based. Every command uses the "
          "small CLIP bundled with clipheads unless you give --model (a Hugging Face id or folder, or "
          "open_clip:ARCH[/TAG])."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register_all() -> None:
    from clipheads.cli import captions_cmd, demo_cmd, eval_cmd, explain_cmd, models_cmd, search_cmd, world_cmd  # noqa: I001,E501
    from clipheads.cli import finetune_cmd

    for module in (demo_cmd, models_cmd, eval_cmd, search_cmd, finetune_cmd, explain_cmd, world_cmd, captions_cmd):
        module.register(app)


_register_all()


def _quiet_libraries() -> None:
    """Keep the terminal for clipheads' own progress bars and tables."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs to the root logger
    logging.getLogger("clipheads").setLevel(logging.WARNING)  # but clipheads' own warnings reach the user


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        app()
    except ClipHeadsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
