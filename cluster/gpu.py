"""Is there a CUDA GPU here? Asked of ``nvidia-smi``; no heavy imports (the CLI and pytest's
collection hook both use it)."""

from __future__ import annotations

import shutil
import subprocess


def has_cuda_gpu() -> bool:
    """True if ``nvidia-smi -L`` lists at least one GPU (within 10 s)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


__all__ = ["has_cuda_gpu"]
