"""Every command a message, note or doc tells the user to run parses with the real CLI, so a hint cannot rot.

Commands are the backticked `cmsrd ...` / `cmsrd-bench ...` spans of the user-facing text (source strings,
the weights manifest's notes) that carry options. Each is parsed by click as printed (placeholders such as
DATA or {key} stand for values; `...` elides the rest); a missing required option (unless elided), an
unknown option or subcommand fails the test.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from benchmark.cli import cli as bench_main
from cmsrd.cli import cli as cmsrd_main

ROOT = Path(__file__).resolve().parents[1]
_SPAN = re.compile(r"`((?:cmsrd|cmsrd-bench) [^`]*--[^`]*)`")  # an invocation: it has options


def _printed_strings(path: Path) -> list[str]:
    """String literals a module can print (docstrings excluded); f-string fields become `1` (any option takes it)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "1" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append(node.value)
    return out


def _help_texts() -> list[tuple[str, str]]:
    """Every command's --help text (its examples are hints too)."""
    out = []
    todo = [(cmsrd_main, "cmsrd"), (bench_main, "cmsrd-bench")]
    while todo:
        cmd, path = todo.pop()
        out.append((cmd.help or "", f"`{path} --help`"))
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            todo += [(cmd.get_command(ctx, n), f"{path} {n}") for n in cmd.list_commands(ctx)]
    return out


def _commands() -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    for pkg in ("cmsrd", "baselines", "benchmark"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            texts += [(s, str(path.relative_to(ROOT))) for s in _printed_strings(path)]
    notes = yaml.safe_load((ROOT / "manifests" / "weights.yaml").read_text())
    texts += [(str(e.get("note", "")), f"manifests/weights.yaml:{k}") for k, e in notes["weights"].items()]
    texts += _help_texts()
    found: dict[str, str] = {}
    for text, where in texts:
        for m in _SPAN.finditer(" ".join(text.split())):
            found.setdefault(m.group(1), where)
    return sorted(found.items())


def _args(cmd: str) -> list[str]:
    words = [w for w in shlex.split(cmd) if w != "\\"]
    if "..." in words:  # `...` means "and the rest": check what comes before it
        words = words[: words.index("...")]
    return words


def parse(cmd: str) -> None:
    """Resolve the subcommands and parse the options as click would; raise click.UsageError if it would fail."""
    elided = "..." in cmd.split()
    prog, *args = _args(cmd)
    command: click.Command = cmsrd_main if prog == "cmsrd" else bench_main
    ctx = command.make_context(prog, list(args), resilient_parsing=elided)
    while isinstance(command, click.Group) and ctx.protected_args:
        _, sub, rest = command.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        command, ctx = sub, sub.make_context(sub.name, rest, ctx, resilient_parsing=elided)
    if elided:  # resilient parsing skips required checks but must still know every option given
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in opts]
        if unknown:
            raise click.NoSuchOption(unknown[0])


COMMANDS = _commands()


def test_hints_found():
    names = {c for c, _ in COMMANDS}
    assert any(c.startswith("cmsrd-bench train --method esrgan") for c in names)
    assert "cmsrd sample 18_139586_90683 --config demo-real --out out/one" in names  # --help examples too
    assert len(COMMANDS) > 10


@pytest.mark.parametrize("cmd,where", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_hint_parses(cmd: str, where: str):
    try:
        parse(cmd)
    except click.BadParameter as e:
        if "does not exist" not in e.format_message():  # examples name folders the user has built
            pytest.fail(f"{where}: `{cmd}` does not run as printed: {e.format_message()}")
    except click.UsageError as e:
        pytest.fail(f"{where}: `{cmd}` does not run as printed: {e.format_message()}")


def test_parse_rejects_the_old_hints():
    for bad in ("cmsrd-bench train sgdm+", "cmsrd-bench train swinir --scale 16", "cmsrd-bench nope"):
        with pytest.raises(click.UsageError):
            parse(bad)


def test_verify_says_why_an_unpublished_file_cannot_be_fetched(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    out = CliRunner().invoke(bench_main, ["weights", "verify", "esrgan_x16"]).output
    assert "(not downloadable: Not published by the authors" in out
    assert "from not published" not in out and "weights fetch" not in out
