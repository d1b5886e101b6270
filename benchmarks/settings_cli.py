"""Command lines from the benchmarks' settings dataclasses: one `--flag` per field, help from its docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCHMARKS, "results")  # the committed results (written with --results)
SCRATCH = os.path.join(BENCHMARKS, "out")  # every other run's output (git-ignored)


def default_out(*parts: str, results: bool) -> str:
    """A benchmark's default output path: benchmarks/out/<parts> (git-ignored), or benchmarks/results/<parts>, the
    committed results the READMEs quote, when the run asks for them (`--results`)."""
    return os.path.join(RESULTS if results else SCRATCH, *parts)


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (CleanRL's convention), for --help."""
    docs, body = {}, ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body[:-1], body[1:], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def dataclass_parser(
    cls: type, description: str, *, dashes: bool = False, skip: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """A parser with a flag per field of `cls` except `skip`: `--name` (or `--na-me` with `dashes`); booleans take
    `--name` / `--no-name`, lists take one or more values of their default's element type."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag, help_text = "--" + (f.name.replace("_", "-") if dashes else f.name), docs.get(f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", type=type(default[0]), default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    return parser
