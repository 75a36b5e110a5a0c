"""`disco serve --config FILE`: deploy the server app and the scheduler onto an existing Ray cluster.

The Serve application and the (detached) scheduler actor outlive this command. Run it again with a
changed config to update them in place: Serve redeploys the app, and the running scheduler actor
is reconfigured (policy, budget, regime, profiles...; its budget ledger carries over) and the keys
that changed are printed, old -> new. `disco status` shows them; `disco down` removes them.
"""

from __future__ import annotations

import argparse
from typing import Any

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

    from disco.cluster.ops import connect
    from disco.cluster.runtime import check_capacity, deploy_server, server_url, start_serve

    connect(address, cfg.ray.namespace)  # one line and exit 2 when there is no cluster
    try:
        try:
            check_capacity(replace(cfg, fleet=replace(cfg.fleet, devices=0),
                                   agent=replace(cfg.agent, enabled=False)))  # fmt: skip
        except ConfigError as e:
            raise CliError(str(e)) from None
        port = start_serve(cfg.server)
        lines = []
        if not args.no_scheduler:
            lines = apply_scheduler(cfg.scheduler, cfg.ray.namespace)
        deploy_server(cfg.server)
        print(
            f"server: {server_url(cfg.server, port)}/v1/completions (model {cfg.server.model_name})"
        )
        for line in lines:
            print(line)
    finally:
        ray.shutdown()  # disconnects this driver; the deployment and the actor stay up
    return 0


def apply_scheduler(cfg: Any, namespace: str) -> list[str]:
    """Create the detached scheduler actor, or reconfigure the running one with ``cfg``; returns
    the lines that say which (and, for a running one, every key that changed: old -> new)."""
    import ray

    from disco.cluster.config import to_dict
    from disco.cluster.scheduler_actor import start_scheduler

    try:
        ray.get_actor(cfg.actor_name, namespace=namespace)
        existed = True
    except ValueError:
        existed = False
    actor = start_scheduler(cfg, fresh=False, detached=True)
    # Also for a new actor: one restored from a checkpoint (GCS outlives actors) comes back
    # with the config it was checkpointed with, not this one.
    res = ray.get(actor.reconfigure.remote(to_dict(cfg)))
    head = f"scheduler: actor {cfg.actor_name!r} in namespace {namespace!r}"
    changed, kept, version = res["changed"], res["kept"], res["version"]
    if not existed:
        what = "restored from its checkpoint and reconfigured" if changed else "created"
        lines = [f"{head}: {what} (policy {cfg.policy}, regime {cfg.regime}, budget "
                 f"{cfg.budget:g}; config version {version})"]  # fmt: skip
    elif changed:
        lines = [f"{head}: updated in place (config version {version}):"]
    else:
        lines = [f"{head}: unchanged (config version {version})"]
    lines += [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())]
    lines += [
        f"  {k}: {old!r} kept (asked {new!r}): fixed when the actor was created; "
        "`disco down` then `disco serve` to change it"
        for k, (old, new) in sorted(kept.items())
    ]
    return lines
