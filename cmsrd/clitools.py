"""Shared CLI plumbing: lazily imported subcommands and one-line errors for bad input."""

from __future__ import annotations

import importlib
import sys

import click

from .errors import CMSRDError


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules and are imported only when used,
    so `cmsrd --help` does not pay for torch or the geo stack."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, _, attr = self.lazy[name].partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:  # this installation lacks the command's module
                    return None
                raise
            return getattr(mod, attr)
        return super().get_command(ctx, name)


def run_cli(group: click.Group) -> None:
    """Run a click group; toolkit errors print one line (`error: <input>: <problem> (fix: ...)`)."""
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CMSRDError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
