"""`disco serve --config FILE`: deploy the server app and the scheduler onto an existing Ray cluster.

The Serve application and the (detached) scheduler actor outlive this command; run it again with a
changed config to update them in place (the scheduler keeps its budget state), and stop them with
`serve shutdown` / `ray stop`.
"""

from __future__ import annotations

import argparse

from disco.cluster.errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="deploy the server replicas and the scheduler actor onto a Ray cluster",
        description="Deploy the Ray Serve server app and the scheduler actor described by a "
        "testbed config onto an existing Ray cluster (`ray start --head`).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="testbed YAML config")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the config's ray.address, $RAY_ADDRESS, or 'auto')",
    )
    p.add_argument("--no-scheduler", action="store_true", help="deploy the server app only")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from disco.cluster.config import SERVER_API_KEY_ENV, ConfigError, load_config

    try:
        cfg = load_config(args.config)
        cfg.server.http.check_exposure(SERVER_API_KEY_ENV)  # a public proxy needs a key
    except ValueError as e:  # ConfigError included
        raise CliError(str(e)) from None
    if not args.no_scheduler:
        from disco.cluster.resolve import check_live_policy

        check_live_policy(cfg.scheduler.policy)  # before anything is deployed
    address = args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or "auto"

    from dataclasses import replace

    import ray

    from disco.cluster.runtime import check_capacity, deploy_server, server_url, start_serve
    from disco.cluster.scheduler_actor import start_scheduler

    try:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
    except ConnectionError as e:
        raise CliError(
            f"no Ray cluster at {address!r} ({e}); start one with `ray start --head` "
            "or pass --address"
        ) from None
    try:
        try:
            check_capacity(replace(cfg, fleet=replace(cfg.fleet, devices=0),
                                   agent=replace(cfg.agent, enabled=False)))  # fmt: skip
        except ConfigError as e:
            raise CliError(str(e)) from None
        port = start_serve(cfg.server)
        if not args.no_scheduler:
            start_scheduler(cfg.scheduler, fresh=False, detached=True)
        deploy_server(cfg.server)
        print(
            f"server: {server_url(cfg.server, port)}/v1/completions (model {cfg.server.model_name})"
        )
        if not args.no_scheduler:
            print(
                f"scheduler: actor {cfg.scheduler.actor_name!r} in namespace {cfg.ray.namespace!r}"
            )
    finally:
        ray.shutdown()  # disconnects this driver; the deployment and the actor stay up
    return 0
