"""`disco agent --server URL --model PATH`: a real device agent for an edge box.

It serves the OpenAI-compatible API of ``disco.device_agents.agent_http`` (127.0.0.1 unless told
otherwise; another address needs an API key), runs the device model with llama.cpp, streams from
the server at URL, and takes its plans from the cluster's scheduler actor (``--scheduler ADDRESS``),
from a local policy (``--policy NAME``), or races both endpoints on every request (neither).
"""

from __future__ import annotations

import argparse


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
        "--model", default=None, help="GGUF path or bundled model name (default: gemma3-270m)"
    )
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context window")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument(
        "--scheduler", metavar="ADDRESS", help="Ray address of the cluster's scheduler actor"
    )
    plan.add_argument("--policy", help="a local policy instead of the cluster's scheduler")
    p.add_argument("--scheduler-name", default="disco-scheduler", help="scheduler actor name")
    p.add_argument("--namespace", default="disco", help="Ray namespace of the scheduler actor")
    p.add_argument("--regime", choices=("server", "device"), default="server")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--server-profile", default="gpt-4o-mini")
    p.add_argument("--device-profile", default="xiaomi14-qwen0.5b")
    p.add_argument("--device-id", default="agent-0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="required on non-loopback hosts (or env)")
    p.set_defaults(run=run)


def _planner(args: argparse.Namespace, sp, dp):  # noqa: ANN001, ANN202 - heavy types, lazy
    from disco.cluster.errors import CliError
    from disco.device_agents.local_planner import LocalPlanner, StaticPlanner

    if args.scheduler:
        import ray

        from disco.cluster.planner_client import ActorPlanner

        try:
            ray.init(address=args.scheduler, namespace=args.namespace, log_to_driver=False)
            actor = ray.get_actor(args.scheduler_name, namespace=args.namespace)
        except (ConnectionError, ValueError) as e:
            raise CliError(f"cannot reach the scheduler at {args.scheduler!r}: {e}") from None
        return ActorPlanner(actor)
    if args.policy:
        from disco.cluster.resolve import build_live_policy
        from disco.scheduler.policies.base import PolicyConfig
        from disco.scheduler.types import Regime

        try:
            pcfg = PolicyConfig(regime=Regime(args.regime), budget=args.budget)
        except ValueError as e:
            raise CliError(str(e)) from None
        return LocalPlanner(build_live_policy(args.policy, pcfg, sp, dp))
    return StaticPlanner()


def run(args: argparse.Namespace) -> int:
    import asyncio

    from disco.cluster.device_actors import build_agent, profiles
    from disco.cluster.errors import CliError
    from disco.cluster.resolve import build_engine
    from disco.device_agents.agent_http import HttpConfig, resolve_api_key, serve
    from disco.device_agents.models import ModelUnavailableError

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    if args.policy:
        from disco.cluster.resolve import check_live_policy

        check_live_policy(args.policy)  # before the model loads
    try:
        http = HttpConfig(host=args.host, port=args.port, api_key=resolve_api_key(args.api_key))
        sp, dp = profiles(args.server_profile, args.device_profile)
    except ValueError as e:
        raise CliError(str(e)) from None
    server_kw = {"model": args.server_model, "disco_extensions": not args.plain_openai}
    if args.server_api_key:
        server_kw["api_key"] = args.server_api_key
    device_kw = {"model": args.model, "n_ctx": args.n_ctx}
    if args.threads:
        device_kw["n_threads"] = args.threads
    try:
        device = build_engine("llamacpp", device_kw)
    except (ModelUnavailableError, ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    agent = build_agent(
        server=build_engine("openai", {"base_url": args.server, **server_kw}),
        device=device,
        planner=_planner(args, sp, dp),
        server_profile=sp,
        device_profile=dp,
        device_id=args.device_id,
    )
    print(
        f"disco agent: http://{args.host}:{args.port}/v1 (device {device.name}, "
        f"server {args.server})",
        flush=True,
    )
    asyncio.run(serve(agent, http))
    return 0
