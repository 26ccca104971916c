"""`cmsrd`: build datasets (world, map, plan, build, sample, validate, info)."""

from __future__ import annotations

import click

from .clitools import LazyGroup, run_cli

COMMANDS = {
    "world": "cmsrd.world.cli:world",
    "map": "cmsrd.render:map_command",
    "plan": "cmsrd.pipeline_cli:plan_command",
    "build": "cmsrd.pipeline_cli:build_command",
    "sample": "cmsrd.pipeline_cli:sample_command",
    "validate": "cmsrd.pipeline_cli:validate_command",
    "info": "cmsrd.pipeline_cli:info_command",
}


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(package_name="cmsrd")
def cli() -> None:
    """Build CMSRD-style LR-Map-HR super-resolution datasets."""


def main() -> None:
    run_cli(cli)


if __name__ == "__main__":  # `python -m cmsrd.cli` where the package is on PYTHONPATH but not installed
    main()
