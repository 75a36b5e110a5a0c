"""The `disco` console command: one parser, one module per subcommand (lazy-imported).

Each module in ``disco.cluster.commands`` exposes ``register(subparsers)`` (cheap: argparse only)
and a ``run(args) -> int``. Heavy imports (Ray, llama.cpp, Locust) happen inside ``run`` so that
``disco --help`` and ``disco sim`` stay fast and never start Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from disco.cluster.errors import CliError
from disco.cluster.resolve import OfflinePolicyError
from disco.scheduler.endpoint import InvalidRequestError
from disco.scheduler.registry import UnknownNameError

# subcommand -> module under disco.cluster.commands
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "sim": "sim",
    "reproduce": "reproduce",
    "serve": "serve",
    "status": "status",
    "down": "down",
    "agent": "agent",
    "load": "load",
    "profile": "profile",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disco",
        description="DiSCo testbed: device-server collaborative LLM text streaming on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS.values():
        # No try: a subcommand that fails to import is a broken install, and skipping it would
        # only turn that into a confusing "invalid choice" later.
        importlib.import_module(f"disco.cluster.commands.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in result files
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (CliError, UnknownNameError, InvalidRequestError, OfflinePolicyError) as e:
        print(f"disco {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"disco {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
