"""`disco agent --server URL [--model PATH]`: a real device agent for an edge box.

It serves the OpenAI-compatible API of ``disco.device_agents.agent_http`` (127.0.0.1 unless told
otherwise; another address needs an API key), runs the device model with llama.cpp (default: the
small device model, SmolLM2-135M), streams from the server at URL, and plans each request with
one of:

- the cluster's scheduler actor (``--scheduler ADDRESS``): its policy, budget, regime and server
  profile are the scheduler's (passing ``--budget``/``--regime``/``--server-profile`` as well is
  refused); when it does not answer within ``--planner-timeout-ms`` the request is planned by a
  local copy of its policy (last known config) and counted in /metrics; the agent registers
  with the scheduler every few seconds, with its counters (``disco status`` lists it);
- a local policy (``--policy NAME``, default ``disco``) at ``--budget`` in ``--regime``, both
  printed at start.

``--engine emulated`` replays the device profile's speeds instead of running a model (placeholder
text: rehearsals and tests). On SIGTERM (or Ctrl-C) it stops accepting (new requests: 503 with
an OpenAI-style error), lets the streams in flight finish within ``--grace-s``, ends the rest
with an error event in their stream and exits 0 (130 after Ctrl-C); see
``disco.device_agents.drain``.
"""

from __future__ import annotations

import argparse
from typing import Any

