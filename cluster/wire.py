"""Compact tuples for requests and plans on the scheduler's hot path.

A Ray call pickles its arguments; a frozen dataclass pickles by class reference plus a field dict,
which costs several times a tuple of the same fields. The scheduler actor answers thousands of
decisions per second, so its batch method takes and returns tuples; these functions convert.
"""

from __future__ import annotations

from disco.scheduler.types import DeviceQueue, EndpointKind, MigrationRule, Plan, Request

QueueTuple = tuple[int, int, int, float, int]
RequestTuple = tuple[str, float, int, int | None, str | None, float | None, QueueTuple | None]
PlanTuple = tuple[str, float | None, float | None, bool, tuple[str, str] | None, str]


def request_to(r: Request) -> RequestTuple:
    q = r.device_queue
    qt = None if q is None else (q.running, q.waiting, q.prefill_tokens, q.decode_tokens, q.slots)
    return (r.id, r.arrival, r.prompt_tokens, r.output_tokens, r.device_id, r.server_ttft_hint, qt)


def request_from(t: RequestTuple) -> Request:
    *head, qt = t
    return Request(*head, None if qt is None else DeviceQueue(*qt))


def plan_to(p: Plan) -> PlanTuple:
    m = p.migration
    rule = (m.target.value, m.from_kind.value) if m is not None else None
    return (p.request_id, p.server_start, p.device_start, p.cancel_loser, rule, p.policy)


def plan_from(t: PlanTuple) -> Plan:
    rid, ss, ds, cancel, rule, policy = t
    mig = MigrationRule(EndpointKind(rule[0]), EndpointKind(rule[1])) if rule else None
    return Plan(rid, ss, ds, cancel, mig, policy)
