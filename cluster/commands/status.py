"""`disco status [--address ADDR] [--json]`: what a deployed testbed is doing, from a shell.

Connects to the running Ray cluster (never starts one) and reads, without changing anything:
- the scheduler actor (``SchedulerActor.status``): policy, regime, budget (target b, the share
  spent since its ledger began and over the policy's sliding window), config version, plans/s
  (the plan counter sampled twice, ``--sample-s`` apart, on the actor's clock);
- the server app(s) (Serve's status API: deployments, replicas by state) and each replica's load
  (``DiscoServer.engine_state``: streams open, a batching replica's queue/running/KV);
- the device side: the fleets and agent actors the testbed started (found by name, their live
  counters) and the standalone ``disco agent --scheduler`` processes registered with the
  scheduler (their counters as of their last heartbeat); planner fallbacks summed over them, and
  any queue/saturation counters the agents report, shown as they come.

No cluster, or no scheduler actor of that name in that namespace: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from disco.cluster.errors import CliError

# Metric fields that say how loaded a device is, whatever the agent's version names them: any
# counter whose name holds one of these words is shown when it is not zero.
LOAD_WORDS = ("saturat", "queue", "waiting", "refused", "running")
DEFAULT_SAMPLE_S = 1.0


def register(sub: argparse._SubParsersAction) -> None:
    from disco.cluster.ops import DEFAULT_NAMESPACE, DEFAULT_SCHEDULER

    p = sub.add_parser(
        "status",
        help="show the scheduler, server replicas and devices of a deployed testbed",
        description="Show what a testbed deployed with `disco serve` (or Testbed.start) on a "
        "Ray cluster is doing: the scheduler's policy and budget, plans/s, the server app's "
        "replicas and their queues, registered devices and fleets.",
    )
    p.add_argument(
        "--address", default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else 'auto': the cluster on this machine)",
    )  # fmt: skip
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the testbed's Ray namespace")
    p.add_argument("--scheduler-name", default=DEFAULT_SCHEDULER, help="the scheduler actor's name")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument(
        "--sample-s", type=float, default=DEFAULT_SAMPLE_S,
        help=f"seconds between the two samples that give plans/s (default {DEFAULT_SAMPLE_S:g}; "
        "0: no rate)",
    )  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from disco.cluster import ops

    if args.sample_s < 0:
        raise CliError(f"--sample-s must be >= 0, got {args.sample_s}")
    address = ops.connect(args.address, args.namespace)
    try:
        report = collect(args.namespace, args.scheduler_name, args.sample_s)
    finally:
        ops.disconnect()
    report["address"] = address
    if report["scheduler"] is None:
        if report.get("scheduler_error"):
            raise CliError(
                f"scheduler actor {args.scheduler_name!r} in namespace {args.namespace!r}: "
                f"{report['scheduler_error']} (an actor of an older disco lacks it: `disco down`, "
                "then `disco serve`)"
            )
        apps = ", ".join(repr(a["name"]) for a in report["server_apps"])
        raise CliError(
            f"no scheduler actor {args.scheduler_name!r} in namespace {args.namespace!r} at "
            f"{address!r}" + (f" (server app {apps} is deployed)" if apps else "")
            + ": deploy one with `disco serve --config FILE`, or pass --namespace/--scheduler-name"
        )  # fmt: skip
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(render(report))
    return 0


# ---- collecting ---------------------------------------------------------------------------------


def collect(namespace: str, scheduler_name: str, sample_s: float) -> dict[str, Any]:
    """Everything ``disco status`` shows, as plain data (its ``--json``)."""
    from disco.cluster import ops

    t0 = time.monotonic()
    out: dict[str, Any] = {"namespace": namespace, "scheduler": None, "server_apps": [],
                           "devices": [], "planner_fallbacks": 0}  # fmt: skip
    actor = ops.get_actor(scheduler_name, namespace)
    first = _call(actor, "status") if actor is not None else None
    if actor is not None and first is None:
        out["scheduler_error"] = "it exists but did not answer status() in time"
    out["server_apps"] = _server_apps()
    out["devices"] = _devices(first, scheduler_name, namespace)
    out["planner_fallbacks"] = sum(
        int((d.get("metrics") or {}).get("planner_fallbacks", 0) or 0) for d in out["devices"]
    )
    if first is None:
        return out
    sched = dict(first)
    sched.pop("devices", None)
    sched["plans_per_s"] = None
    if sample_s > 0:
        time.sleep(max(0.0, sample_s - (time.monotonic() - t0)))
        second = _call(actor, "status")
        if second is not None and second["t"] > first["t"]:
            sched["plans_per_s"] = (second["plans"] - first["plans"]) / (second["t"] - first["t"])
            sched |= {k: second[k] for k in ("plans", "requests", "errors", "budget", "t")}
    out["scheduler"] = sched
    return out


def _call(handle: Any, method: str, timeout_s: float | None = None) -> Any:
    import ray

    from disco.cluster.ops import CALL_TIMEOUT_S

    try:
        return ray.get(getattr(handle, method).remote(), timeout=timeout_s or CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a dead or slow actor is shown as unreachable
        return None


def _devices(sched: dict[str, Any] | None, scheduler_name: str, namespace: str) -> list[dict]:
    """Registered devices and fleets; the testbed's named actors answer with live counters."""
    import ray

    from disco.cluster import ops
    from disco.cluster.device_actors import actor_prefix

    rows: dict[str, dict[str, Any]] = {}
    now = time.time()
    for e in (sched or {}).get("devices", []):
        row = dict(e)
        row["source"] = "registered"
        if e.get("seen_at") is not None:
            row["seen_s_ago"] = max(0.0, now - float(e["seen_at"]))
        rows[row.get("actor") or row["id"]] = row
    prefix = actor_prefix(scheduler_name)
    names = ops.device_actor_names(scheduler_name, namespace)
    handles = {n: ops.get_actor(n, namespace) for n in names}
    refs = {}
    for name, h in handles.items():
        if h is None:
            continue
        kind = "fleet" if name[len(prefix) :].startswith("fleet") else "agent-actor"
        rows.setdefault(name, {"id": name[len(prefix) :].rsplit(".", 1)[0], "kind": kind,
                               "actor": name, "source": "actor"})  # fmt: skip
        refs[name] = (h.stats if kind == "fleet" else h.metrics).remote()
    for name, ref in refs.items():
        try:
            metrics = ray.get(ref, timeout=ops.CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - shown, not fatal
            rows[name]["error"] = f"unreachable: {type(e).__name__}"
            continue
        rows[name]["metrics"] = metrics
        rows[name]["live"] = True
        if isinstance(metrics, dict) and "devices" in metrics:
            rows[name]["devices"] = metrics["devices"]
    return sorted(rows.values(), key=lambda r: (r.get("kind", ""), str(r.get("id"))))


def _server_apps() -> list[dict[str, Any]]:
    from disco.cluster import ops

    apps = []
    for name, app in ops.server_apps().items():
        deployments = [
            {"name": d, "status": str(getattr(st.status, "value", st.status)),
             "replicas": {str(getattr(k, "value", k)): v
                          for k, v in (st.replica_states or {}).items()}}
            for d, st in app.deployments.items()
        ]  # fmt: skip
        running = sum(d["replicas"].get("RUNNING", 0) for d in deployments)
        apps.append({
            "name": name,
            "status": str(getattr(app.status, "value", app.status)),
            "message": app.message or "",
            "deployments": deployments,
            "replicas": _replicas(name, running),
        })  # fmt: skip
    return apps


def _replicas(app: str, running: int) -> list[dict[str, Any]]:
    """Each replica's load. Serve routes a call to one replica of its choice, so the same call is
    made several times at once and the answers are keyed by replica id: with ``3 n + 4`` calls
    to n replicas, one is missed with a small probability (then the table has fewer rows than
    Serve's replica count)."""
    from ray import serve

    from disco.cluster.ops import CALL_TIMEOUT_S

    if running == 0:
        return []
    try:
        handle = serve.get_app_handle(app)
        responses = [handle.engine_state.remote() for _ in range(3 * running + 4)]
    except Exception:  # noqa: BLE001 - no handle, no table
        return []
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + CALL_TIMEOUT_S
    for r in responses:
        try:
            got = r.result(timeout_s=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - an older deployment or a busy replica
            continue
        if isinstance(got, dict) and "replica" in got:
            seen[str(got["replica"])] = got
    return [seen[k] for k in sorted(seen)]


# ---- rendering ----------------------------------------------------------------------------------


def table(headers: list[str] | None, rows: list[list[Any]], indent: str = "  ") -> str:
    """Columns aligned on their widest cell, numbers right-aligned; no header row for None."""
    cells = [[_cell(c) for c in r] for r in rows]
    ncol = len(headers) if headers else len(cells[0]) if cells else 0
    head = headers or [""] * ncol
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    numeric = [
        any(_is_num(r[i]) for r in rows) and all(_is_num(r[i]) or r[i] is None for r in rows)
        for i in range(ncol)
    ]

    def line(cs: list[str]) -> str:
        parts = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cs, widths, numeric,
                                                                   strict=True)]  # fmt: skip
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([*([line(headers)] if headers else []), *(line(r) for r in cells)])


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def device_load(metrics: dict[str, Any] | None) -> str:
    """The non-zero queue/saturation fields an agent reports, ``name=value``, or ``-``."""
    if not isinstance(metrics, dict):
        return "-"
    parts = [
        f"{k}={_cell(v)}"
        for k, v in sorted(metrics.items())
        if any(w in k for w in LOAD_WORDS) and isinstance(v, int | float) and v
    ]
    return " ".join(parts) or "-"


