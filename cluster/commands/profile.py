"""`disco profile`: measure an engine's TTFT against prompt length and its decode speed.

Writes a device profile (TTFT = a + l / prefill_tps fitted by least squares, median decode speed)
or a server profile (the measured TTFTs as an empirical distribution, the inter-token gaps), with
provenance (date, machine, engine, model, raw samples), in the JSON format that
``disco.scheduler.profiles.load_profile`` and the emulated engine read.

Prompts are real English text (``disco.loadgen.prompts``), cut to each length with the engine's
own tokenizer, and every measurement uses a different prompt so no run hits a prefix cache
warmed by an earlier one.

``--fit-batching --target URL`` is a separate mode (``profile_batching``): it fits a
continuous-batching server preset to a live OpenAI-compatible server instead of an engine profile.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from disco.cluster.commands import profile_batching
from disco.cluster.errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure an engine's TTFT vs prompt length and decode speed; write a profile JSON",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--endpoint",
        help="engine name (llamacpp, vllm, openai, ...); or --fit-batching --target URL",
    )
    p.add_argument(
        "--model",
        help="llamacpp: GGUF path or bundled name (default smollm2-135m); vllm: model dir; "
        "openai: model name; emulated: profile name or JSON",
    )
    p.add_argument(
        "--prompt-lens",
        help="comma-separated prompt lengths (default 32,128,512; --fit-batching 32,128,512,1024)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per prompt length")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded runs first")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", help="profile name (default: ENGINE-MODEL)")
    p.add_argument("--kind", choices=("device", "server"), help="profile kind (default: engine's)")
    p.add_argument("--threads", type=int, help="llamacpp: CPU threads (default: all)")
    p.add_argument("--base-url", help="openai: server base URL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var with the key")
    p.add_argument("--params-b", type=float, help="device: parameters in billions (default: read)")
    p.add_argument("--j-per-gflop", type=float, default=0.1, help="device: energy efficiency")
    p.add_argument("--price-in", type=float, default=0.0, help="server: USD per 1M input tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="server: USD per 1M output tokens")
    p.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    p.add_argument(
        "--estimator",
        choices=("median", "best"),
        default="median",
        help="device profile from the median run per prompt length, or the fastest one "
        "(for a shared machine: interference only ever adds time)",
    )
    profile_batching.add_arguments(p)
    p.set_defaults(run=run)


@dataclass(frozen=True, slots=True)
class Sample:
    target_tokens: int
    prompt_tokens: int
    ttft_s: float
    output_tokens: int
    decode_tps: float | None  # None when fewer than two tokens came back
    tbt_cv: float | None  # coefficient of variation of this run's inter-token gaps


@dataclass(frozen=True, slots=True)
class _EngineCounter:
    """Adapts an endpoint's ``count_tokens`` to the prompt builder's counter protocol."""

    endpoint: Any
    name: str = "engine"

    def count(self, text: str) -> int:
        return self.endpoint.count_tokens(text)


def parse_lens(text: str) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--prompt-lens must be comma-separated integers, got {text!r}") from None
    if not lens or any(n <= 0 for n in lens):
        raise CliError(f"--prompt-lens must be positive integers, got {text!r}")
    return sorted(set(lens))


def engine_config(args: argparse.Namespace, lens: list[int]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if args.endpoint == "llamacpp":
        cfg = {"model": args.model, "n_ctx": max(2048, max(lens) + args.max_tokens + 64)}
        if args.threads:
            cfg["n_threads"] = args.threads
        if args.kind:
            cfg["kind"] = args.kind
    elif args.endpoint == "emulated":
        if not args.model:
            raise CliError("--model (a profile name or JSON) is required for the emulated engine")
        cfg = {"profile": args.model}
    elif args.endpoint == "openai":
        if not args.base_url:
            raise CliError("--base-url is required for the openai engine")
        cfg = {"base_url": args.base_url, "api_key": os.environ.get(args.api_key_env)}
        if args.model:
            cfg["model"] = args.model
    elif args.endpoint == "vllm":
        if not args.model:
            raise CliError("--model is required for the vllm engine")
        cfg = {"model": args.model, "max_model_len": max(lens) + args.max_tokens + 64}
    elif args.model:
        cfg = {"model": args.model}
    return cfg


async def measure(endpoint: Any, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(TTFT, token times), both from the moment the request was made, in seconds."""
    from disco.scheduler.endpoint import GenerationRequest

    t0 = time.monotonic()
    times = [ev.time - t0 async for ev in endpoint.stream(GenerationRequest(prompt, max_tokens))]
    if not times:
        raise CliError(f"{endpoint.name} returned no tokens")
    return times[0], times


async def profile(
    args: argparse.Namespace, endpoint: Any, lens: list[int]
) -> tuple[list[Sample], list[float]]:
    """The samples, and every inter-token gap seen (seconds)."""
    from disco.loadgen.prompts import Corpus, PromptBuilder

    builder = PromptBuilder(Corpus.stdlib(), _EngineCounter(endpoint), seed=args.seed)
    for _ in range(args.warmup):
        await measure(endpoint, builder.build(min(lens)).text, min(8, args.max_tokens))
    samples: list[Sample] = []
    all_gaps: list[float] = []
    for r in range(args.repeats):
        for n in lens:  # interleave lengths so slow drift (thermal, load) spreads evenly
            prompt = builder.build(n)
            ttft, times = await measure(endpoint, prompt.text, args.max_tokens)
            span = times[-1] - times[0]
            tps = (len(times) - 1) / span if len(times) > 1 and span > 0 else None
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            all_gaps += gaps
            samples.append(Sample(n, prompt.tokens, ttft, len(times), tps, _cv(gaps)))
            print(
                f"  repeat {r + 1}/{args.repeats}  prompt {prompt.tokens:5d} tok  "
                f"TTFT {ttft * 1e3:8.1f} ms  decode {tps or 0:7.1f} tok/s  ({len(times)} tok)"
            )
    return samples, all_gaps


