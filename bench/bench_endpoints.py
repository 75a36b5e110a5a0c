"""llama.cpp speed here, and what the Endpoint wrapper costs on top of llama-cpp-python.

For each prompt length, the same real-text prompts run three ways, interleaved run by run:
- ``direct generate``: ``Llama.tokenize`` + ``Llama.generate`` in a plain loop (the floor);
- ``direct completion``: ``Llama.create_completion(stream=True)`` (how most users call it);
- ``Endpoint``: ``LlamaCppEndpoint.stream`` (worker thread -> asyncio queue -> consumer), timed
  where the consumer receives each event.
Each path has its own ``Llama`` instance and sees each prompt once, so no path benefits from a
prefix cache warmed by another. Reports medians over the runs: TTFT, prefill tok/s (prompt tokens
/ TTFT), decode tok/s (tokens after the first / time after the first), and the wrapper's overhead.

    python bench/bench_endpoints.py [--models gemma3-270m,smollm2-135m] [--threads 2]
        [--prompt-lens 32,128,512] [--max-tokens 64] [--runs 5] [--out bench/results/endpoints.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from disco.device_agents.engines.llamacpp import LlamaCppEndpoint
from disco.loadgen.prompts import Corpus, PromptBuilder
from disco.scheduler.endpoint import GenerationRequest

SAMPLING = {"temp": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


@dataclass
class Run:
    prompt_tokens: int
    ttft_s: float
    times: list[float]  # receipt time of each token, from the request

    @property
    def decode_tps(self) -> float | None:
        span = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / span if len(self.times) > 1 and span > 0 else None


@dataclass
class Path_:
    name: str
    runs: dict[int, list[Run]] = field(default_factory=dict)


def timed(tokens: Iterator[object]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    times = [time.perf_counter() - t0 for _ in tokens]
    return times[0], times


def direct_generate(llm, prompt: str, max_tokens: int) -> Iterator[int]:
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    gen = llm.generate(ids, **SAMPLING)
    for _ in range(max_tokens):
        yield next(gen)
    gen.close()


def direct_completion(llm, prompt: str, max_tokens: int) -> Iterator[dict]:
    yield from llm.create_completion(
        prompt,
        max_tokens=max_tokens,
        stream=True,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
    )


async def via_endpoint(
    ep: LlamaCppEndpoint, prompt: str, max_tokens: int, handoff: list[float]
) -> tuple[float, list]:
    """Receipt times; appends to ``handoff`` each token's delay from production on the worker
    thread (its ``time`` stamp) to receipt by the asyncio consumer."""
    t0 = time.perf_counter()
    times = []
    async for ev in ep.stream(GenerationRequest(prompt, max_tokens)):
        times.append(time.perf_counter() - t0)
        handoff.append(time.monotonic() - ev.time)
    return times[0], times


def handoff_cost(ep: LlamaCppEndpoint, loop: asyncio.AbstractEventLoop, n: int, reps: int):
    """Per-token cost of the wrapper alone: the model is swapped for an instant token source, so
    what remains is detokenizing, the TokenEvent, the thread -> event loop hand-off and the
    consumer. Returns (direct s/token, wrapper s/token), medians over ``reps``."""
    llm = ep._llm
    tok = llm.tokenize(b" the", add_bos=False)[0]

    def instant(ids, **_):  # noqa: ANN001, ANN202 - stands in for Llama.generate
        while True:
            yield tok

    async def consume() -> float:
        t0 = time.perf_counter()
        k = 0
        async for _ in ep.stream(GenerationRequest("The", n)):
            k += 1
        return (time.perf_counter() - t0) / k

    direct, wrapped = [], []
    llm.generate = instant  # instance attribute shadows the method; removed below
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _, t in zip(range(n), instant([]), strict=False):
                llm.detokenize([t])
            direct.append((time.perf_counter() - t0) / n)
            wrapped.append(loop.run_until_complete(consume()))
    finally:
        del llm.generate
    return median(direct), median(wrapped)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_model(
    model: str, args: argparse.Namespace, lens: list[int]
) -> tuple[list[Path_], str, tuple[float, float, list[float]]]:
    from llama_cpp import Llama

    n_ctx = max(lens) + args.max_tokens + 64
    ep = LlamaCppEndpoint(model, n_ctx=n_ctx, n_threads=args.threads)
    kw = dict(n_ctx=n_ctx, n_batch=ep.config.n_batch, n_threads=args.threads,
              n_threads_batch=args.threads, verbose=False)  # fmt: skip
    llm_gen = Llama(model_path=str(ep.model_path), **kw)
    llm_cmp = Llama(model_path=str(ep.model_path), **kw)
    builder = PromptBuilder(Corpus.stdlib(), _Counter(ep.count_tokens), seed=args.seed)
    paths = [Path_("direct generate"), Path_("direct completion"), Path_("Endpoint (wrapper)")]

    handoff: list[float] = []

    async def endpoint_run(p: str) -> tuple[float, list[float]]:
        return await via_endpoint(ep, p, args.max_tokens, handoff)

    loop = asyncio.new_event_loop()
    runners: list[Callable[[str], tuple[float, list[float]]]] = [
        lambda p: timed(direct_generate(llm_gen, p, args.max_tokens)),
        lambda p: timed(direct_completion(llm_cmp, p, args.max_tokens)),
        lambda p: loop.run_until_complete(endpoint_run(p)),
    ]
    warm = builder.build(16).text
    for run in runners:  # load weights into the page cache, JIT nothing
        run(warm)
    try:
        cost = handoff_cost(ep, loop, n=min(500, n_ctx - 8), reps=7)
        handoff.clear()  # count only the measured runs below
        for r in range(args.runs):
            for n in lens:
                prompt = builder.build(n)
                order = list(range(3)) if r % 2 == 0 else [2, 1, 0]  # cancel drift
                for i in order:
                    ttft, times = runners[i](prompt.text)
                    paths[i].runs.setdefault(n, []).append(Run(prompt.tokens, ttft, times))
            print(f"  {Path(ep.model_path).name}: run {r + 1}/{args.runs} done", flush=True)
    finally:
        loop.run_until_complete(ep.close())
        loop.close()
        llm_gen.close()
        llm_cmp.close()
    return paths, Path(ep.model_path).name, (*cost, handoff)


@dataclass(frozen=True)
class _Counter:
    fn: Callable[[str], int]
    name: str = "engine"

    def count(self, text: str) -> int:
        return self.fn(text)


def table(paths: list[Path_], lens: list[int]) -> list[str]:
    rows = [
        "| path | prompt tok | TTFT ms | prefill tok/s | decode tok/s | tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in lens:
        for p in paths:
            runs = p.runs[n]
            ttft = median([x.ttft_s for x in runs])
            ptok = median([x.prompt_tokens for x in runs])
            dec = median([x.decode_tps for x in runs if x.decode_tps])
            ntok = median([len(x.times) for x in runs])
            rows.append(
                f"| {p.name} | {ptok:.0f} | {ttft * 1e3:.1f} | {ptok / ttft:.0f} | {dec:.1f} | {ntok:.0f} |"
            )
    base, wrap = paths[0], paths[2]
    rows += ["", "Endpoint wrapper overhead vs direct `generate` (medians of paired runs):", ""]
    rows += [
        "| prompt tok | TTFT delta ms | per-token delta ms | decode slowdown |",
        "|---:|---:|---:|---:|",
    ]
    for n in lens:
        b, w = base.runs[n], wrap.runs[n]
        d_ttft = median([y.ttft_s - x.ttft_s for x, y in zip(b, w, strict=True)])
        tbt = [
            (y.times[-1] - y.times[0]) / (len(y.times) - 1)
            - (x.times[-1] - x.times[0]) / (len(x.times) - 1)
            for x, y in zip(b, w, strict=True)
            if len(x.times) > 1 and len(y.times) > 1
        ]
        slow = median([x.decode_tps / y.decode_tps - 1 for x, y in zip(b, w, strict=True)
                       if x.decode_tps and y.decode_tps])  # fmt: skip
        rows.append(f"| {median([x.prompt_tokens for x in b]):.0f} | {d_ttft * 1e3:+.2f} | "
                    f"{median(tbt) * 1e3:+.3f} | {slow * 100:+.1f}% |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompt-lens", default="32,128,512")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "endpoints.md"))
    args = ap.parse_args()
    lens = sorted({int(x) for x in args.prompt_lens.split(",")})
    load0 = os.getloadavg()[0]
    started = dt.datetime.now(dt.timezone.utc)
    sections = []
    for model in args.models.split(","):
        paths, fname, (direct, wrapped, handoff) = bench_model(model.strip(), args, lens)
        hs = sorted(handoff)
        p99 = hs[min(len(hs) - 1, int(0.99 * len(hs)))]
        step = 1 / median([x.decode_tps for x in paths[0].runs[lens[0]] if x.decode_tps])
        sections += [f"### {fname}", "", *table(paths, lens), ""]
        sections += [
            "Wrapper cost per token with the model swapped for an instant token source "
            "(median of 7 x 500 tokens; contention-robust, unlike the deltas above):",
            "",
            "| direct loop us/token | Endpoint us/token | overhead us/token | share of a decode step |",
            "|---:|---:|---:|---:|",
            f"| {direct * 1e6:.1f} | {wrapped * 1e6:.1f} | {(wrapped - direct) * 1e6:+.1f} | "
            f"{(wrapped - direct) / step * 100:.2f}% of {step * 1e3:.1f} ms |",
            "",
            f"Hand-off delay in the real runs (token produced on the worker thread -> received by "
            f"the asyncio consumer), {len(hs)} tokens: median {median(hs) * 1e6:.0f} us, "
            f"P99 {p99 * 1e6:.0f} us.",
            "",
        ]
    load1 = os.getloadavg()[0]
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    import llama_cpp

    head = [
        "# llama.cpp endpoints: speed and wrapper overhead",
        "",
        f"Generated by `python bench/bench_endpoints.py` on {started:%Y-%m-%d %H:%M} UTC. "
        f"Machine: {cpu}, {len(os.sched_getaffinity(0))} CPUs; llama-cpp-python "
        f"{llama_cpp.__version__}; {args.threads} threads; greedy; {args.max_tokens} tokens per "
        f"run; median of {args.runs} runs per row (prompts of real text, a new one each run). "
        f"Load average {load0:.2f} at start, {load1:.2f} at end (the machine is shared; "
        "numbers move 20-30% run to run).",
        "",
        "Prefill tok/s is prompt tokens / TTFT (TTFT includes tokenizing and the first decode "
        "step). Decode tok/s counts tokens after the first over the time after the first. "
        "Endpoint times are taken where the asyncio consumer receives each event.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + sections))
    print("\n".join(sections))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
