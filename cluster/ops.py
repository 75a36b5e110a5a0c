"""Operating a deployed testbed from a shell: find what `disco serve` / ``Testbed.start`` put on a
Ray cluster (``disco status``, ``disco down``).

What belongs to a testbed, and how it is found (no registry outside Ray is needed):
- the scheduler actor: by its name (``scheduler.actor_name``, default ``disco-scheduler``) in the
  testbed's namespace (``ray.namespace``, default ``disco``);
- fleet and agent actors: named ``<scheduler>.fleet<i>.<run>`` / ``<scheduler>.agent.<id>.<run>``
  in that namespace (:func:`disco.cluster.device_actors.actor_prefix`); they also register with
  the scheduler, as standalone ``disco agent --scheduler`` processes do;
- the server app(s): Serve applications with a ``DiscoServer`` deployment.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from disco.cluster.errors import CliError

DEFAULT_NAMESPACE = "disco"
DEFAULT_SCHEDULER = "disco-scheduler"
CONNECT_PROBE_S = 3.0  # a GCS that does not accept a TCP connection by then is not there
CALL_TIMEOUT_S = 10.0  # one actor or replica call made for a status


def _probe(address: str) -> None:
    """Fail fast on ``host:port`` with nothing listening: ``ray.init`` would retry for minutes."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray say what is wrong with it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_PROBE_S):
            pass
    except OSError as e:
        raise CliError(
            f"no Ray cluster at {address!r} ({e.strerror or e}); start one with "
            "`ray start --head` or pass --address"
        ) from None


def connect(address: str | None, namespace: str) -> str:
    """``ray.init`` onto an existing cluster (never a new local one); returns the address used.
    No cluster there: :class:`CliError` (one line, exit 2), without a traceback."""
    import logging
    import os

    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    _probe(address)
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(
            f"no Ray cluster at {address!r} ({first}); start one with `ray start --head` or "
            "pass --address"
        ) from None
    except Exception as e:  # noqa: BLE001 - e.g. ray.exceptions.AuthenticationError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"cannot connect to the Ray cluster at {address!r}: {msg}") from None
    return address


def get_actor(name: str, namespace: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def device_actor_names(scheduler_name: str, namespace: str) -> list[str]:
    """The names of the fleet and agent actors the testbed of ``scheduler_name`` started."""
    import ray

    from disco.cluster.device_actors import actor_prefix

    prefix = actor_prefix(scheduler_name)
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(prefix))  # fmt: skip


def server_apps() -> dict[str, Any]:
    """Serve applications that run our server deployment: name -> its ApplicationStatusOverview."""
    from ray import serve

    from disco.cluster.serve_app import DEPLOYMENT_NAME

    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001 - no Serve controller on this cluster
        return {}
    return {name: app for name, app in apps.items() if DEPLOYMENT_NAME in app.deployments}


def disconnect() -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
