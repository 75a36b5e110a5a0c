"""`disco bench NAME [ARGS...]`: run a benchmark script from the checkout's bench/ folder.

Benchmarks live as stand-alone scripts (`bench/bench_<name>.py`) so each can also be run with plain
`python bench/bench_<name>.py`; this command finds and runs them with the same interpreter.
`disco bench list` names each with the first paragraph of its docstring (read, not imported: a
benchmark's imports may be heavy).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

from disco.cluster.errors import CliError


def bench_dir() -> Path:
    # cluster/commands/bench.py -> repository root (editable install or source checkout).
    return Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    d = bench_dir()
    return sorted(p.stem.removeprefix("bench_") for p in d.glob("bench_*.py")) if d.is_dir() else []


def describe(name: str) -> str:
    """The first paragraph of ``bench_<name>.py``'s docstring, on one line."""
    path = bench_dir() / f"bench_{name}.py"
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    except (OSError, SyntaxError, UnicodeDecodeError):
        doc = None
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split()) or "(no description)"


def listing(names: list[str]) -> str:
    width = max(len(n) for n in names)
    return "\n".join(f"{n:<{width}}  {describe(n)}" for n in names)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (bench/bench_NAME.py); `disco bench list` lists them",
        description="Run a benchmark script from bench/. Extra arguments go to the script.",
    )
    p.add_argument("name", help="benchmark name, or 'list'")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = available()
    if not names:
        raise CliError(f"no benchmarks found under {bench_dir()} (run from a source checkout)")
    if args.name == "list":
        print(listing(names))
        return 0
    if args.name not in names:
        raise CliError(
            f"unknown benchmark {args.name!r} (known: {', '.join(names)}; `disco bench list` "
            "describes them)"
        )
    script = bench_dir() / f"bench_{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.args])
