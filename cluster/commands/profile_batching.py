"""`disco profile --fit-batching`: fit a continuous-batching server preset from a live server.

A GPU owner points it at their own OpenAI-compatible ``/v1/completions`` server (``vllm serve``,
Ray Serve, ...) and gets a server-preset JSON (``disco.scheduler.presets``) whose step model is
fitted to that server, so the simulator and the emulated replicas run at its speed.

What it measures, over SSE streams timed token by token as chunks arrive (the ``openai`` engine):
(a) single requests on the otherwise idle server at each ``--prompt-lens`` (TTFT, and the decode
gaps of one stream at that context), repeated and reduced to medians; (b) for each
``--concurrency`` N, N requests started together with the longest prompt whose N sequences fit
the KV cache (so the high-load corner, many long sequences, is measured, not extrapolated), timed
over the window where all N decode. ``disco.scheduler.batching_fit`` turns those into the step model (its docstring
says how). Every prompt is different (no prefix-cache hits), cut to length from real English text
with the server's own tokenizer where it offers one (vLLM's ``/tokenize``), otherwise with the
estimate the testbed's engines use.

Bounds: the number of requests is fixed by the flags and capped (``MAX_REQUESTS``), each request
has ``--timeout`` seconds and the whole run ``--time-limit``; only ``--target`` is contacted. The
request asks for ``"ignore_eos": true`` so every output has ``--max-tokens`` tokens (vLLM honours
it); a server that rejects the field is measured without it, and a stream that ends early only
shortens the window it is measured over.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from disco.cluster.errors import CliError

MAX_REQUESTS = 4096
MAX_CONCURRENCY = 1024
DEFAULT_LENS = "32,128,512,1024"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the fit mode (cheap: argparse only)."""
    g = p.add_argument_group("--fit-batching: fit a server preset from a live OpenAI server")
    g.add_argument(
        "--fit-batching",
        action="store_true",
        help="measure a live OpenAI-compatible /v1/completions server and write a "
        "continuous-batching server preset (step model fitted to it)",
    )
    g.add_argument("--target", help="the server's base URL, e.g. http://127.0.0.1:8000")
    g.add_argument(
        "--concurrency", help="comma-separated numbers of concurrent streams (default 1,2,4,8,16)"
    )
    g.add_argument("--max-num-seqs", type=int, help="the server's max running sequences (256)")
    g.add_argument(
        "--max-batched-tokens", type=int, help="the server's token budget per step (8192)"
    )
    g.add_argument(
        "--kv-tokens",
        type=int,
        help="the server's KV cache capacity in tokens (default: read from vLLM's /metrics)",
    )
    g.add_argument("--usd-per-hour", type=float, help="price of one replica per hour (0)")
    g.add_argument("--hardware", help="what the server runs on, recorded in the preset")
    g.add_argument("--timeout", type=float, help="seconds one request may take (60)")
    g.add_argument("--time-limit", type=float, help="seconds the whole measurement may take (900)")


# Fit-mode flags and their defaults; given without --fit-batching they are an error.
FIT_DEFAULTS: dict[str, Any] = {
    "target": None,
    "concurrency": "1,2,4,8,16",
    "max_num_seqs": 256,  # vLLM's defaults
    "max_batched_tokens": 8192,
    "kv_tokens": None,
    "usd_per_hour": 0.0,
    "hardware": "",
    "timeout": 60.0,
    "time_limit": 900.0,
}


@dataclass(frozen=True, slots=True)
class Stream:
    """One measured stream: token arrival times from the request's start."""

    phase: str  # "ttft" (a lone request) or "batch" (one of ``concurrency`` started together)
    run: int  # streams started together share it
    concurrency: int
    target: int  # requested prompt length
    prompt_tokens: int  # as counted when it was built
    times_s: list[float]


@dataclass(frozen=True)
class Plan:
    lens: list[int]
    concurrency: list[int]
    max_tokens: int
    repeats: int
    warmup: int
    timeout_s: float
    time_limit_s: float
    batch_len: int = 0  # prompt length of the concurrent runs (set once the KV size is known)

    @property
    def requests(self) -> int:
        return 1 + self.warmup + self.repeats * (len(self.lens) + sum(self.concurrency))


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CliError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or vals[0] <= 0:
        raise CliError(f"{flag} must be positive integers, got {text!r}")
    return vals


