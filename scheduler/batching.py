"""A continuous-batching server replica, as a pure model (DESIGN.md section 8).

One object drives three things: the causal simulator (virtual clock), the emulated Serve replica
(real clock: every stream of a replica shares its batch clock) and the fit from a live server
(``disco profile --fit-batching``). It is modelled on the vLLM v1 scheduler
(``vllm/v1/core/sched/scheduler.py``), simplified where that changes no latency:

- A step is one forward pass. Its token budget (``max_batched_tokens``) is filled first by the
  running sequences in admission order (a decode takes one token, an unfinished prefill the next
  chunk of its prompt: chunked prefill), then by waiting sequences in arrival order while the budget,
  the cap on running sequences (``max_num_seqs``) and the KV cache allow.
- KV cache: ``kv_tokens`` of capacity, allocated in blocks of ``block_size`` tokens as tokens are
  computed. When a running sequence needs a block and none is free, the most recently admitted
  sequence is preempted (its KV freed, recomputed later: vLLM's recompute preemption) and goes
  back to the front of the queue.
- Prefix cache (on by default, as in vLLM): a finished, aborted or preempted sequence leaves its
  KV behind as evictable blocks under its cache key; a later sequence with the same key (the
  migration target's or a failover's re-prefill of the same prompt on this replica) skips the
  cached prompt tokens. Evicted least recently used when space is needed.
- Step time: a fitted linear model of the step's prefill tokens, decode sequences and the context
  tokens those decodes attend to (``StepModel``; Vidur profiles operators, a linear fit is enough
  here and its fit error is carried with the preset).
- A token is emitted at the end of the step that computes the last token of a sequence's context
  (its prompt, then each new token): the first token ends the prefill, each later one a decode.

The model is clock-agnostic: ``next_step(now)`` plans a step that starts at ``now`` and returns its
end times; the driver waits (virtually or really) and calls ``finish(step)``. Aborts may arrive
while a step runs: the aborted sequence gets no token after its abort time.

For speed in the simulator, ``next_step(now, horizon)`` fast-forwards: while every running
sequence is decoding and nothing can be admitted, the next steps have a known composition (the
context grows by one token per sequence per step), so the steps that start before ``horizon`` (the
next outside event) are planned at once, up to the first sequence that finishes. The live driver
passes no horizon and gets one step at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class StepModel:
    """step_s = base_s + prefill_token_s * P + decode_seq_s * D + context_token_s * C.

    P: prefill tokens computed in the step; D: decode sequences; C: context tokens those decode
    sequences attend to. ``fit_error``: median absolute relative error on the data it was fitted on.
    """

    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float = 0.0
    fit_error: float | None = None

    def __post_init__(self) -> None:
        for k in ("base_s", "prefill_token_s", "decode_seq_s", "context_token_s"):
            if getattr(self, k) < 0:
                raise ValueError(f"step model: {k} must be >= 0, got {getattr(self, k)}")
        if self.base_s + self.prefill_token_s + self.decode_seq_s <= 0:
            raise ValueError("step model: a step must take some time")

    def time(self, prefill_tokens: float, decode_seqs: float, context_tokens: float) -> float:
        return (
            self.base_s
            + self.prefill_token_s * prefill_tokens
            + self.decode_seq_s * decode_seqs
            + self.context_token_s * context_tokens
        )

    @classmethod
    def fit(
        cls,
        prefill_tokens: np.ndarray,
        decode_seqs: np.ndarray,
        context_tokens: np.ndarray,
        step_s: np.ndarray,
    ) -> StepModel:
        """Non-negative least squares over (1, P, D, C) by active-set elimination (4 terms)."""
        x = np.column_stack(
            [np.ones(len(step_s)), prefill_tokens, decode_seqs, context_tokens]
        ).astype(float)
        y = np.asarray(step_s, dtype=float)
        if y.size < 2:
            raise ValueError("fitting a step model needs at least 2 measured steps")
        active = [j for j in range(4) if np.ptp(x[:, j]) > 0 or j == 0]
        coef = np.zeros(4)
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            if np.all(sol >= 0):
                coef[:] = 0.0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
        pred = x @ coef
        err = float(np.median(np.abs(pred - y) / np.maximum(y, 1e-9)))
        return cls(*(float(c) for c in coef), fit_error=err)


@dataclass(frozen=True)
class ServerPreset:
    """A self-hosted replica type: engine limits, step time, and what a replica costs.

    ``usd_per_hour``: price of one replica's hardware per hour (server cost of a self-hosted preset
    is replica time). ``input_per_mtok``/``output_per_mtok``: a per-token list-price equivalent, so
    the policies' cost arithmetic (migration savings) and the per-token cost column still apply.
    """

    name: str
    step: StepModel
    kv_tokens: int
    max_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    prefix_caching: bool = True
    usd_per_hour: float = 0.0
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    model: str = ""
    hardware: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for k in ("kv_tokens", "max_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, k) <= 0:
                raise ValueError(f"server preset {self.name!r}: {k} must be > 0")
        if self.usd_per_hour < 0:
            raise ValueError(f"server preset {self.name!r}: usd_per_hour must be >= 0")

    def unloaded_ttft(self, prompt_tokens: float) -> float:
        """TTFT of one request on an idle replica: its prefill in budget-sized chunks."""
        chunks = max(1, math.ceil(prompt_tokens / self.max_batched_tokens))
        return chunks * self.step.base_s + self.step.prefill_token_s * prompt_tokens

    def unloaded_tbt(self, context_tokens: float = 1024.0) -> float:
        return self.step.time(0, 1, context_tokens)


class Seq:
    """One sequence on a replica (the model's view of a stream)."""

    __slots__ = (
        "id", "prompt", "max_tokens", "arrival", "key", "share", "computed", "out", "kv",
        "admitted", "aborted_at", "first_at", "gpu_s", "cache_hit", "preemptions",
        "watch",
    )  # fmt: skip

    def __init__(
        self, sid: str, prompt: int, max_tokens: int, arrival: float, key: str | None, share: int
    ) -> None:
        self.id = sid
        self.prompt = prompt  # tokens to prefill (prompt + resumed prefix)
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.key = key  # prefix-cache key (the request's id: shared by its resumes)
        self.share = share  # leading tokens another sequence with this key may have computed
        self.computed = 0  # context tokens whose KV is computed
        self.out = 0  # tokens generated
        self.kv = 0  # KV tokens allocated (block-rounded)
        self.admitted = False
        self.aborted_at: float | None = None
        self.first_at: float | None = None
        self.gpu_s = 0.0  # replica time attributed to this sequence (for self-hosted cost)
        self.cache_hit = 0
        self.preemptions = 0
        # A driver that must see this sequence's token with index ``watch`` as its own step (to
        # act on it before later tokens exist: a migration's launch) sets it; fast-forward stops there.
        self.watch: int | None = None

    @property
    def ctx(self) -> int:
        return self.prompt + self.out

    @property
    def decoding(self) -> bool:
        return self.out > 0 and self.computed == self.ctx - 1


@dataclass(slots=True)
class Step:
    """A planned step (or a fast-forwarded run of ``len(ends)`` decode steps)."""

    start: float
    ends: np.ndarray  # end time of each sub-step
    batch: list[tuple[Seq, int]]  # (sequence, tokens it computes in the first sub-step)
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int

    @property
    def end(self) -> float:
        return float(self.ends[-1])


@dataclass(slots=True)
class Emission:
    """Tokens one sequence got from a step: ``count`` tokens at ``times``, the first of them
    with index ``first_index`` (0 = the sequence's first token)."""

    seq: Seq
    first_index: int
    times: np.ndarray
    finished: bool


@dataclass(slots=True)
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    preemptions: int = 0
    cache_hit_tokens: int = 0
    prefill_tokens: int = 0
    tokens: int = 0
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, queue, running, kv


class Replica:
    """The continuous-batching replica model. Not thread-safe; one driver owns it."""

    def __init__(self, preset: ServerPreset, name: str = "replica-0", record: bool = False) -> None:
        self.preset = preset
        self.name = name
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.seqs: dict[str, Seq] = {}
        self.kv_used = 0
        self.cache: OrderedDict[str, int] = OrderedDict()  # key -> cached tokens (LRU order)
        self.cached = 0
        self.stats = ReplicaStats()
        self.record = record  # sample queue / running / KV at every step (for plots)
        self.in_step: Step | None = None

    # ---- what drivers call ------------------------------------------------------------------

    def submit(
        self,
        sid: str,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
        *,
        cache_key: str | None = None,
        shared_tokens: int | None = None,
    ) -> Seq:
        """Queue a sequence. ``shared_tokens``: how many of its leading tokens another sequence
        with the same ``cache_key`` may have computed (the original prompt, for a resume whose
        generated text came from another model); all of them when None."""
        if sid in self.seqs:
            raise ValueError(f"{self.name}: sequence {sid!r} already submitted")
        if prompt_tokens <= 0 or max_tokens <= 0:
            raise ValueError(f"{self.name}: prompt and max tokens must be > 0")
        if prompt_tokens + max_tokens > self.preset.kv_tokens:
            raise ValueError(
                f"{self.name}: {prompt_tokens} + {max_tokens} tokens do not fit a KV cache of "
                f"{self.preset.kv_tokens} tokens"
            )
        share = prompt_tokens if shared_tokens is None else min(shared_tokens, prompt_tokens)
        seq = Seq(sid, prompt_tokens, max_tokens, now, cache_key, share)
        self.seqs[sid] = seq
        self.waiting.append(seq)
        return seq

    def cut(self, now: float) -> None:
        """Shorten a running decode run to the sub-steps that started before ``now`` (something
        outside changed: a new sequence arrived, one was aborted): the rest is planned anew."""
        step = self.in_step
        if step is None or len(step.ends) == 1:
            return
        starts = np.concatenate(([step.start], step.ends[:-1]))
        k = max(1, int(np.searchsorted(starts, now, side="left")))
        step.ends = step.ends[:k]

    def abort(self, sid: str, now: float) -> Seq | None:
        """Stop a sequence (cancel): no token after ``now``; its KV goes to the prefix cache."""
        seq = self.seqs.pop(sid, None)
        if seq is None:
            return None
        seq.aborted_at = now
        if seq.admitted and seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        return seq

    @property
    def load(self) -> int:
        """Ongoing sequences (what Ray Serve's power-of-two router compares)."""
        return len(self.waiting) + len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def next_step(self, now: float, horizon: float | None = None) -> Step | None:
        """Plan the step that starts at ``now`` (None: nothing to do). With a ``horizon``, a run
        of pure-decode steps that start before it is planned at once."""
        if self.in_step is not None:
            raise RuntimeError(f"{self.name}: a step is already running")
        if self.idle:
            return None
        step = self._schedule(now)
        if step is None:
            return None
        if horizon is not None and step.prefill_tokens == 0:
            self._fast_forward(step, horizon)
        self.in_step = step
        if self.record:
            self.stats.samples.append((now, len(self.waiting), len(self.running), self.kv_used))
        return step

    def finish(self, step: Step) -> list[Emission]:
        """Apply a planned step at its end; returns the tokens it produced."""
        if step is not self.in_step:
            raise RuntimeError(f"{self.name}: finishing a step that is not the running one")
        self.in_step = None
        k = len(step.ends)
        st = self.stats
        st.steps += k
        st.busy_s += step.end - step.start
        st.prefill_tokens += step.prefill_tokens
        emissions: list[Emission] = []
        total = step.end - step.start
        # Replica time per sequence: a single step splits by tokens computed; a decode run
        # gives every sequence an equal share of every sub-step.
        if k == 1:
            per_token = total / (sum(n for _, n in step.batch) or 1)
        else:
            per_seq = total / len(step.batch)
        finished: list[Seq] = []
        for seq, n in step.batch:
            seq.gpu_s += per_token * n if k == 1 else per_seq
            if seq.aborted_at is not None:
                # Aborted while the step ran (its KV is already released): a run of decode
                # steps still delivered the tokens that ended before the abort.
                if k > 1:
                    times = step.ends[step.ends <= seq.aborted_at]
                    if times.size:
                        emissions.append(Emission(seq, seq.out, times, True))
                        seq.out += int(times.size)
                        st.tokens += int(times.size)
                continue
            if k == 1:
                seq.computed += n
                if seq.computed < seq.ctx:
                    continue  # a prefill chunk: no token yet
                idx = seq.out
                seq.out += 1
                if idx == 0:
                    seq.first_at = step.end
            else:
                idx = seq.out
                seq.out += k
                seq.computed += k
            done = seq.out >= seq.max_tokens
            emissions.append(Emission(seq, idx, step.ends, done))
            st.tokens += k
            if done:
                finished.append(seq)
        if finished:
            gone = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in gone]
            for seq in finished:
                self.seqs.pop(seq.id, None)
                self._release(seq)
        return emissions

    # ---- scheduling -------------------------------------------------------------------------

    def _schedule(self, now: float) -> Step | None:
        p = self.preset
        budget = p.max_batched_tokens
        batch: list[tuple[Seq, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.ctx - seq.computed, budget)
            preempted_self = False
            while not self._alloc(seq, n):
                victim = self.running[-1]  # the latest admitted (never one scheduled before i)
                self._preempt(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break  # it was the last running sequence
            batch.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < p.max_num_seqs:
            seq = self.waiting[0]
            if not seq.admitted:
                self._hit_cache(seq)
            n = min(seq.ctx - seq.computed, budget)
            if not self._alloc(seq, n):
                break  # FCFS: the head waits for memory, so does everyone behind it
            self.waiting.popleft()
            seq.admitted = True
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        if not batch:
            return None
        prefill = decode = context = 0
        for seq, n in batch:
            if seq.decoding and n == 1:
                decode += 1
                context += seq.computed + 1
            else:
                prefill += n
        dur = p.step.time(prefill, decode, context)
        return Step(now, np.array([now + dur]), batch, prefill, decode, context)

    def _fast_forward(self, step: Step, horizon: float) -> None:
        """Extend a pure-decode step into a run while its composition is predictable."""
        # Nothing waiting can be admitted during the run: memory only frees when a sequence ends,
        # and the run stops at the first one that does.
        if step.end >= horizon or len(step.batch) != len(self.running):
            return
        d = step.decode_seqs
        remaining = min(_run_limit(s) for s, _ in step.batch)
        # Each sub-step needs one more KV slot per sequence; stop before any block is missing.
        b = self.preset.block_size
        free = self.preset.kv_tokens - self.kv_used - self.cached
        slack = min(s.kv - s.computed - 1 for s, _ in step.batch)  # room in allocated blocks
        k_mem = 1 + (free // (d * b)) * b + max(slack, 0)
        k = int(min(remaining, k_mem, 4096))
        if k <= 1:
            return
        m = self.preset.step
        j = np.arange(k)
        durs = m.base_s + m.decode_seq_s * d + m.context_token_s * (step.context_tokens + j * d)
        ends = step.start + np.cumsum(durs)
        starts = ends - durs
        k = int(np.searchsorted(starts, horizon, side="left"))  # sub-steps that start before it
        k = max(1, min(k, durs.size))
        step.ends = ends[:k]
        if k > 1:
            for seq, _ in step.batch:  # allocate the KV the run will write
                self._alloc(seq, k, force=True)

    # ---- memory -----------------------------------------------------------------------------

    def _blocks(self, tokens: int) -> int:
        b = self.preset.block_size
        return -(-tokens // b) * b

    def _alloc(self, seq: Seq, n: int, force: bool = False) -> bool:
        need = self._blocks(seq.computed + n) - seq.kv
        if need <= 0:
            return True
        free = self.preset.kv_tokens - self.kv_used - self.cached
        while need > free and self.cache:
            _, t = self.cache.popitem(last=False)  # evict the least recently used prefix
            self.cached -= t
            free += t
        if need > free and not force:
            return False
        seq.kv += need
        self.kv_used += need
        return True

    def _release(self, seq: Seq) -> None:
        """Free a sequence's KV; its full computed blocks stay as an evictable cached prefix."""
        self.kv_used -= seq.kv
        seq.kv = 0
        if not self.preset.prefix_caching or seq.key is None:
            return
        keep = seq.computed // self.preset.block_size * self.preset.block_size
        if keep <= 0:
            return
        old = self.cache.pop(seq.key, 0)
        new = max(old, keep)
        self.cache[seq.key] = new  # most recently used
        self.cached += new - old

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.computed = 0
        seq.admitted = False
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _hit_cache(self, seq: Seq) -> None:
        if not self.preset.prefix_caching or seq.key is None or seq.key not in self.cache:
            return
        cached = self.cache.pop(seq.key)
        self.cached -= cached
        # Reuse whole blocks of the shared prefix; the last context token is always recomputed.
        b = self.preset.block_size
        hit = min(cached, seq.share, seq.ctx - 1) // b * b
        if hit <= 0:
            return
        seq.computed = hit
        seq.kv = hit
        self.kv_used += hit
        seq.cache_hit = hit
        self.stats.cache_hit_tokens += hit


def _run_limit(seq: Seq) -> int:
    """Tokens a decode run may give ``seq`` (its first sub-step included)."""
    left = seq.max_tokens - seq.out
    if seq.watch is not None:
        left = min(left, max(1, seq.watch - seq.out + 1))
    return left


# ---- routing -------------------------------------------------------------------------------------


def power_of_two(loads: list[int], rng: np.random.Generator) -> int:
    """Ray Serve's default request router: two distinct replicas at random, the less loaded wins
    (ties: the first drawn)."""
    n = len(loads)
    if n == 1:
        return 0
    a, b = rng.choice(n, size=2, replace=False)
    return int(b) if loads[b] < loads[a] else int(a)