def _cv(xs: list[float]) -> float | None:
    if len(xs) < 2 or statistics.fmean(xs) <= 0:
        return None
    return statistics.pstdev(xs) / statistics.fmean(xs)


def _threads(endpoint: Any) -> str:
    cfg = getattr(endpoint, "config", None)
    threads = getattr(cfg, "threads", None)
    return f", {threads()} threads" if callable(threads) else ""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 0
    load = f", load average {os.getloadavg()[0]:.2f} at start" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {ncpu} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{load}"
    )


def build_profile(
    args: argparse.Namespace, endpoint: Any, samples: list[Sample], gaps: list[float], name: str
):
    from disco.scheduler.profiles import Prices, fit_device_profile, fit_server_profile

    kind = args.kind or endpoint.kind.value
    tps = [s.decode_tps for s in samples if s.decode_tps]
    if kind == "device":
        if not tps:
            raise CliError("no measurement produced two tokens: cannot fit a decode speed")
        params = (
            args.params_b
            or getattr(endpoint, "n_params", 0) / 1e9  # llama.cpp reads it from the GGUF
            or getattr(getattr(endpoint, "profile", None), "params_b", 0)  # emulated device
        )
        if not params:
            raise CliError("--params-b is required: this engine does not report its size")
        # Fit one point per target length (median or fastest run), never all runs: one run
        # slowed by a noisy neighbour must not tilt the line (least squares is not robust).
        by_len: dict[int, list[Sample]] = {}
        for smp in samples:
            by_len.setdefault(smp.target_tokens, []).append(smp)
        best = args.estimator == "best"
        pick = min if best else statistics.median
        timed = [x for x in samples if x.decode_tps]
        fastest = max(timed, key=lambda x: x.decode_tps or 0.0)
        cvs = [x.tbt_cv for x in timed if x.tbt_cv is not None]
        how = (
            f"fastest of {args.repeats} runs per prompt length"
            if best
            else f"median of {args.repeats} runs per prompt length"
        )
        try:
            prof = fit_device_profile(
                name,
                [statistics.median(x.prompt_tokens for x in g) for g in by_len.values()],
                [pick([x.ttft_s for x in g]) for g in by_len.values()],
                decode_tps=max(tps) if best else statistics.median(tps),
                params_b=round(params, 4),
                j_per_gflop=args.j_per_gflop,
                source=f"measured by disco profile on {endpoint.name}; {how}",
            )
        except ValueError as e:
            raise CliError(str(e)) from None
        cv = fastest.tbt_cv if best else (statistics.median(cvs) if cvs else None)
        return prof if cv is None else dataclasses.replace(prof, decode_cv=round(cv, 4))
    if not gaps:
        raise CliError("no measurement produced two tokens: cannot measure inter-token gaps")
    return fit_server_profile(
        name,
        [s.ttft_s for s in samples],
        gaps,
        Prices(args.price_in, args.price_out),
        source=f"measured by disco profile on {endpoint.name}",
    )


def run(args: argparse.Namespace) -> int:
    import disco.cluster.engines  # noqa: F401 - registers every engine
    from disco.device_agents.models import ModelUnavailableError
    from disco.scheduler.endpoint import ENDPOINTS
    from disco.scheduler.profiles import save_profile

    if args.fit_batching:  # fits a server preset from a live server: its own module
        return profile_batching.run(args)
    given = [k for k in profile_batching.FIT_DEFAULTS if getattr(args, k) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise CliError(f"{flag} belongs to --fit-batching")
    if not args.endpoint:
        raise CliError("--endpoint is required (or --fit-batching --target URL)")
    lens = parse_lens(args.prompt_lens or "32,128,512")
    if args.max_tokens <= 0 or args.repeats <= 0 or args.warmup < 0:
        raise CliError("--max-tokens and --repeats must be > 0, --warmup >= 0")
    factory = ENDPOINTS.get(args.endpoint)  # UnknownNameError lists the known engines
    try:
        endpoint = factory(**engine_config(args, lens))
    except (ModelUnavailableError, ValueError, RuntimeError) as e:
        raise CliError(f"cannot start engine {args.endpoint!r}: {e}") from None
    model = str(getattr(endpoint, "model_path", None) or args.model or "")
    label = Path(model).stem if Path(model).suffix in (".gguf", ".json") else Path(model).name
    name = args.name or f"{args.endpoint}-{label or 'default'}"
    print(f"profiling {endpoint.name}: prompt lengths {lens}, {args.max_tokens} tokens each")

    async def go() -> tuple[list[Sample], list[float]]:
        try:
            return await profile(args, endpoint, lens)
        finally:
            await endpoint.close()

    samples, gaps = asyncio.run(go())
    prof = build_profile(args, endpoint, samples, gaps, name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_profile(
        prof,
        out,
        measured=True,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine(),
        engine=f"{args.endpoint} ({endpoint.name}{_threads(endpoint)})",
        model=Path(model).name if model else "",
        samples=[asdict(s) for s in samples],
    )
    summary = {k: v for k, v in asdict(prof).items() if k not in ("ttft_samples", "source")}
    print(f"wrote {out}: {summary}")
    return 0