def plan_from(args: argparse.Namespace) -> Plan:
    """Check the flags (CliError on anything wrong) and fill the fit mode's defaults."""
    if args.endpoint or args.base_url:
        raise CliError("--fit-batching measures --target; it takes no --endpoint or --base-url")
    for k, v in FIT_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.target:
        raise CliError("--fit-batching needs --target URL (the server's base URL)")
    if not re.match(r"^https?://[^/\s]+", args.target):
        raise CliError(f"--target must be an http(s) URL, got {args.target!r}")
    lens = _ints("--prompt-lens", args.prompt_lens or DEFAULT_LENS)
    conc = _ints("--concurrency", args.concurrency)
    if len(lens) < 2:
        raise CliError("--prompt-lens needs >= 2 different lengths to fit prefill time")
    if len(conc) < 2:
        raise CliError("--concurrency needs >= 2 different values to fit per-sequence time")
    for flag, v in (("--max-num-seqs", args.max_num_seqs),
                    ("--max-batched-tokens", args.max_batched_tokens)):  # fmt: skip
        if v <= 0:
            raise CliError(f"{flag} must be > 0, got {v}")
    if args.kv_tokens is not None and args.kv_tokens <= 0:
        raise CliError(f"--kv-tokens must be > 0, got {args.kv_tokens}")
    if conc[-1] > min(args.max_num_seqs, MAX_CONCURRENCY):
        raise CliError(
            f"--concurrency {conc[-1]} exceeds --max-num-seqs {args.max_num_seqs} "
            f"(or the cap of {MAX_CONCURRENCY}): extra streams would queue, not batch"
        )
    if args.max_tokens < 2:
        raise CliError("--max-tokens must be >= 2: inter-token gaps need two tokens")
    if args.repeats <= 0 or args.warmup < 0:
        raise CliError("--repeats must be > 0 and --warmup >= 0")
    if args.timeout <= 0 or args.time_limit <= 0:
        raise CliError("--timeout and --time-limit must be > 0 seconds")
    if args.usd_per_hour < 0:
        raise CliError("--usd-per-hour must be >= 0")
    plan = Plan(lens, conc, args.max_tokens, args.repeats, args.warmup, args.timeout,
                args.time_limit)  # fmt: skip
    if plan.requests > MAX_REQUESTS:
        raise CliError(
            f"these flags make {plan.requests} requests (cap {MAX_REQUESTS}): "
            "use fewer --repeats, prompt lengths or concurrencies"
        )
    return plan


# ---- what the server tells about itself (each optional) ----------------------------------------


def _root(url: str) -> str:
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _get(client: Any, url: str) -> Any | None:
    """The 200 answer to a GET, or None; an unreachable server is a CliError."""
    import httpx

    try:
        resp = client.get(url)
    except httpx.TransportError as e:
        raise CliError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    return resp if resp.status_code == 200 else None


def served_model(client: Any, target: str) -> str:
    resp = _get(client, f"{_root(target)}/v1/models")
    try:
        return str(resp.json()["data"][0]["id"]) if resp is not None else ""
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def kv_from_metrics(client: Any, target: str) -> tuple[int, int] | None:
    """(KV tokens, block size) from vLLM's ``vllm:cache_config_info`` Prometheus labels."""
    resp = _get(client, f"{_root(target)}/metrics")
    if resp is None:
        return None
    line = next((x for x in resp.text.splitlines() if x.startswith("vllm:cache_config_info{")), "")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    try:
        blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return (blocks * size, size) if blocks > 0 and size > 0 else None


@dataclass
class ServerTokenizer:
    """The server's own token count (vLLM's ``POST /tokenize``), for the prompt builder."""

    client: Any
    url: str
    model: str
    name: str = "server /tokenize"

    def count(self, text: str) -> int:
        resp = self.client.post(self.url, json={"model": self.model, "prompt": text})
        resp.raise_for_status()
        return int(resp.json()["count"])

    @classmethod
    def probe(cls, client: Any, target: str, model: str) -> ServerTokenizer | None:
        import httpx

        tok = cls(client, f"{_root(target)}/tokenize", model)
        try:
            return tok if tok.count("hello world") > 0 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None


# ---- measuring ---------------------------------------------------------------------------------


async def _timed(endpoint: Any, prompt: str, max_tokens: int, timeout_s: float) -> list[float]:
    """Token arrival times (seconds since the request was made)."""
    from disco.scheduler.endpoint import GenerationRequest

    async def go() -> list[float]:
        t0 = time.monotonic()
        return [ev.time - t0 async for ev in endpoint.stream(GenerationRequest(prompt, max_tokens))]

    try:
        times = await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        raise CliError(f"a request took longer than --timeout {timeout_s:g} s") from None
    if not times:
        raise CliError(f"{endpoint.name} returned no tokens")
    return times


