"""`cmsrd-bench`: list methods, train, run benchmarks, manage weights, render reports."""

from __future__ import annotations

import click

from cmsrd.clitools import LazyGroup, run_cli

COMMANDS = {
    "list": "baselines.cli:list_command",
    "train": "benchmark.train_cli:train_command",
    "run": "benchmark.runner_cli:run_command",
    "report": "benchmark.report:report_command",
    "weights": "benchmark.weights_cli:weights",
    "train-downstream": "benchmark.downstream.cli:train_downstream_command",
    "downstream": "benchmark.downstream.cli:downstream",
}


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(package_name="cmsrd")
def cli() -> None:
    """Run SR methods from one registry and benchmark them."""


def main() -> None:
    run_cli(cli)


if __name__ == "__main__":  # `python -m benchmark.cli` where the package is on PYTHONPATH but not installed
    main()
