"""Shared CLI plumbing: lazily imported subcommands and one-line errors for bad input."""

from __future__ import annotations

import errno
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
    """Run a click group; toolkit errors print one line (`error: <input>: <problem> (fix: ...)`).

    `standalone_mode=False` makes click *return* a command's exit status (`ctx.exit(1)`, `Exit(1)`)
    instead of raising SystemExit, so it is passed on here: a command that found problems must not exit 0.
    """
    try:
        rc = group.main(standalone_mode=False)
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
    except OSError as e:
        if e.errno not in OS_INPUT_ERRORS:
            raise
        click.echo(f"error: {os_error_text(e)}", err=True)
        sys.exit(2)
    if isinstance(rc, int) and not isinstance(rc, bool) and rc:
        sys.exit(rc)


# Operating-system errors that are the user's environment, not a bug: one line, no traceback.
OS_INPUT_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
}
OS_FIXES = {
    errno.ENOSPC: "free space (or write to another disk) and run the command again; builds resume",
    errno.EDQUOT: "free space (or write to another disk) and run the command again; builds resume",
    errno.ENOTDIR: "choose an output path whose parent folders are folders",
}


def os_error_text(e: OSError) -> str:
    """`<path>: <problem> (fix: ...)` for an OSError from the user's environment."""
    what = e.filename if e.filename is not None else "output"
    fix = OS_FIXES.get(e.errno, "check the path and its permissions")
    return f"{what}: {OS_INPUT_ERRORS.get(e.errno, e.strerror)} (fix: {fix})"
