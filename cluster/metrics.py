"""Live metrics through Ray's metrics API: what the scheduler and the server replicas are doing.

Ray's ``ray.util.metrics`` series recorded inside an actor are exported by the node's metrics agent
in Prometheus' text format (``http://<node>:<metrics-export-port>/metrics``), beside Ray's and
Serve's own, and Ray's dashboard and Grafana read them from there. Ray prefixes every name with
``ray_`` and exports a counter as ``<name>_total``: the ``disco_scheduler_plans`` counter below is
``ray_disco_scheduler_plans_total`` in Prometheus (:func:`exported_name`). How to point Prometheus
and Grafana at them: ``cluster/deploy/README.md`` ("Live metrics"); the dashboard:
``cluster/deploy/grafana-disco.json``.

Cost: nothing is recorded per token or per plan. The actors call :meth:`Sampler.touch` on paths
they already take (a batch of plans, a batch of outcomes, a stream that starts or ends); a touch
is a clock read, and the values are read from the actor's own state and recorded at most once
per ``interval_s`` (1 s): right away if the last record is older, else by a timer on the actor's
event loop, so the series are never more than ~1 s stale after the last touch. The scheduler's
sampler then keeps recording every second (its registry and budget change without plans); a
replica's while it has streams open, and once more after its last stream ends.

Recording never raises into the actor: a failure is logged once and the series stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "disco_"
INTERVAL_S = 1.0  # the most often any series is recorded


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...]


_S = ("scheduler",)  # the scheduler actor's name (several testbeds may share a cluster)
_R = ("deployment", "application", "replica", "engine")  # Serve's names, so series join Serve's

SCHEDULER_METRICS: tuple[MetricDef, ...] = (
    MetricDef("disco_scheduler_budget_target", "gauge",
              "budget b: the share of prompt tokens the constrained endpoint may prefill",
              (*_S, "regime")),
    MetricDef("disco_scheduler_budget_spent_share", "gauge",
              "share of prompt tokens each endpoint prefilled since the ledger began (race "
              "losers included); regime=the endpoint; the constrained one is spent vs target",
              (*_S, "regime")),
    MetricDef("disco_scheduler_budget_window_share", "gauge",
              "the policy's own spent share over its sliding window (constrained endpoint)",
              (*_S, "regime")),
    MetricDef("disco_scheduler_prompt_tokens", "counter",
              "prompt tokens of the requests whose outcomes were reported", _S),
    MetricDef("disco_scheduler_prefill_tokens", "counter",
              "prompt tokens each endpoint prefilled (endpoint=server|device); rate() over "
              "rate(disco_scheduler_prompt_tokens) is the spent share over a window",
              (*_S, "endpoint")),
    MetricDef("disco_scheduler_config_version", "gauge",
              "the scheduler's config version (bumped by every reconfigure that changes it)", _S),
    MetricDef("disco_scheduler_policy_info", "gauge",
              "1 for the policy, regime and migration setting in force, 0 for earlier ones",
              (*_S, "policy", "regime", "migration")),
    MetricDef("disco_scheduler_plans", "counter", "plans made (one per request)", _S),
    MetricDef("disco_scheduler_outcomes", "counter",
              "request outcomes reported by the devices (refusals excluded)", _S),
    MetricDef("disco_scheduler_outcome_errors", "counter",
              "reported outcomes that ended in an error", _S),
    MetricDef("disco_scheduler_migrations", "counter", "reported outcomes that migrated", _S),
    MetricDef("disco_scheduler_refused", "counter",
              "requests a saturated device refused (HTTP 429 device_saturated)", _S),
    MetricDef("disco_scheduler_planner_fallbacks", "gauge",
              "requests the registered agents planned locally because the scheduler did not "
              "answer in time (the sum of their heartbeats' planner_fallbacks counters)", _S),
    MetricDef("disco_scheduler_devices", "gauge",
              "devices in the scheduler's registry by kind (agent, agent-actor, fleet)",
              (*_S, "kind")),
    MetricDef("disco_scheduler_registry_entries", "gauge",
              "registry entries (agents and fleets) by kind", (*_S, "kind")),
)  # fmt: skip

REPLICA_METRICS: tuple[MetricDef, ...] = (
    MetricDef("disco_replica_open_streams", "gauge", "engine streams open on the replica", _R),
    MetricDef("disco_replica_streams", "counter", "engine streams the replica started", _R),
    MetricDef("disco_replica_queue", "gauge",
              "sequences waiting in the replica's scheduler (batching model)", _R),
    MetricDef("disco_replica_running", "gauge",
              "sequences in the replica's running batch (batching model)", _R),
    MetricDef("disco_replica_kv_used_tokens", "gauge",
              "KV cache tokens in use by running sequences (batching model)", _R),
    MetricDef("disco_replica_kv_usage", "gauge",
              "KV cache use: kv_used_tokens / the preset's kv_tokens, 0..1 (batching model)", _R),
    MetricDef("disco_replica_preemptions", "counter",
              "recompute preemptions (KV cache full; batching model)", _R),
    MetricDef("disco_replica_generated_tokens", "counter",
              "tokens the replica's steps produced (batching model)", _R),
)  # fmt: skip

METRICS: dict[str, MetricDef] = {m.name: m for m in (*SCHEDULER_METRICS, *REPLICA_METRICS)}


def exported_name(name: str) -> str:
    """The name Prometheus sees for one of :data:`METRICS`: ``ray_`` + name, + ``_total`` for a
    counter (a histogram adds ``_bucket``, ``_sum`` and ``_count``)."""
    m = METRICS[name]
    return f"ray_{name}" + ("_total" if m.kind == "counter" else "")


def defined_metric(exported: str) -> str | None:
    """The :data:`METRICS` name behind a Prometheus series name (``ray_`` optional), or None."""
    base = exported.removeprefix("ray_")
    m = METRICS.get(base)
    if m is not None and m.kind == "gauge":
        return base
    for suffix, kind in (("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram"),
                         ("_count", "histogram")):  # fmt: skip
        name = base.removesuffix(suffix)
        if name != base and name in METRICS and METRICS[name].kind == kind:
            return name
    return None


# ---- backends ------------------------------------------------------------------------------------

# A factory makes the metric object for a definition; it must offer set (gauge), inc (counter)
# and observe (histogram) with a ``tags`` mapping, as ray.util.metrics objects do.
Factory = Callable[[MetricDef], Any]
_ray_objects: dict[str, Any] = {}  # one object per name per process, as Ray wants


def ray_factory(m: MetricDef) -> Any:
    obj = _ray_objects.get(m.name)
    if obj is None:
        from ray.util import metrics as rm

        cls = {"counter": rm.Counter, "gauge": rm.Gauge, "histogram": rm.Histogram}[m.kind]
        obj = cls(m.name, description=m.description, tag_keys=m.tag_keys)
        _ray_objects[m.name] = obj
    return obj


class _Series:
    """Gauges set, counters incremented by the growth of a running total (a total that falls,
    e.g. after a restore, only moves the baseline)."""

    def __init__(self, defs: Iterable[MetricDef], factory: Factory) -> None:
        self.objs = {m.name: factory(m) for m in defs}
        self.totals: dict[tuple, float] = {}

    def set(self, name: str, value: float | None, tags: Mapping[str, str]) -> None:
        if value is not None:
            self.objs[name].set(float(value), tags=dict(tags))

    def total(self, name: str, value: float | None, tags: Mapping[str, str]) -> None:
        if value is None:
            return
        key = (name, *sorted(tags.items()))
        last = self.totals.get(key)
        self.totals[key] = value
        delta = value - (0.0 if last is None else last)
        if delta > 0:
            self.objs[name].inc(float(delta), tags=dict(tags))


class _Once:
    """Logs the first failure of a recorder, then stays quiet (a metrics outage must not fill an
    actor's log once a second)."""

    def __init__(self, what: str) -> None:
        self.what, self.failed = what, False

    def __call__(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - metrics never break the actor
            if not self.failed:
                self.failed = True
                log.warning("recording %s metrics failed (logged once)", self.what, exc_info=True)


# ---- the scheduler -------------------------------------------------------------------------------


class SchedulerMetrics:
    """The scheduler actor's series, read from its state: ``record(cfg, core, devices)`` with
    the actor's ``SchedulerConfig``, ``SchedulerCore`` and registry (id -> entry)."""

    def __init__(self, scheduler: str, factory: Factory = ray_factory) -> None:
        self.tags = {"scheduler": scheduler}
        self.series = _Series(SCHEDULER_METRICS, factory)
        self._info: tuple[str, str, str] | None = None
        self._kinds: set[str] = set()
        self._guard = _Once("scheduler")

    def record(self, cfg: Any, core: Any, devices: Mapping[str, Mapping[str, Any]]) -> None:
        self._guard(lambda: self._record(cfg, core, devices))

    def _record(self, cfg: Any, core: Any, devices: Mapping[str, Mapping[str, Any]]) -> None:
        from disco.scheduler.types import Regime

        s, t = self.series, self.tags
        led = core.ledger
        regime = str(cfg.regime)
        s.set("disco_scheduler_budget_target", cfg.budget, t | {"regime": regime})
        for r in Regime:
            s.set("disco_scheduler_budget_spent_share", led.spent_ratio(r), t | {"regime": r.value})
        policy = core.policy
        seen = getattr(policy, "budget_seen", None)
        spent = getattr(policy, "budget_spent", None)
        if seen:
            s.set("disco_scheduler_budget_window_share", spent / seen, t | {"regime": regime})
        s.total("disco_scheduler_prompt_tokens", led.prompt_tokens, t)
        for side, n in (("server", led.server_prompt_tokens), ("device", led.device_prompt_tokens)):
            s.total("disco_scheduler_prefill_tokens", n, t | {"endpoint": side})
        s.set("disco_scheduler_config_version", core.config_version, t)
        name = str(getattr(policy, "name", None) or cfg.policy)
        info = (name, regime, str(bool(cfg.migration)).lower())
        if info != self._info:
            if self._info is not None:
                s.set("disco_scheduler_policy_info", 0, t | self._info_tags(self._info))
            s.set("disco_scheduler_policy_info", 1, t | self._info_tags(info))
            self._info = info
        s.total("disco_scheduler_plans", core.plans, t)
        s.total("disco_scheduler_outcomes", led.requests, t)
        s.total("disco_scheduler_outcome_errors", led.errors, t)
        s.total("disco_scheduler_migrations", led.migrations, t)
        s.total("disco_scheduler_refused", led.refused, t)
        fallbacks = sum(int((d.get("metrics") or {}).get("planner_fallbacks", 0) or 0)
                        for d in devices.values())  # fmt: skip
        s.set("disco_scheduler_planner_fallbacks", fallbacks, t)
        by_kind: dict[str, list[int]] = {}
        for d in devices.values():
            n = by_kind.setdefault(str(d.get("kind", "unknown")), [0, 0])
            n[0] += int(d.get("devices", 1) or 0)
            n[1] += 1
        for kind in self._kinds | by_kind.keys():  # a kind that left goes to 0
            n_dev, n_ent = by_kind.get(kind, (0, 0))
            s.set("disco_scheduler_devices", n_dev, t | {"kind": kind})
            s.set("disco_scheduler_registry_entries", n_ent, t | {"kind": kind})
        self._kinds |= by_kind.keys()

    @staticmethod
    def _info_tags(info: tuple[str, str, str]) -> dict[str, str]:
        return dict(zip(("policy", "regime", "migration"), info, strict=True))


# ---- the server replicas -------------------------------------------------------------------------


class ReplicaMetrics:
    """A server replica's series: ``record(open_streams, started, state)`` with its open and
    started stream counts and its engine's ``replica_state()`` (``{}`` for an engine without the
    batching model: then only the stream series)."""

    def __init__(self, replica: str, engine: str, factory: Factory = ray_factory) -> None:
        self.tags = {"deployment": "", "application": "", "replica": replica, "engine": engine}
        self.tags |= _serve_context()
        self.series = _Series(REPLICA_METRICS, factory)
        self._guard = _Once("replica")

    def record(self, open_streams: int, started: int, state: Mapping[str, Any] | None) -> None:
        self._guard(lambda: self._record(open_streams, started, state or {}))

    def _record(self, open_streams: int, started: int, st: Mapping[str, Any]) -> None:
        s, t = self.series, self.tags
        s.set("disco_replica_open_streams", open_streams, t)
        s.total("disco_replica_streams", started, t)
        if "queue" not in st:
            return
        s.set("disco_replica_queue", st.get("queue"), t)
        s.set("disco_replica_running", st.get("running"), t)
        s.set("disco_replica_kv_used_tokens", st.get("kv_used"), t)
        if st.get("kv_tokens"):
            s.set("disco_replica_kv_usage", st.get("kv_used", 0) / st["kv_tokens"], t)
        s.total("disco_replica_preemptions", st.get("preemptions"), t)
        s.total("disco_replica_generated_tokens", st.get("tokens"), t)


def _serve_context() -> dict[str, str]:
    """Serve's deployment, application and replica names when called inside a replica (the tags
    Serve's own series carry), else nothing."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return {"deployment": ctx.deployment, "application": ctx.app_name or "",
                "replica": ctx.replica_tag}  # fmt: skip
    except Exception:  # noqa: BLE001 - not in a replica (tests build the class directly)
        return {}


# ---- when to record ------------------------------------------------------------------------------


class Sampler:
    """Calls ``record()`` at most every ``interval_s``: :meth:`touch` records now if the last
    record is that old, else arms one timer on the running event loop for when it will be. After
    each record, the timer is armed again while ``busy()`` says so (periodic while there is
    something to watch). Without a running loop (plain calls, tests) a touch only records when due.
    """

    def __init__(
        self,
        record: Callable[[], None],
        interval_s: float = INTERVAL_S,
        busy: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.record, self.interval_s, self.busy, self.clock = record, interval_s, busy, clock
        self.records = 0
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.interval_s:
            self._fire()
        else:
            self._arm(self.interval_s - (now - self._last))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self.close()
        self._last = self.clock()
        self.records += 1
        self.record()
        if self.busy():
            self._arm(self.interval_s)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(delay, 0.0), self._fire)


def scheduler_sampler(actor: Any, factory: Factory = ray_factory) -> Sampler:
    """The scheduler actor's sampler (``actor``: a ``SchedulerActor``; its ``cfg``, ``core`` and
    ``devices`` are read at each record, so a reconfigure or restore is seen). Records every
    second once touched."""
    metrics = SchedulerMetrics(getattr(actor.cfg, "actor_name", "disco-scheduler"), factory)
    return Sampler(lambda: metrics.record(actor.cfg, actor.core, actor.devices), busy=lambda: True)


class ReplicaSampler(Sampler):
    """A :class:`Sampler` that also counts the streams a replica starts (:meth:`started`)."""

    def __init__(self, record: Callable[[int], None], busy: Callable[[], bool]) -> None:
        super().__init__(lambda: record(self.streams), busy=busy)
        self.streams = 0

    def started(self) -> None:
        self.streams += 1
        self.touch()


def replica_sampler(replica: Any, factory: Factory = ray_factory) -> ReplicaSampler:
    """A ``DiscoServer`` replica's sampler: reads its open streams (``_ongoing``) and its engine's
    ``replica_state()``; the replica calls :meth:`ReplicaSampler.started` when a stream starts and
    :meth:`~Sampler.touch` when one ends. Records every second while streams are open and once
    after the last one ends."""
    metrics = ReplicaMetrics(replica.replica_id, str(replica.cfg.engine), factory)

    def record(started: int) -> None:
        state = getattr(replica.engine, "replica_state", None)
        metrics.record(replica._ongoing, started, state() if callable(state) else {})

    return ReplicaSampler(record, busy=lambda: replica._ongoing > 0)