# Used when neither --scheduler nor the flag is given (printed at start).
DEFAULT_POLICY, DEFAULT_REGIME, DEFAULT_BUDGET = "disco", "server", 0.5
DEFAULT_SERVER_PROFILE, DEFAULT_DEVICE_PROFILE = "gpt-4o-mini", "xiaomi14-qwen0.5b"
DEFAULT_GRACE_S = 10.0
HEARTBEAT_S = 5.0  # how often an agent with --scheduler registers (and sends its counters)
# What the scheduler decides: refused beside --scheduler (it would be silently ignored).
SCHEDULER_OWNS = (("--budget", "budget"), ("--regime", "regime"),
                  ("--server-profile", "server_profile"))  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent",
        help="run a device agent (llama.cpp + OpenAI API) against a server",
        description="Run a device agent: llama.cpp on this box, a server at URL, and an "
        "OpenAI-compatible API for users.",
    )
    p.add_argument("--server", required=True, metavar="URL", help="server base URL (OpenAI API)")
    p.add_argument("--server-model", default="disco-server", help="the server's model name")
    p.add_argument("--server-api-key", default=None, help="API key for the server")
    p.add_argument(
        "--plain-openai",
        action="store_true",
        help="the server is a plain OpenAI API (resume by prompt + prefix, no disco extensions)",
    )
    p.add_argument(
        "--model", default=None, help="GGUF path or bundled model name (default: smollm2-135m)"
    )
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context window")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument(
        "--scheduler", metavar="ADDRESS", help="Ray address of the cluster's scheduler actor"
    )
    plan.add_argument(
        "--policy", help=f"a local policy instead of a scheduler (default: {DEFAULT_POLICY})"
    )
    p.add_argument("--scheduler-name", default="disco-scheduler", help="scheduler actor name")
    p.add_argument("--namespace", default="disco", help="Ray namespace of the scheduler actor")
    p.add_argument(
        "--planner-timeout-ms",
        type=float,
        default=100.0,
        help="plan locally when the scheduler has not answered by then (default: 100)",
    )
    p.add_argument(
        "--first-token-timeout-ms", type=float, default=60_000.0,
        help="an endpoint with no first token this long after it started (the device: after "
        "it got its slot) has failed and the other takes over (default: 60000)",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=int, default=2,
        help="once both endpoints have failed, start the one that failed first again, up to "
        "this many times per request (default: 2; 0: fail when each failed once)",
    )  # fmt: skip
    p.add_argument(
        "--max-device-queue", type=int, default=16,
        help="requests that may wait for the device (it runs one at a time); past it, one the "
        "plan gives to the device alone is refused with HTTP 429 (default: 16; -1: no limit)",
    )  # fmt: skip
    p.add_argument(
        "--regime", choices=("server", "device"), default=None,
        help=f"local policy only (default: {DEFAULT_REGIME})",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=float, default=None, help=f"local policy only (default: {DEFAULT_BUDGET})"
    )
    p.add_argument(
        "--server-profile", default=None,
        help=f"local policy only (default: {DEFAULT_SERVER_PROFILE}; a scheduler uses its own)",
    )  # fmt: skip
    p.add_argument(
        "--device-profile", default=None,
        help=f"this device's profile (default: the scheduler's, else {DEFAULT_DEVICE_PROFILE})",
    )  # fmt: skip
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="info (default): one line per request (id, plan, winner, migration, TTFT) and "
        "every refusal or fallback; warning: problems only",
    )  # fmt: skip
    p.add_argument("--device-id", default="agent-0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="required on non-loopback hosts (or env)")
    p.add_argument(
        "--engine", choices=("llamacpp", "emulated"), default="llamacpp",
        help="the device engine: llama.cpp on --model, or an emulation of --device-profile's "
        "speeds (placeholder text; tests, rehearsals)",
    )  # fmt: skip
    p.add_argument(
        "--grace-s", type=float, default=DEFAULT_GRACE_S,
        help="on SIGTERM (or Ctrl-C): refuse new requests (503) and give the streams in flight "
        f"this long to finish; the rest end with an error event (default: {DEFAULT_GRACE_S:g})",
    )  # fmt: skip
    p.set_defaults(run=run)


def check_plan_flags(args: argparse.Namespace) -> None:
    """Refuse flags that a scheduler would silently override (one line, exit 2)."""
    from disco.cluster.errors import CliError

    if not args.scheduler:
        return
    given = [flag for flag, dest in SCHEDULER_OWNS if getattr(args, dest) is not None]
    if given:
        raise CliError(
            f"{', '.join(given)} cannot be combined with --scheduler: the scheduler's own config "
            "decides them (change it with `disco serve`), or plan locally with --policy"
        )


def local_defaults(args: argparse.Namespace) -> str:
    """Fill the local policy's unset flags with the defaults; returns the line printed at start
    (so a user sees which policy and budget an agent without --scheduler runs)."""
    args.policy = args.policy or DEFAULT_POLICY
    args.regime = args.regime or DEFAULT_REGIME
    args.budget = DEFAULT_BUDGET if args.budget is None else args.budget
    args.server_profile = args.server_profile or DEFAULT_SERVER_PROFILE
    args.device_profile = args.device_profile or DEFAULT_DEVICE_PROFILE
    return f"local policy {args.policy} (regime {args.regime}, budget {args.budget:g})"


def _connect(args: argparse.Namespace) -> Any:
    """The scheduler actor's client, its fallback loaded with the actor's current config."""
    import ray

    from disco.cluster.errors import CliError
    from disco.cluster.planner_client import ActorPlanner

    try:
        ray.init(address=args.scheduler, namespace=args.namespace, log_to_driver=False)
        actor = ray.get_actor(args.scheduler_name, namespace=args.namespace)
        return ActorPlanner.connect(actor)
    except (ConnectionError, ValueError, ray.exceptions.GetTimeoutError) as e:
        raise CliError(f"cannot reach the scheduler at {args.scheduler!r}: {e}") from None


def local_planner(args: argparse.Namespace, sp: Any, dp: Any) -> Any:
    from disco.cluster.errors import CliError
    from disco.cluster.resolve import build_live_policy
    from disco.device_agents.local_planner import LocalPlanner
    from disco.scheduler.policies.base import PolicyConfig
    from disco.scheduler.types import Regime

    try:
        pcfg = PolicyConfig(regime=Regime(args.regime), budget=args.budget)
    except ValueError as e:
        raise CliError(str(e)) from None
    return LocalPlanner(build_live_policy(args.policy, pcfg, sp, dp))


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    from dataclasses import replace

    from disco.cluster.device_actors import build_agent, build_device_engine, profiles
    from disco.cluster.errors import CliError
    from disco.cluster.resolve import build_engine, check_live_policy
    from disco.device_agents.agent_http import resolve_api_key
    from disco.device_agents.config import AgentConfig, HttpConfig
    from disco.device_agents.models import ModelUnavailableError

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    check_plan_flags(args)
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    if args.grace_s < 0:
        raise CliError(f"--grace-s must be >= 0, got {args.grace_s}")
    device_kw: dict[str, Any] = {"n_ctx": args.n_ctx}
    if args.threads:
        device_kw["n_threads"] = args.threads
    try:
        http = HttpConfig(host=args.host, port=args.port, api_key=resolve_api_key(args.api_key))
        http.check_exposure()
        cfg = AgentConfig(
            device_id=args.device_id, model=args.model, engine=args.engine,
            engine_kwargs=device_kw, device_profile=args.device_profile, http=http,
            planner_timeout_ms=args.planner_timeout_ms,
            first_token_timeout_ms=args.first_token_timeout_ms,
            max_device_queue=None if args.max_device_queue < 0 else args.max_device_queue,
            retries=args.retries,
        )  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.scheduler:
        planner = _connect(args)
        actor = planner.actor
        sched = planner.fallback.config or {}
        if sched.get("planning") == "snapshot":  # plan here from snapshots (issue 11)
            from disco.cluster.snapshot_client import snapshot_planner

            planner = snapshot_planner(planner.actor, f"agent.{cfg.device_id}", sched)
        server_profile = sched.get("server_profile", DEFAULT_SERVER_PROFILE)
        device_profile = args.device_profile or sched.get("device_profile", DEFAULT_DEVICE_PROFILE)
        planning = f"scheduler {args.scheduler_name!r} at {args.scheduler}"
        if sched:
            tail = (f"planned here from its snapshots, synced every {sched.get('sync_s', 0.5):g} s"
                    if sched.get("planning") == "snapshot"
                    else f"local fallback after {cfg.planner_timeout_ms:g} ms")
            planning += (f" ({sched['policy']}, regime {sched['regime']}, budget "
                         f"{sched['budget']:g}; {tail})")  # fmt: skip
    else:
        planning = local_defaults(args)
        server_profile, device_profile = args.server_profile, args.device_profile
        check_live_policy(args.policy)  # before the model loads
    try:
        sp, dp = profiles(server_profile, device_profile)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not args.scheduler:
        planner = local_planner(args, sp, dp)
    server_kw = {"model": args.server_model, "disco_extensions": not args.plain_openai}
    if args.server_api_key:
        server_kw["api_key"] = args.server_api_key
    if args.engine == "emulated":  # the device profile's speeds, replayed
        cfg = replace(cfg, engine_kwargs={"profile": device_profile, "kind": "device"})
    try:
        device = build_device_engine(cfg)
    except (ModelUnavailableError, ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    agent = build_agent(
        server=build_engine("openai", {"base_url": args.server, **server_kw}),
        device=device,
        planner=planner,
        server_profile=sp,
        device_profile=dp,
        config=cfg,
    )
    print(
        f"disco agent: http://{args.host}:{args.port}/v1 (device {device.name}, "
        f"server {args.server}); planning: {planning}",
        flush=True,
    )
    sig = asyncio.run(_serve(agent, http, args, actor if args.scheduler else None))
    return 130 if sig == signal.SIGINT else 0


async def _serve(agent: Any, http: Any, args: argparse.Namespace, actor: Any) -> int:
    """Serve until SIGTERM/SIGINT, then drain (``disco.device_agents.drain``); returns the
    signal. With a scheduler, register with it every HEARTBEAT_S (``disco status`` lists this
    agent and its counters) and unregister at the end."""
    import asyncio
    import contextlib

    from disco.device_agents.agent_http import create_app
    from disco.device_agents.drain import Drain, serve_until_signalled

    drain = Drain()
    beat = None
    if actor is not None:
        beat = asyncio.get_running_loop().create_task(_heartbeat(actor, agent, http))
    try:
        app = create_app(agent, http, drain=drain)
        return await serve_until_signalled(app, http.host, http.port, drain, args.grace_s,
                                           say=lambda m: print(m, flush=True))  # fmt: skip
    finally:
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(actor.unregister.remote(agent.config.device_id), 2.0)
        await agent.drain()  # the planner reports still in flight
        close = getattr(agent.planner, "close", None)
        if close is not None:  # a snapshot holder sends its last batch (one bounded try)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(close(), 10.0)


async def _heartbeat(actor: Any, agent: Any, http: Any) -> None:
    import asyncio
    import contextlib
    import os
    import socket
    from dataclasses import asdict

    entry = {"id": agent.config.device_id, "kind": "agent", "devices": 1,
             "url": f"http://{http.host}:{http.port}", "host": socket.gethostname(),
             "pid": os.getpid(), "engine": agent.config.engine}  # fmt: skip
    while True:
        # A scheduler that is down or restarting: try again at the next beat.
        with contextlib.suppress(Exception):
            metrics = asdict(agent.metrics)
            await asyncio.wait_for(actor.register.remote(entry | {"metrics": metrics}), HEARTBEAT_S)
        await asyncio.sleep(HEARTBEAT_S)
