"""Token engines behind the one :class:`~disco.scheduler.endpoint.Endpoint` protocol.

Importing this package registers the device-side engines in
:data:`disco.scheduler.endpoint.ENDPOINTS`:

- ``llamacpp``: llama.cpp through llama-cpp-python on a local GGUF (device or server kind);
- ``emulated``: replays a device or server latency profile with real sleeps; given a server
  preset (``preset=NAME``, or a ``profile`` that names one) it emulates a continuous-batching
  replica instead (:class:`~disco.device_agents.engines.batching.BatchingEndpoint`);
- ``openai``: any OpenAI-compatible SSE server (Ray Serve, ``vllm serve``, a commercial API),
  over ``/v1/completions`` or, with ``api="chat"``, ``/v1/chat/completions``.

(``vllm`` lives in ``disco.cluster.engines``: device agents never import the cluster.)
Each factory imports its engine module lazily, so heavy or optional dependencies (llama_cpp,
httpx) are only needed by the engine actually built.
"""

from __future__ import annotations

from typing import Any

from disco.scheduler.endpoint import ENDPOINTS, Endpoint


def _llamacpp(**config: Any) -> Endpoint:
    from .llamacpp import LlamaCppEndpoint

    return LlamaCppEndpoint(**config)


def _emulated(**config: Any) -> Endpoint:
    from disco.scheduler.batching import ServerPreset
    from disco.scheduler.presets import is_preset

    preset = config.pop("preset", None)
    profile = config.get("profile")
    if preset is None and (
        isinstance(profile, ServerPreset) or (isinstance(profile, str) and is_preset(profile))
    ):
        preset = config.pop("profile")
    if preset is not None:
        if "profile" in config:
            raise ValueError("emulated: give either a server preset or a profile, not both")
        from .batching import BatchingEndpoint

        return BatchingEndpoint(preset, **config)
    from .emulated import EmulatedEndpoint

    return EmulatedEndpoint(**config)


def _openai(**config: Any) -> Endpoint:
    from .openai_http import OpenAIEndpoint

    return OpenAIEndpoint(**config)


ENDPOINTS.add("llamacpp", _llamacpp)
ENDPOINTS.add("emulated", _emulated)
ENDPOINTS.add("openai", _openai)


def create_endpoint(name: str, **config: Any) -> Endpoint:
    """Build a registered engine by name (raises UnknownNameError listing the known names)."""
    return ENDPOINTS.get(name)(**config)


__all__ = ["create_endpoint"]