def _planning(s: dict[str, Any]) -> str:
    """Per request, or on the devices from snapshots (issue 11): versions, syncs, leases."""
    snap = s.get("snapshots")
    mode = s.get("planning", "central")
    if not snap:
        return f"{mode} (no snapshot sync yet)"
    return (f"{mode}; snapshot v{snap['version']} ({snap['publishes']:,} published, "
            f"{snap['fits']:,} fits), {snap['syncs']:,} syncs from {snap['holders_live']} of "
            f"{snap['holders']} holders ({snap['devices']:,} devices), leases lost "
            f"{snap['leases_lost']}")  # fmt: skip


def render(report: dict[str, Any]) -> str:
    s = report["scheduler"]
    b = s["budget"]
    rate = s.get("plans_per_s")
    window = (
        f"; window {b['window_share']:.3f} over {b['window_requests']:,} of {b['window']:,} "
        "requests"
        if b.get("window_share") is not None
        else f"; window: {b.get('window_requests', 0):,} of {b['window']:,} requests"
    )
    lines = [
        f"scheduler {s['name']!r} (namespace {s['namespace']}, node {str(s['node_id'])[:8]}, "
        f"pid {s['pid']}) at {report['address']}",
        table(
            None,
            [
                ["policy", f"{s['policy']} (regime {s['regime']}, migration "
                           f"{'on' if s['migration'] else 'off'})"],
                ["budget", f"b = {b['target']:g}; spent {b['spent_share']:.3f} of "
                           f"{s['requests']:,} requests{window}"],
                ["config", f"version {s['config_version']}"],
                ["plans", f"{s['plans']:,}" + (f" ({rate:,.1f}/s)" if rate is not None else "")],
                ["fallbacks", f"{report['planner_fallbacks']:,} (requests agents planned "
                              "locally: the scheduler did not answer in time)"],
                ["checkpoints", f"{s.get('checkpoints', 0):,} written, "
                                f"{s.get('checkpoint_errors', 0):,} errors"],
                ["planning", _planning(s)],
            ],
        ),
    ]  # fmt: skip
    for app in report["server_apps"]:
        lines += ["", f"server app {app['name']!r}: {app['status']}"
                  + (f" ({app['message']})" if app["message"] else "")]  # fmt: skip
        lines.append(table(
            ["deployment", "status", "replicas"],
            [[d["name"], d["status"], " ".join(f"{k} {v}" for k, v in sorted(d["replicas"].items()))
              or "-"] for d in app["deployments"]],
        ))  # fmt: skip
        if app["replicas"]:
            heads = ["replica", "engine", "node", "streams", "queue", "running", "kv used"]
            rows = []
            for r in app["replicas"]:
                st = r.get("state") or {}
                rows.append([r["replica"], r.get("engine"), str(r.get("node_id", ""))[:8],
                             r.get("ongoing"), st.get("queue"), st.get("running"),
                             st.get("kv_used")])  # fmt: skip
            # A batching replica's queue, running batch and KV; columns no engine fills: gone.
            keep = [i for i in range(len(heads)) if i < 4 or any(r[i] is not None for r in rows)]
            lines.append(table([heads[i] for i in keep], [[r[i] for i in keep] for r in rows]))
    devices = report["devices"]
    total = sum(int(d.get("devices") or 0) for d in devices)
    lines += ["", f"devices: {len(devices)} registered ({total:,} devices)"
              + ("" if devices else ": no fleet or agent has registered")]  # fmt: skip
    if devices:
        rows = []
        for d in devices:
            m = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
            seen = (
                "live"
                if d.get("live")
                else (f"{d['seen_s_ago']:.0f} s ago" if d.get("seen_s_ago") is not None else "-")
            )
            rows.append([d["id"], d.get("kind"), d.get("devices"), m.get("requests"),
                         m.get("failed"), m.get("planner_fallbacks"), seen,
                         d.get("error") or device_load(m)])  # fmt: skip
        lines.append(table(
            ["id", "kind", "devices", "requests", "failed", "fallbacks", "seen", "device load"],
            rows,
        ))  # fmt: skip
    return "\n".join(lines)
