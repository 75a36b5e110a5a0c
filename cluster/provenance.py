"""What every result file records: the commit, package versions, machine and command line."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("disco-testbed", "numpy", "ray", "locust", "llama_cpp_python", "vllm")


def commit() -> str:
    """The checkout's short commit (with ``+dirty`` for uncommitted changes), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=root).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, cwd=root).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty.strip() else "")) if head else "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def provenance(args: Any = None, seed: int | None = None) -> dict[str, Any]:
    """The block every result file carries; ``args``: the CLI's namespace (its ``argv``)."""
    argv = getattr(args, "argv", None)
    return {
        "commit": commit(),
        "versions": versions(),
        "machine": machine(),
        "seed": seed if seed is not None else getattr(args, "seed", None),
        "command": shlex.join(["disco", *argv]) if argv is not None else None,
    }
