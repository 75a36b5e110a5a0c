"""The causal simulator: self-hosted replicas under the load the devices send (DESIGN.md section 8).

Event-driven in virtual time. Unlike the load-free simulator (``simulator.py``, where each server
TTFT is an independent draw and the policy learns every outcome at plan time), here:

- The server is ``replicas`` continuous-batching replicas (``batching.Replica``, one preset)
  behind Ray Serve's default router (power of two choices), so server TTFT and the time between
  tokens come from the batch each request shares: they grow with the load the policy sends and
  fall when it keeps prompts on devices.
- A policy plans at arrival and observes an outcome when the request completes, in virtual time;
  nothing is learnt before it would be known.
- By default each request has its own device (a phone per user): TTFT = a + c * context from
  its start, decode at the profile's speed. With shared devices (``device_ids``, or
  ``CausalSettings.users``), see "Device queues" below.
- The request-level logic follows the live coordinator's state machine
  (``device_agents/request_state.py``): the first first token wins and the loser is cancelled; a
  migration is decided at the first token, launched once the reader's unread buffer hides the
  target's estimated t_m (the target gets prompt + generated text), the source's later tokens are
  held, and the switch happens at the target's first token unless the buffer's deadline passes
  first (then the held tokens go out and the source goes on).
  Gaps at a switch are measured, not assumed.
- Billing: ``billing.prompt_charge`` (one rule, live and simulated). Server cost: replica time attributed to
  each request's tokens x the preset's price per hour when it has one, else list prices.
- ``rtt_s``: device <-> server round trip; a request reaches its replica rtt/2 after it is sent
  and each token reaches the device rtt/2 after the replica emits it.

Device queues (issue 10, the live agent's ``device_agents/device_queue.py``). Requests that map to
one device id share one device, which serves ``device_slots`` streams at a time (llama.cpp: 1);
the other device streams (original legs and migration targets) wait in FIFO order. A stream's
prefill starts when it gets its slot, so its first token comes a + c * context after that, not
after it asked (as live, where the first-token limit counts from the slot). It holds the slot
until it finishes, is cancelled as the loser (at the winner's first token as the device receives
it), stops as a migration source at the switch, or is abandoned as a target at its deadline; a
waiting stream cancelled leaves the queue then, charged nothing (it never started). A migration's
launch rule (t_m) does not count the target device's queue, as live; a target still waiting at
the buffer's deadline is abandoned like a slow one. Each plan gets ``Request.device_queue``, the
device's queue at the arrival (``device_queue.queue_state``, the agent's rule; max_tokens is the
trace's output length, as ``disco load`` sends it; the expected length is the device's EWMA of its
finished responses, prior 128 tokens, alpha 0.05, as the live coordinator's). With
``max_device_queue`` set, a request whose plan needs the device alone (no server start) while that
many streams already wait is refused, as live (HTTP 429): ``refused=True``, no tokens, no work,
reported to the policy at once (only with shared devices). ``CausalSettings.users``: request i
goes to a device drawn uniformly at random (seeded), so that each device sees a thinned, bursty
share of the arrivals. Without ids every request keeps its own idle device (the model above,
unchanged).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .batching import Emission, Replica, ServerPreset, power_of_two
from .billing import prompt_charge
from .device_queue import queue_state
from .metrics import DEFAULT_EXPECTED_TTFT_S, DEFAULT_TDS, percentile, summarize
from .migration import MigrationConfig, decide_migration, migration_latency
from .policies import PolicyConfig, make_policy
from .presets import preset_profile
from .profiles import DeviceProfile, ServerProfile
from .traces import TraceRecord
from .types import DeviceQueue, EndpointKind, Plan, Regime, Request, RequestOutcome

S, D = EndpointKind.SERVER, EndpointKind.DEVICE


@dataclass(frozen=True)
class CausalSettings:
    replicas: int = 1
    rtt_s: float = 0.05
    seed: int = 0
    expected_ttft: float = DEFAULT_EXPECTED_TTFT_S  # Andes QoE
    tds: float = DEFAULT_TDS
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    record_replicas: bool = False  # sample each replica's queue / running batch every step
    # Shared devices (module doc, "Device queues"). users: the trace's requests go to this many
    # devices, each drawn uniformly with the seed (None: every request its own device, unless
    # run() gets device_ids). device_slots: streams one device serves at once. max_device_queue:
    # past that many waiting streams, a request planned on the device alone is refused (None: no
    # limit; only with shared devices).
    users: int | None = None
    device_slots: int = 1
    max_device_queue: int | None = None
    # The device's expected response length for its queue estimate: an EWMA of its finished
    # responses (the live coordinator's prior and alpha).
    prior_output_tokens: float = 128.0
    length_ewma_alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.rtt_s < 0:
            raise ValueError(f"rtt_s must be >= 0, got {self.rtt_s}")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.device_slots < 1:
            raise ValueError(f"device_slots must be >= 1, got {self.device_slots}")
        if self.max_device_queue is not None and self.max_device_queue < 0:
            raise ValueError(f"max_device_queue must be >= 0, got {self.max_device_queue}")
        if not 0.0 < self.length_ewma_alpha <= 1.0:
            raise ValueError(f"length_ewma_alpha must be in (0, 1], got {self.length_ewma_alpha}")


def assign_devices(n: int, users: int, seed: int) -> np.ndarray:
    """Device id of each of ``n`` requests: drawn uniformly from ``users`` devices (seeded; its own
    stream, so the replicas' router draws stay as they are)."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    return np.random.default_rng([seed, 0xD1CE]).integers(users, size=n)


class _Device:
    """One shared device: its slots, the streams holding them and the FIFO waiting for one."""

    __slots__ = ("id", "prof", "slots", "running", "waiting", "mean_out")

    def __init__(self, ident: Hashable, prof: DeviceProfile, slots: int, mean_out: float) -> None:
        self.id = ident
        self.prof = prof
        self.slots = slots
        self.running: list[tuple[_Req, _Leg]] = []
        self.waiting: deque[tuple[_Req, _Leg]] = deque()
        self.mean_out = mean_out  # EWMA of its finished response lengths


class _Leg:
    """One endpoint's stream for a request (original, or a migration target)."""

    __slots__ = ("kind", "role", "start", "ctx", "index0", "first", "stopped", "produced",
                 "replica", "seq", "submitted", "gpu_s", "asked", "queued", "granted", "freed_at",
                 "release_at")  # fmt: skip

    def __init__(self, kind: EndpointKind, role: str, start: float, ctx: int, index0: int) -> None:
        self.kind = kind
        self.role = role  # "s"/"d": original legs; "m": migration target
        self.start = start  # when it started work (a device stream: when it got its slot)
        self.asked = start  # when it was launched (a device stream may then wait for a slot)
        self.queued = False  # waiting for a slot of a shared device
        self.granted = True  # started work (False: left a device's queue without a slot)
        self.freed_at: float | None = None  # when it gave its device slot / queue place back
        self.release_at = math.inf  # a slot release already scheduled
        self.ctx = ctx  # context tokens it prefills
        self.index0 = index0  # index of its first token
        self.first: float | None = None  # user time of its first token
        self.stopped: float | None = None
        self.produced = 0
        self.replica = -1
        self.seq = None
        self.submitted = False
        self.gpu_s = 0.0


class _Req:
    __slots__ = ("i", "rid", "arrival", "plen", "n", "plan", "legs", "winner", "active", "t0",
                 "times", "ndel", "migrate_at", "migrate_to", "target", "deadline", "held",
                 "stash", "switching", "migrated_at", "done", "sources", "dev", "g",
                 "box")  # fmt: skip

    def __init__(self, i: int, arrival: float, plen: int, n: int, dev: DeviceProfile) -> None:
        self.i = i
        self.dev = dev  # this request's device profile
        self.box: _Device | None = None  # its shared device (None: a device of its own)
        self.g = dev.tbt_s
        self.rid = str(i)
        self.arrival = arrival
        self.plen = plen
        self.n = n
        self.plan: Plan | None = None
        self.legs: list[_Leg] = []
        self.winner: EndpointKind | None = None
        self.active: _Leg | None = None
        self.t0 = math.nan
        self.times: list[np.ndarray] = []  # delivered token times (user clock), in order
        self.sources: list[tuple[EndpointKind, int]] = []
        self.ndel = 0
        self.migrate_at: int | None = None
        self.migrate_to: EndpointKind | None = None
        self.target: _Leg | None = None
        self.deadline = math.inf
        self.held: list[np.ndarray] = []  # source tokens produced after the launch
        self.stash: list[np.ndarray] = []  # server target tokens before the switch
        self.switching = False
        self.migrated_at: int | None = None
        self.done = False


@dataclass
class CausalResult:
    outcomes: list[RequestOutcome]
    server_gpu_s: np.ndarray
    summary: dict
    replica_samples: list[list[tuple[float, int, int, int]]]
    replica_busy_s: list[float]
    events: int
    device_waits: list[float] = field(default_factory=list)  # seconds each slot was waited for


# event kinds (ordering ties: smaller kind first at the same time; a slot freed at t is free for
# the hedges and arrivals at t)
(_COMPLETE, _SWITCH, _SRC_END, _DEADLINE, _DEV_FIRST, _SUBMIT, _LAUNCH, _RELEASE, _START,
 _ARRIVE) = range(10)  # fmt: skip


class CausalSim:
    """One replay of a trace through one policy (see the module doc)."""

    def __init__(
        self,
        policy,
        preset: ServerPreset,
        device: DeviceProfile,
        settings: CausalSettings,
        server_profile: ServerProfile | None = None,
    ) -> None:
        if getattr(policy, "wants_hints", False):
            raise ValueError(
                f"policy {policy.name!r} needs each request's server TTFT in advance; with "
                "self-hosted replicas it depends on the load, so it cannot be simulated causally"
            )
        self.policy = policy
        self.preset = preset
        self.device = device
        self.server = server_profile or preset_profile(preset)
        self.s = settings
        self.half = settings.rtt_s / 2
        self.replicas = [
            Replica(preset, f"replica-{k}", record=settings.record_replicas)
            for k in range(settings.replicas)
        ]
        self.ends = [math.inf] * settings.replicas  # end time of each replica's running step
        self.rng = np.random.default_rng([settings.seed, 0x5E7E])
        self.heap: list = []
        self._seq = itertools.count()
        self.reqs: list[_Req] = []
        self.by_sid: dict[str, tuple[_Req, _Leg]] = {}
        self.finished: list[RequestOutcome] = []
        self.gpu_s: list[float] = []
        self.n_events = 0
        self.now = 0.0
        self.boxes: dict[Hashable, _Device] = {}  # shared devices by id
        self.device_waits: list[float] = []  # per device stream that got a slot: its wait

    # ---- the loop -----------------------------------------------------------------------------

    def run(
        self,
        records: Sequence[TraceRecord],
        devices: Sequence[DeviceProfile] | None = None,
        device_ids: Sequence[Hashable] | None = None,
    ) -> list[RequestOutcome]:
        """``devices``: each request's device profile (default: the simulator's device).
        ``device_ids``: each request's device; requests of one id share that device and its
        queue (default: ``settings.users`` devices drawn at random, else one device each)."""
        if devices is not None and len(devices) != len(records):
            raise ValueError("devices must give one profile per request")
        if device_ids is None and self.s.users is not None:
            device_ids = assign_devices(len(records), self.s.users, self.s.seed).tolist()
        if device_ids is not None and len(device_ids) != len(records):
            raise ValueError("device_ids must give one device per request")
        for i, r in enumerate(records):
            dev = self.device if devices is None else devices[i]
            req = _Req(i, float(r.arrival), int(r.prompt_tokens), int(r.output_tokens), dev)
            if device_ids is not None:
                key = device_ids[i]
                box = self.boxes.get(key)
                if box is None:
                    box = _Device(key, dev, self.s.device_slots, self.s.prior_output_tokens)
                    self.boxes[key] = box
                elif box.prof != dev:
                    raise ValueError(f"requests of device {key!r} give it different profiles")
                req.box = box
            self.reqs.append(req)
            self._push(req.arrival, _ARRIVE, req)
        heap = self.heap
        while heap or any(e < math.inf for e in self.ends):
            t_ctl = heap[0][0] if heap else math.inf
            k = min(range(len(self.ends)), key=self.ends.__getitem__)
            if self.ends[k] <= t_ctl:
                self._finish_step(k)
            else:
                t, _, _, kind, req, arg = heapq.heappop(heap)
                self.now = t
                self.n_events += 1
                self._dispatch(kind, req, arg)
        return self.finished

    def _push(self, t: float, kind: int, req: _Req, arg=None) -> None:
        t = max(t, self.now)  # a token's rtt/2 can only delay; never schedule into the past
        heapq.heappush(self.heap, (t, kind, next(self._seq), kind, req, arg))

    def _dispatch(self, kind: int, req: _Req, arg) -> None:
        if kind == _ARRIVE:
            self._arrive(req)
        elif kind == _START:
            if req.winner is None:
                self._start_leg(req, arg, 0)
        elif kind == _SUBMIT:
            self._submit(req, arg)
        elif kind == _DEV_FIRST:
            self._device_first(req, arg)
        elif kind == _LAUNCH:
            self._launch(req)
        elif kind == _SWITCH:
            self._switch(req, arg)
        elif kind == _DEADLINE:
            if arg is req.target and not req.switching:
                self._abandon(req)
        elif kind == _SRC_END:
            self._source_end(req, arg)
        elif kind == _COMPLETE:
            self._complete(req)
        elif kind == _RELEASE:
            self._release(req, arg)

    # ---- replicas -----------------------------------------------------------------------------

    def _kick(self, k: int) -> None:
        """Plan replica k's next step if it is idle."""
        rep = self.replicas[k]
        if rep.in_step is not None:
            return
        horizon = self.heap[0][0] if self.heap else math.inf
        step = rep.next_step(self.now, horizon)
        self.ends[k] = step.end if step is not None else math.inf

    def _finish_step(self, k: int) -> None:
        rep = self.replicas[k]
        step = rep.in_step
        self.now = self.ends[k]
        self.n_events += 1
        for e in rep.finish(step):
            entry = self.by_sid.get(e.seq.id)
            if entry is not None:
                self._server_tokens(entry[0], entry[1], e)
        self.ends[k] = math.inf
        self._kick(k)

    def _interrupt(self, k: int) -> None:
        """Something outside changed replica k: cut its decode run at now."""
        rep = self.replicas[k]
        if rep.in_step is not None and len(rep.in_step.ends) > 1:
            rep.cut(self.now)
            self.ends[k] = rep.in_step.end

    # ---- request logic (mirrors the live coordinator) ------------------------------------------

    def _arrive(self, req: _Req) -> None:
        box = req.box
        if box is None:
            request = Request(id=req.rid, arrival=req.arrival, prompt_tokens=req.plen)
        else:
            request = Request(
                id=req.rid, arrival=req.arrival, prompt_tokens=req.plen, device_id=str(box.id),
                device_queue=self._queue(box),
            )  # fmt: skip
        plan = self.policy.plan(request, now=self.now)
        req.plan = plan
        limit = self.s.max_device_queue
        if (
            box is not None and limit is not None and plan.server_start is None
            and len(box.waiting) >= limit
        ):  # fmt: skip
            self._refuse(req)
            return
        for kind in (S, D):
            st = plan.start_of(kind)
            if st is None:
                continue
            if st <= 0:
                self._start_leg(req, kind, 0)
            else:
                self._push(self.now + st, _START, req, kind)

    def _start_leg(self, req: _Req, kind: EndpointKind, index0: int, role: str = "") -> _Leg:
        ctx = req.plen + index0
        leg = _Leg(kind, role or kind.value[0], self.now, ctx, index0)
        req.legs.append(leg)
        if kind is S:
            leg.replica = power_of_two([r.load for r in self.replicas], self.rng)
            self._push(self.now + self.half, _SUBMIT, req, leg)
        elif req.box is None:
            self._push(self.now + float(req.dev.ttft(ctx)), _DEV_FIRST, req, leg)
        else:
            self._enter(req, leg)
        return leg

    # ---- shared devices (module doc, "Device queues") -----------------------------------------

    def _queue(self, box: _Device) -> DeviceQueue:
        """The device's queue now, as the live agent builds it for a plan."""
        now = self.now

        def produced(req: _Req, leg: _Leg) -> int:
            if leg.first is None:
                return 0
            return min(req.n - leg.index0, 1 + int((now - leg.first) / req.g))

        return queue_state(
            ((produced(r, x), r.n - x.index0) for r, x in box.running),
            ((x.ctx, r.n - x.index0) for r, x in box.waiting),
            box.mean_out, box.slots,
        )  # fmt: skip

    def _enter(self, req: _Req, leg: _Leg) -> None:
        """A device stream asks its device for a slot (FIFO)."""
        box = req.box
        if len(box.running) < box.slots and not box.waiting:
            self._grant(req, leg)
        else:
            leg.queued = True
            leg.granted = False
            box.waiting.append((req, leg))

    def _grant(self, req: _Req, leg: _Leg) -> None:
        """The stream gets its slot: its prefill (and first-token clock) starts now."""
        req.box.running.append((req, leg))
        leg.queued = False
        leg.granted = True
        leg.start = self.now
        self.device_waits.append(self.now - leg.asked)
        self._push(self.now + float(req.dev.ttft(leg.ctx)), _DEV_FIRST, req, leg)
        if leg is req.target:  # a migration target that waited: its switch is known now
            self._schedule_switch(req, leg)

    def _free(self, req: _Req, leg: _Leg, at: float) -> None:
        """The device stream ends at ``at`` (>= now): its slot or queue place is given back."""
        if req.box is None or leg.kind is not D or leg.freed_at is not None:
            return
        if at <= self.now:
            self._release(req, leg)
        elif at < leg.release_at:
            leg.release_at = at
            self._push(at, _RELEASE, req, leg)

    def _release(self, req: _Req, leg: _Leg) -> None:
        if leg.freed_at is not None:
            return
        leg.freed_at = self.now
        box = req.box
        if leg.queued:
            box.waiting.remove((req, leg))
            leg.queued = False
            return  # a waiter leaving frees no slot
        box.running.remove((req, leg))
        while box.waiting and len(box.running) < box.slots:
            self._grant(*box.waiting.popleft())

    def _refuse(self, req: _Req) -> None:
        """The device is saturated and the plan needs it alone: refused, as the live agent does."""
        req.done = True
        o = RequestOutcome(
            request_id=req.rid, arrival=req.arrival, prompt_tokens=req.plen,
            token_times=np.zeros(0), error="device saturated", server_started=False,
            device_started=False, refused=True,
        )  # fmt: skip
        self.gpu_s.append(0.0)
        self.finished.append(o)
        self.policy.observe(o)

    def _submit(self, req: _Req, leg: _Leg) -> None:
        if leg.stopped is not None:
            return  # cancelled on the way (still billed: it was sent)
        leg.submitted = True
        sid = f"{req.rid}/{leg.role}"
        max_tokens = req.n - leg.index0
        rep = self.replicas[leg.replica]
        try:
            leg.seq = rep.submit(
                sid, leg.ctx, max_tokens, self.now, cache_key=req.rid, shared_tokens=req.plen
            )
        except ValueError:  # does not fit the replica: that endpoint fails
            leg.stopped = self.now
            self._leg_failed(req, leg)
            return
        self.by_sid[sid] = (req, leg)
        self._interrupt(leg.replica)
        self._kick(leg.replica)

    def _leg_failed(self, req: _Req, leg: _Leg) -> None:
        if req.winner is None and all(x.stopped is not None for x in req.legs):
            pending = req.plan is not None and any(
                req.plan.start_of(k) not in (None, 0) and not any(x.kind is k for x in req.legs)
                for k in (S, D)
            )
            if not pending:
                self._finalize(req, error="no endpoint could serve the request")
        elif leg is req.target:
            self._abandon(req)

    def _stop(self, req: _Req, leg: _Leg, heard: float | None = None) -> None:
        """Stop ``leg`` now; ``heard``: when the device learns it (a loser cancelled at the
        winner's first token as the device receives it), when its slot frees."""
        if leg.stopped is not None:
            return
        leg.stopped = self.now
        if leg.kind is S and leg.seq is not None:
            seq = self.replicas[leg.replica].abort(leg.seq.id, self.now)
            if seq is not None:
                self._interrupt(leg.replica)
        elif leg.kind is D and leg.first is not None:
            leg.produced = min(req.n - leg.index0, 1 + int((self.now - leg.first) / req.g))
        if leg.kind is D:
            self._free(req, leg, self.now if heard is None else max(self.now, heard))

    def _first_token(self, req: _Req, leg: _Leg, t: float) -> None:
        req.winner = leg.kind
        req.active = leg
        req.t0 = t
        for other in req.legs:
            if other is not leg:
                self._stop(req, other, t)
        rule = req.plan.migration if req.plan is not None else None
        if rule is not None and leg.kind is rule.from_kind:
            expected = float(self.policy.expected_output_tokens(req.plen)[0])
            d = decide_migration(
                rule, leg.kind, req.plen, 1, max(0.0, min(expected, req.n) - 1),
                self.server, req.dev, self.s.migration,
            )  # fmt: skip
            if d.migrate and d.at_index is not None and d.at_index < req.n:
                req.migrate_at, req.migrate_to = d.at_index, d.target
                if leg.kind is S and leg.seq is not None:
                    # the token after which the delivered count first reaches at_index
                    leg.seq.watch = d.at_index - 1 - leg.index0

    def _device_first(self, req: _Req, leg: _Leg) -> None:
        if leg.stopped is not None:
            return
        leg.first = self.now
        if leg is req.target:
            return  # a migration target: the switch is scheduled at launch
        if req.winner is not None:
            return
        self._first_token(req, leg, self.now)
        self._device_stream(req, leg, leg.index0)

    def _device_times(self, req: _Req, leg: _Leg, lo: int, hi: int) -> np.ndarray:
        """User times of the device leg's tokens with indices [lo, hi)."""
        j = np.arange(lo - leg.index0, hi - leg.index0, dtype=float)
        return leg.first + j * req.g

    def _device_stream(self, req: _Req, leg: _Leg, lo: int) -> None:
        """Deliver the device source's tokens from index ``lo`` on, up to a migration launch."""
        n = req.n
        if req.migrate_at is not None and req.target is None:
            k = self._launch_index(req, lo, self._device_times(req, leg, lo, n))
            if k is not None:
                self._deliver(req, leg, self._device_times(req, leg, lo, k))
                self._push(float(req.times[-1][-1]), _LAUNCH, req)
                return
        times = self._device_times(req, leg, lo, n)
        self._deliver(req, leg, times)
        leg.produced = n - leg.index0
        self._push(float(times[-1]), _COMPLETE, req)

    def _launch_index(self, req: _Req, lo: int, times: np.ndarray) -> int | None:
        """The delivered count k (>= migrate_at) after which the live rule launches the target:
        the unread buffer hides t_m at reading speed. ``times``: tokens lo, lo+1, ... ."""
        k = np.arange(lo + 1, lo + 1 + times.size)  # delivered count after each token
        ok = k >= req.migrate_at
        if not ok.any():
            return None
        rc = self.s.migration.read_tps
        read = 1 + np.floor(rc * (times - req.t0))
        unread = k - np.minimum(k, read)
        t_m = self._t_m(req, req.migrate_to, req.plen + k)
        hit = np.flatnonzero(ok & (unread >= rc * t_m) & (k < req.n))
        return int(k[hit[0]]) if hit.size else None

    def _t_m(self, req: _Req, target: EndpointKind, ctx: np.ndarray) -> np.ndarray:
        if target is D:
            return np.asarray(req.dev.ttft(ctx), dtype=float) + req.dev.tbt_s
        base = migration_latency(target, 0, self.server, req.dev, self.s.migration)
        return base + self.server.ttft_per_prompt_token_s * ctx

    def _deliver(self, req: _Req, leg: _Leg, times: np.ndarray) -> None:
        if times.size == 0:
            return
        req.times.append(times)
        req.ndel += int(times.size)
        if req.sources and req.sources[-1][0] is leg.kind:
            req.sources[-1] = (leg.kind, req.sources[-1][1] + int(times.size))
        else:
            req.sources.append((leg.kind, int(times.size)))

    def _server_tokens(self, req: _Req, leg: _Leg, e: Emission) -> None:
        if req.done:
            return
        times = e.times + self.half
        leg.produced += int(times.size)
        if leg.first is None:
            leg.first = float(times[0])
        if leg.role == "m":  # a server migration target
            if req.active is leg:
                self._deliver(req, leg, times)
                if e.finished:
                    self._push(float(times[-1]), _COMPLETE, req)
            elif leg is req.target:
                req.stash.append(times)
                if not req.switching and leg.first <= req.deadline:
                    req.switching = True
                    self._push(leg.first, _SWITCH, req, leg)
            return
        if req.winner is None:
            self._first_token(req, leg, float(times[0]))
        if leg is not req.active:
            return  # a cancelled loser's last step
        if req.target is not None:
            req.held.append(times)  # the target will continue after what was delivered
            if e.finished:
                self._push(float(times[-1]), _SRC_END, req, leg)
            return
        if req.migrate_at is not None:
            k = self._launch_index(req, req.ndel, times)
            if k is not None:
                cut = k - req.ndel
                self._deliver(req, leg, times[:cut])
                req.held.append(times[cut:])
                self._push(float(times[cut - 1]), _LAUNCH, req)
                if e.finished:
                    self._push(float(times[-1]), _SRC_END, req, leg)
                return
            if leg.seq is not None and req.ndel + times.size >= req.migrate_at:
                leg.seq.watch = leg.seq.out  # watch every token until the launch
        self._deliver(req, leg, times)
        if e.finished:
            self._push(float(times[-1]), _COMPLETE, req)

    def _launch(self, req: _Req) -> None:
        if req.done or req.target is not None or req.migrate_to is None:
            return
        k = req.ndel
        rc = self.s.migration.read_tps
        read = 1 + math.floor(rc * (self.now - req.t0))
        unread = k - min(k, read)
        req.deadline = self.now + unread / rc
        req.migrate_at = None  # launched once
        target = self._start_leg(req, req.migrate_to, k, role="m")
        req.target = target
        src = req.active
        if src.seq is not None:
            src.seq.watch = None
        if target.kind is D and target.granted:  # else: when it gets its slot
            self._schedule_switch(req, target)
        self._push(req.deadline, _DEADLINE, req, target)
        if src.kind is D:  # the device source keeps going: its tokens are held
            end = float(self._device_times(req, src, req.n - 1, req.n)[0])
            req.held.append(self._device_times(req, src, k, req.n))
            self._push(end, _SRC_END, req, src)

    def _schedule_switch(self, req: _Req, target: _Leg) -> None:
        """A device target's first token is known once it has its slot: the switch happens then
        if that is before the buffer's deadline."""
        if req.switching:
            return
        t_first = target.start + float(req.dev.ttft(target.ctx))
        if t_first <= req.deadline:
            req.switching = True
            self._push(t_first, _SWITCH, req, target)

    def _switch(self, req: _Req, target: _Leg) -> None:
        if req.done or req.target is not target or target.stopped is not None:
            return
        src = req.active
        self._stop(req, src)
        req.held = []
        req.active = target
        req.target = None
        req.migrated_at = target.index0
        req.migrate_at = None
        if target.kind is D:
            target.first = self.now
            self._device_stream(req, target, target.index0)
            target.produced = req.n - target.index0
        else:
            self._flush_stash(req, target)
            if target.seq is not None and target.seq.out >= target.seq.max_tokens:
                self._push(float(req.times[-1][-1]), _COMPLETE, req)

    def _flush_stash(self, req: _Req, leg: _Leg) -> None:
        for t in req.stash:
            self._deliver(req, leg, t)
        req.stash = []

    def _abandon(self, req: _Req) -> None:
        """The target missed the buffer's deadline (or failed): the source's held tokens go out
        now and the source goes on."""
        target = req.target
        if target is None or req.done:
            return
        self._stop(req, target)
        req.target = None
        req.switching = False
        req.stash = []
        req.migrate_at = None
        src = req.active
        held, req.held = req.held, []
        if src.kind is D:
            held_n = sum(int(h.size) for h in held)
            lo = req.ndel
            times = self._device_times(req, src, lo, lo + held_n)
            self._deliver(req, src, np.maximum(times, self.now))
            rest = self._device_times(req, src, lo + held_n, req.n)
            self._deliver(req, src, rest)
            src.produced = req.n - src.index0
            self._push(float(req.times[-1][-1]), _COMPLETE, req)
        else:
            for h in held:
                self._deliver(req, src, np.maximum(h, self.now))
            if src.seq is not None and src.seq.out >= src.seq.max_tokens:
                self._push(max(self.now, float(req.times[-1][-1])), _COMPLETE, req)

    def _source_end(self, req: _Req, src: _Leg) -> None:
        """The source finished before the switch: nothing left to move."""
        if req.done or req.active is not src:
            return
        if req.target is not None:
            self._stop(req, req.target)
            req.target = None
            req.switching = False
            req.stash = []
        for h in req.held:
            self._deliver(req, src, np.maximum(h, self.now))
        req.held = []
        if src.kind is D:
            src.produced = req.n - src.index0
        self._push(self.now, _COMPLETE, req)

    def _complete(self, req: _Req) -> None:
        if req.done:
            return
        if req.ndel < req.n:
            return  # stale: a switch or an abandon re-planned the delivery
        self._finalize(req)

    def _finalize(self, req: _Req, error: str | None = None) -> None:
        req.done = True
        for leg in req.legs:
            if leg.stopped is None:
                leg.stopped = self.now
            if leg.kind is D:
                self._free(req, leg, self.now)
        times = np.concatenate(req.times) if req.times else np.zeros(0)
        o = RequestOutcome(
            request_id=req.rid,
            arrival=req.arrival,
            prompt_tokens=req.plen,
            token_times=times,  # an array: observe() only takes its length and first entry
            first_token_from=req.winner,
            migrated_at=req.migrated_at,
            server_started=any(x.kind is S and x.index0 == 0 for x in req.legs),
            device_started=any(x.kind is D and x.index0 == 0 and x.granted for x in req.legs),
            error=error,
        )
        o.token_sources = [k for k, c in req.sources for _ in range(c)]
        gpu = 0.0
        for leg in req.legs:
            if leg.kind is S:
                o.server_prompt_tokens += prompt_charge(S, leg.ctx)
                o.server_output_tokens += leg.seq.out if leg.seq is not None else 0
                gpu += leg.seq.gpu_s if leg.seq is not None else 0.0
            else:  # a device stream cancelled while it waited for its slot did no work
                o.device_prompt_tokens += prompt_charge(D, leg.ctx, started=leg.granted)
                o.device_output_tokens += leg.produced
        for leg in req.legs:  # cancelled server sequences no longer in a replica
            if leg.kind is S and leg.seq is not None:
                self.by_sid.pop(leg.seq.id, None)
        if self.preset.usd_per_hour > 0:
            o.server_cost = gpu * self.preset.usd_per_hour / 3600.0
        else:
            o.server_cost = self.server.prices.cost(o.server_prompt_tokens, o.server_output_tokens)
        o.device_energy_j = req.dev.energy_j(o.device_prompt_tokens + o.device_output_tokens)
        self.gpu_s.append(gpu)
        self.finished.append(o)
        if error is None:
            if req.box is not None:  # the device's running mean of finished lengths
                req.box.mean_out += self.s.length_ewma_alpha * (times.size - req.box.mean_out)
            self.policy.observe(o)


def run_causal(
    policy,
    records: Sequence[TraceRecord],
    preset: ServerPreset,
    device: DeviceProfile,
    settings: CausalSettings | None = None,
    regime: Regime | None = None,
    devices: Sequence[DeviceProfile] | None = None,
    device_ids: Sequence[Hashable] | None = None,
) -> CausalResult:
    """Replay ``records`` through ``policy`` against ``settings.replicas`` replicas of ``preset``
    (``devices``: each request's device profile, default ``device`` for all; ``device_ids``:
    each request's device, see ``CausalSim.run``).

    The summary adds, to ``metrics.summarize``'s (``refused`` among them), ``device_wait_mean`` /
    ``device_wait_p99``: seconds the device streams that got a slot waited for it (None without
    shared devices)."""
    settings = settings or CausalSettings()
    sim = CausalSim(policy, preset, device, settings)
    outs = sim.run(records, devices, device_ids)
    order = sorted(range(len(outs)), key=lambda j: int(outs[j].request_id))
    outs = [outs[j] for j in order]
    gpu = np.array([sim.gpu_s[j] for j in order])
    ok = [o for o in outs if o.error is None and len(o.token_times)]
    regime = regime or getattr(policy, "regime", None)
    summary = summarize(outs, regime, settings.expected_ttft, settings.tds)
    summary["device_cost"] = summary["device_energy_j"] * device.lambda_usd_per_j
    span = (max(float(o.token_times[-1]) for o in ok) - min(o.arrival for o in outs)) if ok else 0.0
    summary["server_gpu_s"] = float(gpu.sum())
    summary["server_cost_tokens"] = float(
        sum(sim.server.prices.cost(o.server_prompt_tokens, o.server_output_tokens) for o in outs)
    )
    summary["server_replica_usd"] = settings.replicas * span * preset.usd_per_hour / 3600.0
    summary["replica_busy"] = [r.stats.busy_s / span if span else 0.0 for r in sim.replicas]
    waits = sim.device_waits
    shared = bool(sim.boxes)
    summary["device_wait_mean"] = (float(np.mean(waits)) if waits else 0.0) if shared else None
    summary["device_wait_p99"] = (percentile(waits, 99) if waits else 0.0) if shared else None
    return CausalResult(
        outcomes=outs, server_gpu_s=gpu, summary=summary,
        replica_samples=[r.stats.samples for r in sim.replicas],
        replica_busy_s=[r.stats.busy_s for r in sim.replicas], events=sim.n_events,
        device_waits=list(waits),
    )  # fmt: skip


CAUSAL_ROW_KEYS = (
    "policy", "regime", "budget", "budget_used", "migration", "ttft_mean", "ttft_p50", "ttft_p90",
    "ttft_p99", "tbt_p99", "qoe_mean", "server_cost", "server_cost_tokens", "server_gpu_s",
    "device_energy_j", "migrations", "requests", "errors",
)  # fmt: skip
# With shared devices (settings.users): refused requests and the wait for a device slot.
DEVICE_QUEUE_ROW_KEYS = ("refused", "device_wait_mean", "device_wait_p99")


def causal_sweep(
    records: Sequence[TraceRecord],
    preset: ServerPreset,
    device: DeviceProfile,
    regime: Regime,
    budgets: Sequence[float],
    policies: Sequence[str],
    migration: Sequence[bool] = (False, True),
    settings: CausalSettings | None = None,
    window: int = 2000,
    recompute_every: int = 100,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """One row per policy x budget x migration setting (each a full causal replay: with load,
    a policy's decisions change the server it then observes, so nothing is shared)."""
    settings = settings or CausalSettings()
    server = preset_profile(preset)
    cells = [(p, b, m) for p in policies for b in budgets for m in migration]
    rows = []
    for j, (name, b, mig) in enumerate(cells):
        rows.append(causal_cell(records, preset, device, regime, name, b, mig, settings, window,
                                recompute_every, server))  # fmt: skip
        if progress is not None:
            progress(j + 1, len(cells), f"{name} b={b:g} migration {'on' if mig else 'off'}")
    return rows


def causal_cell(
    records, preset, device, regime, name, budget, mig, settings, window=2000, recompute_every=100,
    server: ServerProfile | None = None,
) -> dict:  # fmt: skip
    """One cell of a sweep (also what a Ray task runs)."""
    cfg = PolicyConfig(
        regime=regime, budget=budget, migration=mig, window=window,
        recompute_every=recompute_every, seed=settings.seed,
    )  # fmt: skip
    policy = make_policy(name, cfg, server or preset_profile(preset), device)
    res = run_causal(policy, records, preset, device, settings, regime)
    row = {"policy": name, "regime": regime.value, "budget": budget, "migration": mig}
    keys = CAUSAL_ROW_KEYS + (DEVICE_QUEUE_ROW_KEYS if settings.users is not None else ())
    row.update({k: res.summary.get(k) for k in keys if k not in row})
    return row
