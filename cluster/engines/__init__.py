"""Server-side engines that only the cluster layer hosts (GPU), added to the shared registry.

Importing this package registers ``vllm`` in :data:`disco.scheduler.endpoint.ENDPOINTS` next to
the device-side engines (``llamacpp``, ``emulated``, ``openai``), which it imports too, so the
cluster sees every engine by name. ``vllm`` is registered even where vLLM is not installed:
building it then fails with :class:`VLLMUnavailableError` saying what to install, which is
clearer than an "unknown engine" error.
"""

from __future__ import annotations

from typing import Any

import disco.device_agents.engines  # noqa: F401 - registers the device-side engines
from disco.scheduler.endpoint import ENDPOINTS, Endpoint


def _vllm(**config: Any) -> Endpoint:
    from .vllm_engine import VLLMEndpoint

    return VLLMEndpoint(**config)


ENDPOINTS.add("vllm", _vllm)
