"""``disco.cluster.serve_llm.llm_config``: the Ray Serve LLM entry it writes, and the shipped
``cluster/deploy/serve-llm.yaml`` (no Ray needed; both are checked against
``ray.serve.llm.LLMConfig`` where that imports). The app itself, end to end:
tests/cluster/test_serve_llm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from disco.cluster.serve_llm import llm_config

SERVE_LLM_YAML = Path(__file__).resolve().parents[2] / "cluster" / "deploy" / "serve-llm.yaml"


def _shipped_entry() -> dict:
    [app] = yaml.safe_load(SERVE_LLM_YAML.read_text())["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    [entry] = app["args"]["llm_configs"]
    return entry


def test_stream_batching_is_off_and_the_model_is_named():
    cfg = llm_config("/models/smollm2-hf", model_id="smollm2")
    assert cfg["experimental_configs"] == {"stream_batching_interval_ms": 0}
    assert cfg["model_loading_config"] == {
        "model_id": "smollm2",
        "model_source": "/models/smollm2-hf",
    }
    assert cfg["deployment_config"] == {"num_replicas": 1}
    assert "accelerator_config" not in cfg  # Ray Serve LLM's default: GPUs


def test_cpu_autoscaling_and_extra_fields():
    cfg = llm_config(
        "m", accelerator="cpu", autoscaling={"min_replicas": 1, "max_replicas": 4}, num_cpus=0.1,
        engine_kwargs={"max_model_len": 1024}, runtime_env={"env_vars": {"A": "1"}},
    )  # fmt: skip
    assert cfg["accelerator_config"] == {"kind": "cpu"}
    assert cfg["deployment_config"] == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
        "ray_actor_options": {"num_cpus": 0.1},
    }
    assert cfg["engine_kwargs"] == {"max_model_len": 1024}
    assert cfg["runtime_env"] == {"env_vars": {"A": "1"}}


def test_the_shipped_serve_config_is_what_llm_config_writes():
    entry = _shipped_entry()
    assert entry["experimental_configs"] == {"stream_batching_interval_ms": 0}
    assert entry == llm_config(
        "Qwen/Qwen2.5-0.5B-Instruct", autoscaling={"min_replicas": 1, "max_replicas": 4},
        engine_kwargs={"max_model_len": 4096, "gpu_memory_utilization": 0.85},
    )  # fmt: skip


@pytest.mark.parametrize("bad", [{"accelerator": "tpu"}, {"stream_batching_interval_ms": -1}])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        llm_config("m", **bad)


@pytest.mark.vllm_cpu  # .ci/vllm runs it where ray.serve.llm imports
def test_ray_serve_llm_accepts_the_entry():
    try:
        from ray.serve.llm import LLMConfig
    except ImportError as e:  # ray[llm], or pyarrow beside vllm-cpu (.ci/install-vllm)
        pytest.skip(f"ray.serve.llm does not import: {e}")
    cfg = LLMConfig(**llm_config("/models/x", model_id="x", accelerator="cpu", num_cpus=0.1))
    assert cfg.model_id == "x"
    assert cfg.experimental_configs["stream_batching_interval_ms"] == 0
    shipped = LLMConfig(**_shipped_entry())  # cluster/deploy/serve-llm.yaml
    assert shipped.model_id == "disco-server"
    assert shipped.experimental_configs["stream_batching_interval_ms"] == 0
