"""`disco down [--address ADDR]`: remove what a testbed put on a Ray cluster; Ray stays up.

In this order: the fleet and agent actors the testbed started (asked to stop, then killed), the
scheduler actor and its budget checkpoint (so the next `disco serve` starts from an empty ledger),
the server app(s) (Serve applications running the ``DiscoServer`` deployment), and Serve itself
when no other application is left on it (its controller and HTTP proxy: the port is free again).
Standalone `disco agent` processes are not Ray's to stop: they are listed, and keep running (stop
them with SIGTERM). Says what it removed; run again, it says that nothing was running (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

STOP_TIMEOUT_S = 10.0  # a fleet or agent actor asked to stop gets this long before it is killed


def register(sub: argparse._SubParsersAction) -> None:
    from disco.cluster.ops import DEFAULT_NAMESPACE, DEFAULT_SCHEDULER

    p = sub.add_parser(
        "down",
        help="remove the testbed's server app, scheduler and device actors from a Ray cluster",
        description="Remove what `disco serve` (or Testbed.start) deployed: device actors, the "
        "scheduler actor and its checkpoint, the server app(s) and, when nothing else runs on "
        "it, Serve. The Ray cluster itself stays up (`ray stop` on each node stops it).",
    )
    p.add_argument(
        "--address", default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else 'auto': the cluster on this machine)",
    )  # fmt: skip
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the testbed's Ray namespace")
    p.add_argument("--scheduler-name", default=DEFAULT_SCHEDULER, help="the scheduler actor's name")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from disco.cluster import ops

    address = ops.connect(args.address, args.namespace)
    try:
        removed, left = take_down(args.namespace, args.scheduler_name)
    finally:
        ops.disconnect()
    where = f"namespace {args.namespace!r} at {address}"
    if removed:
        print(f"disco down: removed from {where}:")
        for what in removed:
            print(f"  {what}")
    else:
        print(f"disco down: nothing was running ({where})")
    for what in left:
        print(f"  still running (not Ray's to stop): {what}")
    return 0


def take_down(namespace: str, scheduler_name: str) -> tuple[list[str], list[str]]:
    """Remove the testbed; returns (what was removed, what is left running elsewhere)."""
    import ray

    from disco.cluster import ops
    from disco.cluster.device_actors import actor_prefix

    removed: list[str] = []
    left: list[str] = []
    scheduler = ops.get_actor(scheduler_name, namespace)
    registry: list[dict[str, Any]] = []
    if scheduler is not None:
        with contextlib.suppress(Exception):
            registry = ray.get(scheduler.status.remote(), timeout=ops.CALL_TIMEOUT_S)["devices"]

    prefix = actor_prefix(scheduler_name)
    for name in ops.device_actor_names(scheduler_name, namespace):
        handle = ops.get_actor(name, namespace)
        if handle is None:
            continue
        kind = "fleet" if name[len(prefix) :].startswith("fleet") else "agent"
        _stop(handle)
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
        removed.append(f"{kind} actor {name}")
    for e in registry:
        if e.get("kind") == "agent":  # a standalone `disco agent --scheduler` process
            where = e.get("url") or e.get("host") or "?"
            left.append(f"agent {e['id']} ({where}, pid {e.get('pid', '?')})")

    if scheduler is not None:
        with contextlib.suppress(Exception):
            ray.get(scheduler.forget.remote(), timeout=ops.CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(scheduler, no_restart=True)
        removed.append(f"scheduler actor {scheduler_name!r} and its budget checkpoint")
    elif _drop_gcs_checkpoint(scheduler_name):
        removed.append(f"the budget checkpoint of scheduler {scheduler_name!r}")

    removed += _remove_server_apps()
    return removed, left


def _stop(handle: Any) -> None:
    """Let a fleet or agent actor close its HTTP front and send its last reports."""
    import ray

    for method in ("stop_http", "stop", "close"):
        try:
            ref = getattr(handle, method).remote()
        except AttributeError:
            continue
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=STOP_TIMEOUT_S)
        return


def _drop_gcs_checkpoint(scheduler_name: str) -> bool:
    """A checkpoint left in Ray's GCS by a scheduler actor that is gone (killed by hand)."""
    from disco.cluster.scheduler_state import GcsStore

    store = GcsStore(scheduler_name)
    try:
        if store.load() is None:
            return False
        store.clear()
    except Exception:  # noqa: BLE001 - Ray's private KV moved: nothing to report
        return False
    return True


def _remove_server_apps() -> list[str]:
    from ray import serve

    from disco.cluster import ops

    removed = []
    for name in ops.server_apps():
        serve.delete(name)  # blocks until its replicas are gone
        removed.append(f"server app {name!r}")
    if removed:
        try:
            others = serve.status().applications
        except Exception:  # noqa: BLE001
            others = {"?": None}
        if not others:
            serve.shutdown()
            removed.append("Serve (its controller and HTTP proxy): no other app was left on it")
    return removed
