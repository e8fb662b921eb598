"""mkdocs hooks for lmselect's documentation site (``hooks:`` in mkdocs.yml).

- The CLI reference (``reference/cli.md``) is generated at build time from the argparse parsers of
  ``lmselect.cli`` (``build_parser()`` and every verb's own parser), so it cannot drift from the code.
- ``DESIGN.md`` (repository root) and the dated results files (``benchmarks/results/``) are added to the site as
  they are, without a copy in ``docs/``: DESIGN.md as ``design.md``, the results folder as ``results/`` (its
  README.md as the index, every dated file in the nav under it, newest first).

``render_cli()`` needs only lmselect (tests/test_docs.py calls it without mkdocs); mkdocs is imported inside the
hook functions.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
HELP_WIDTH = "100"  # argparse wraps help to $COLUMNS: fix it, so the page is the same on every machine

log = logging.getLogger("mkdocs.hooks.lmselect")


@contextmanager
def _columns(width: str) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def cli_verbs() -> list[str]:
    """Every subcommand ``lmselect.cli.build_parser()`` registers, in its order."""
    import argparse

    from lmselect.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # argparse has no public walk
    return [verb for s in subs for verb in s.choices]


def render_cli() -> str:
    """The CLI reference page: ``lmselect --help`` and every verb's ``--help``, as printed."""
    from lmselect.cli import build_parser, verb_parser

    with _columns(HELP_WIDTH):
        parts = [
            "# CLI reference\n",
            "Generated when the site is built, from the argparse parsers in `lmselect.cli` (`build_parser()` and each "
            "verb's own parser), so it is exactly what `lmselect VERB --help` prints. Config keys of a recipe are "
            "overridden with `--key.sub=value` on `run`, `compare`, `check` and `demo`.\n",
            "## `lmselect`\n",
            "```text\n" + build_parser().format_help().rstrip() + "\n```\n",
        ]
        for verb in cli_verbs():
            parts.append(f"## `lmselect {verb}`\n")
            parts.append("```text\n" + verb_parser(verb).format_help().rstrip() + "\n```\n")
    return "\n".join(parts)


def results_pages() -> list[str]:
    """The dated results files as site paths, newest first (their titles come from their first heading)."""
    names = [p.name for p in RESULTS.glob("*.md") if p.name != "README.md"]
    return [f"results/{n}" for n in sorted(names, reverse=True)]


def on_config(config: Any, **kwargs: Any) -> Any:
    """The results entry of the nav: its index, then every dated file, newest first."""

    def walk(items: list[Any]) -> list[Any]:
        out = []
        for entry in items:
            if isinstance(entry, dict):
                (title, value), = entry.items()
                if isinstance(value, list):
                    entry = {title: walk(value)}
                elif value == "results/index.md":
                    entry = {title: [value, *results_pages()]}
            out.append(entry)
        return out

    if config.get("nav"):
        config["nav"] = walk(config["nav"])
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "reference/cli.md", content=render_cli()))
    files.append(File.generated(config, "design.md", abs_src_path=str(ROOT / "DESIGN.md")))
    for path in sorted(RESULTS.iterdir()):
        if path.suffix not in (".md", ".png", ".svg"):
            continue
        name = "index.md" if path.name == "README.md" else path.name
        files.append(File.generated(config, f"results/{name}", abs_src_path=str(path)))
    return files