async def _together(endpoint: Any, prompts: Sequence[str], plan: Plan) -> list[list[float]]:
    """Start the requests at once; if one fails, cancel the others."""
    tasks = [
        asyncio.ensure_future(_timed(endpoint, p, plan.max_tokens, plan.timeout_s)) for p in prompts
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(endpoint: Any, prompts: dict[str, Any], plan: Plan) -> list[Stream]:
    from disco.scheduler.batching_fit import gap_point

    streams: list[Stream] = []
    for p in prompts["warmup"]:
        await _timed(endpoint, p.text, min(4, plan.max_tokens), plan.timeout_s)
    for r in range(plan.repeats):
        for n in plan.lens:  # interleaved, so slow drift spreads over all lengths
            p = prompts["ttft"][r, n]
            times = await _timed(endpoint, p.text, plan.max_tokens, plan.timeout_s)
            streams.append(Stream("ttft", len(streams), 1, n, p.tokens, times))
            print(f"  repeat {r + 1}/{plan.repeats}  prompt {p.tokens:5d} tok  "
                  f"TTFT {times[0] * 1e3:8.1f} ms  ({len(times)} tok)")  # fmt: skip
        for c in plan.concurrency:
            batch = prompts["batch"][r, c]
            got = await _together(endpoint, [p.text for p in batch], plan)
            run = len(streams)
            streams += [Stream("batch", run, c, p.target, p.tokens, t)
                        for p, t in zip(batch, got, strict=True)]  # fmt: skip
            point = gap_point([(p.tokens, t) for p, t in zip(batch, got, strict=True)])
            gap = f"{point.gap_s * 1e3:7.2f} ms" if point else "n/a (a stream ended at once)"
            print(f"  repeat {r + 1}/{plan.repeats}  {c:4d} streams  mean gap {gap}")
    return streams


def build_prompts(counter: Any, plan: Plan, seed: int) -> dict[str, Any]:
    """Every prompt of the run, built before any is timed (a remote tokenizer is slow)."""
    from disco.loadgen.prompts import Corpus, PromptBuilder

    builder = PromptBuilder(Corpus.stdlib(), counter, seed=seed)
    return {
        "probe": builder.build(min(plan.lens)),
        "warmup": [builder.build(min(plan.lens)) for _ in range(plan.warmup)],
        "ttft": {(r, n): builder.build(n) for r in range(plan.repeats) for n in plan.lens},
        "batch": {
            (r, c): [builder.build(plan.batch_len) for _ in range(c)]
            for r in range(plan.repeats)
            for c in plan.concurrency
        },
    }


def points(streams: list[Stream]) -> tuple[list[Any], list[Any]]:
    """Medians over repeats: TTFT and a lone stream's gaps per prompt length, the gap of each
    concurrency's runs (every run measured over its own all-decoding window)."""
    from disco.scheduler.batching_fit import GapPoint, TtftPoint, gap_point

    def median(group: list[GapPoint | None]) -> GapPoint | None:
        ok = [g for g in group if g is not None]
        if not ok:
            return None
        return GapPoint(ok[0].concurrency, statistics.median(g.context_tokens for g in ok),
                        statistics.median(g.gap_s for g in ok))  # fmt: skip

    lone: dict[int, list[Stream]] = {}
    runs: dict[int, dict[int, list[Stream]]] = {}  # concurrency -> run -> its streams
    for s in streams:
        if s.phase == "ttft":
            lone.setdefault(s.target, []).append(s)
        else:
            runs.setdefault(s.concurrency, {}).setdefault(s.run, []).append(s)
    ttft = [
        TtftPoint(
            statistics.median(s.prompt_tokens for s in g),
            statistics.median(s.times_s[0] for s in g),
        )
        for _, g in sorted(lone.items())
    ]
    gaps = [median([gap_point([(s.prompt_tokens, s.times_s)]) for s in g]) for g in lone.values()]
    for _, by_run in sorted(runs.items()):
        gaps.append(median([gap_point([(s.prompt_tokens, s.times_s) for s in run])
                            for run in by_run.values()]))  # fmt: skip
    return ttft, [g for g in gaps if g is not None]


# ---- the command -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import httpx

    from disco.cluster.commands.profile import _EngineCounter, machine
    from disco.device_agents.engines.openai_http import OpenAIEndpoint
    from disco.scheduler.batching_fit import fit_batching
    from disco.scheduler.endpoint import EndpointFailedError, InvalidRequestError
    from disco.scheduler.presets import save_preset

    plan = plan_from(args)
    target = args.target.rstrip("/")
    with httpx.Client(timeout=min(10.0, plan.timeout_s)) as client:
        listed = served_model(client, target)  # also the check that the server answers
        model = args.model or listed
        if not model:
            raise CliError(f"--model is required: {target} does not list its models (/v1/models)")
        kv, block = args.kv_tokens, None
        if kv is None:
            found = kv_from_metrics(client, target)
            if found is None:
                raise CliError(
                    "--kv-tokens is required: the server does not report its KV cache size "
                    "(vLLM logs it at startup as 'GPU KV cache size: N tokens')"
                )
            kv, block = found
        if plan.lens[-1] + plan.max_tokens > kv:
            raise CliError(
                f"--prompt-lens {plan.lens[-1]} + --max-tokens do not fit {kv} KV tokens"
            )
        # Preemption would change the batch mid-measurement: concurrent runs must fit the cache.
        c_max = plan.concurrency[-1]
        fits = [n for n in plan.lens if c_max * (n + plan.max_tokens) <= kv]
        if not fits:
            raise CliError(
                f"--concurrency {c_max} streams of {plan.lens[0]}+{plan.max_tokens} tokens do "
                f"not fit {kv} KV tokens: lower --concurrency"
            )
        plan = dataclasses.replace(plan, batch_len=fits[-1])
        server_tok = ServerTokenizer.probe(client, target, model)

        def endpoint(ignore_eos: bool) -> OpenAIEndpoint:
            return OpenAIEndpoint(
                target,
                model=model,
                api_key=os.environ.get(args.api_key_env),
                connect_timeout_s=min(10.0, plan.timeout_s),
                read_timeout_s=plan.timeout_s,
                extra_body={"ignore_eos": True} if ignore_eos else {},
            )

        probe = endpoint(True)
        counter = server_tok or _EngineCounter(probe, "estimate (~4 characters per token)")
        print(f"fitting a batching preset to {target} (model {model}): prompt lengths "
              f"{plan.lens}, concurrency {plan.concurrency} at {plan.batch_len} tokens, "
              f"{plan.max_tokens} tokens out, "
              f"{plan.requests} requests; token counts from {counter.name}")  # fmt: skip
        try:
            prompts = build_prompts(counter, plan, args.seed)
        except httpx.HTTPError as e:
            raise CliError(f"{target} failed to count tokens: {e}") from None

    async def go() -> tuple[list[Stream], bool]:
        ep, ignore_eos = probe, True
        try:
            try:
                await _timed(ep, prompts["probe"].text, 2, plan.timeout_s)
            except InvalidRequestError:  # e.g. a strict server that rejects ignore_eos
                await ep.close()
                ep, ignore_eos = endpoint(False), False
                await _timed(ep, prompts["probe"].text, 2, plan.timeout_s)
            return await asyncio.wait_for(measure(ep, prompts, plan), plan.time_limit_s), ignore_eos
        finally:
            await ep.close()

    try:
        streams, ignore_eos = asyncio.run(go())
    except (EndpointFailedError, InvalidRequestError) as e:
        raise CliError(f"measuring {target} failed: {e}") from None
    except asyncio.TimeoutError:
        raise CliError(f"measuring took longer than --time-limit {plan.time_limit_s:g} s") from None

    ttft, gaps = points(streams)
    label = Path(model).name or "server"
    name = args.name or f"fitted-{label}"
    extra = {"block_size": block} if block else {}
    try:
        fit = fit_batching(
            name,
            ttft,
            gaps,
            kv_tokens=kv,
            max_num_seqs=args.max_num_seqs,
            max_batched_tokens=args.max_batched_tokens,
            usd_per_hour=args.usd_per_hour,
            input_per_mtok=args.price_in,
            output_per_mtok=args.price_out,
            model=model,
            hardware=args.hardware,
            source=f"fitted by disco profile --fit-batching on {target}",
            **extra,
        )
    except ValueError as e:
        raise CliError(f"cannot fit a batching model to {target}: {e}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_preset(
        fit.preset,
        out,
        measured=True,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine(),
        target=target,
        ignore_eos=ignore_eos,
        token_counter=counter.name,
        floor_s=fit.floor_s,
        fit={
            "error": fit.fit_error,
            "ttft_error": fit.ttft_error,
            "gap_error": fit.gap_error,
            "context_fitted": fit.context_fitted,
        },
        points={"ttft": [asdict(p) for p in ttft], "gaps": [asdict(g) for g in gaps]},
        samples=[asdict(s) for s in streams],
    )
    s = fit.preset.step
    print(f"wrote {out}: base {s.base_s * 1e3:.3f} ms, prefill {s.prefill_token_s * 1e6:.3f} us/tok, "
          f"decode {s.decode_seq_s * 1e6:.2f} us/seq, context {s.context_token_s * 1e9:.3f} ns/tok, "
          f"floor {fit.floor_s * 1e3:.2f} ms; fit error {fit.fit_error:.1%} "
          f"(TTFT {fit.ttft_error:.1%}, gaps {fit.gap_error:.1%})")  # fmt: skip
    return 0
