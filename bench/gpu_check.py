"""GPU check: a Llama-3-8B-shaped decoder in plain PyTorch, timed on real hardware, as a server preset.

Builds a Llama-3-8B-shaped decoder (RMSNorm, RoPE, grouped-query attention over a preallocated KV
cache, SwiGLU MLP; hidden 4096, 32 layers, 32 query / 8 KV heads, FFN 14336, vocab 128256, bf16)
with random weights (step time does not depend on weight values; nothing is downloaded), measures
prefill time against prompt tokens and decode step time against batch size at a few context
lengths, fits the continuous-batching step model of ``scheduler/batching.py``

    step_s = base_s + prefill_token_s * P + decode_seq_s * D + context_token_s * C

(P prefill tokens in the step, D decode sequences, C context tokens those decodes attend to) by
least squares on relative error, and writes a server preset (``"kind": "server-preset"``, the JSON
that ``disco.scheduler.presets.load_preset`` reads) plus the raw measurements beside it.

What the preset is: the model's shape on real hardware (weight reads, GEMMs, attention over a KV
cache at each batch size and context) in an engine of plain PyTorch: SDPA attention over a
contiguous cache, unfused RMSNorm/RoPE/SwiGLU, each step replayed as a CUDA graph, the LM head on
each sequence's last token and greedy sampling. What it is not: vLLM's numbers. There is no paged
attention, no fused or quantised kernels, no scheduler, tokenizer or HTTP overhead, and each
measured batch has equal context lengths. Use it to check the named presets' shape (e.g.
``llama3-8b-h100``, fitted from Vidur's profiles) against a real GPU, not as a vLLM calibration
(``disco profile --fit-batching`` against a live vLLM is that).

It needs only torch and numpy (the project need not be installed; if ``disco`` is importable, or
the checkout's ``scheduler/`` is next to this file, the written preset is loaded back with
``load_preset`` as a check). Measurements run in order of importance and stop before
``--budget-s`` (default 240 s, counted from the start, model build included), so a run fits a
5-minute slot on a lent GPU:

    python bench/gpu_check.py --out $OUT/gpu-h200.json            # on the GPU machine
    python bench/gpu_check.py --tiny --device cpu --out /tmp/p.json  # a CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

T0 = time.monotonic()  # the budget counts from here: imports of torch and the model build included
GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's dimensions."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    @property
    def n_params(self) -> int:
        hd = self.head_dim
        per_layer = (
            self.hidden * (self.heads + 2 * self.kv_heads) * hd  # fused QKV
            + self.heads * hd * self.hidden  # output projection
            + 3 * self.hidden * self.ffn  # gate, up, down
            + 2 * self.hidden  # two RMSNorm weights
        )
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


SHAPES = {
    "llama3-8b": Shape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
    "tiny": Shape("tiny Llama-style decoder", 128, 2, 4, 2, 256, 512),
}


@dataclass(frozen=True)
class Point:
    """One measured step: ``prompts`` prompts of ``prompt`` tokens prefilled from position 0, and
    ``decode`` sequences decoding one token each with ``context`` tokens already cached."""

    series: str
    prompts: int = 0
    prompt: int = 0
    decode: int = 0
    context: int = 0

    @property
    def kind(self) -> str:
        if self.decode and self.prompts:
            return "mixed"
        return "decode" if self.decode else "prefill"

    @property
    def p(self) -> int:  # the step model's P
        return self.prompts * self.prompt

    @property
    def d(self) -> int:  # D
        return self.decode

    @property
    def c(self) -> int:  # C: each decode attends to its cached tokens and the new one
        return self.decode * (self.context + 1)

    @property
    def cache_tokens(self) -> int:
        return self.p + self.c

    @property
    def label(self) -> str:
        parts = []
        if self.prompts:
            parts.append(f"prefill {self.prompts}x{self.prompt}")
        if self.decode:
            parts.append(f"decode {self.decode}@{self.context}")
        return " + ".join(parts)


def plan(config: str) -> list[list[Point]]:
    """Series of points in order of importance; within a series, cheapest first."""
    if config == "tiny":
        return [
            [Point("decode@32", decode=b, context=32) for b in (1, 2, 4, 8, 16)],
            [Point("prefill", 1, t) for t in (16, 32, 64, 128, 256)],
            [Point("decode@128", decode=b, context=128) for b in (1, 2, 4, 8, 16)],
            [Point("prefill batched", n, t) for n, t in ((2, 64), (4, 64))],
            [Point("mixed", 1, t, b, 64) for t, b in ((32, 4), (64, 8))],
        ]
    batches = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    return [
        [Point("decode@512", decode=b, context=512) for b in batches],
        [Point("prefill", 1, t) for t in (128, 256, 512, 1024, 2048, 4096)],
        [Point("decode@2048", decode=b, context=2048) for b in batches],
        [
            Point("prefill batched", n, t)
            for n, t in (
                (16, 128),
                (8, 256),
                (4, 512),
                (2, 1024),
                (8, 512),
                (4, 1024),
                (2, 2048),
                (8, 1024),
                (4, 2048),
                (2, 4096),
            )
        ],
        [
            Point("mixed", 1, t, b, 1024)
            for t, b in ((512, 32), (512, 128), (2048, 32), (2048, 128))
        ],
        [Point("decode@128", decode=b, context=128) for b in (1, 16, 64, 256)],
        [Point("decode@8192", decode=b, context=8192) for b in (1, 4, 16, 64)],
        [Point("prefill", 1, 8192)],
    ]


# ---- the model ---------------------------------------------------------------------------------


class Decoder:
    """A Llama-shaped decoder with random weights and one preallocated KV cache.

    The cache (``alloc_cache``) is a flat buffer per layer for K and for V; a step lays its
    sequences out contiguously at the buffer's start: the decodes' ``[batch, kv_heads, context + 1,
    head_dim]`` first, then the prefills' ``[prompts, kv_heads, prompt, head_dim]``. Decode
    attention folds each KV head's query heads into the query-length axis (no KV copies, any SDPA
    backend); prefill attention is causal SDPA over the KV heads repeated to the query heads (a
    copy of under 1 % of a prefill's time that keeps SDPA on its fastest kernels on every torch).
    """

    def __init__(self, torch: Any, shape: Shape, device: Any, dtype: Any, max_pos: int) -> None:
        self.torch, self.F = torch, torch.nn.functional
        self.s, self.device, self.dtype = shape, device, dtype
        h, hd, nq, nkv = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads

        def linear(out_f: int, in_f: int) -> Any:
            return torch.empty(out_f, in_f, device=device, dtype=dtype).normal_(0, in_f**-0.5)

        def ones(n: int) -> Any:
            return torch.ones(n, device=device, dtype=dtype)

        self.embed = torch.empty(shape.vocab, h, device=device, dtype=dtype).normal_(0, 1)
        self.layers = [
            {
                "attn_norm": ones(h),
                "wqkv": linear((nq + 2 * nkv) * hd, h),
                "wo": linear(h, nq * hd),
                "mlp_norm": ones(h),
                "w_gate_up": linear(2 * shape.ffn, h),
                "w_down": linear(h, shape.ffn),
            }
            for _ in range(shape.layers)
        ]
        self.final_norm = ones(h)
        self.lm_head = linear(shape.vocab, h)
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        ang = torch.outer(torch.arange(max_pos, device=device).float(), inv)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        self.cache: Any = None
        self.cache_tokens = 0

    def alloc_cache(self, tokens: int) -> None:
        s = self.s
        self.cache = self.torch.empty(
            s.layers, 2, tokens * s.kv_heads * s.head_dim, device=self.device, dtype=self.dtype
        )
        self.cache.normal_(0, 1)  # never time on zeros (or on uninitialised NaNs)
        self.cache_tokens = tokens

    def _rms(self, x: Any, w: Any) -> Any:
        if hasattr(self.F, "rms_norm"):
            return self.F.rms_norm(x, (x.shape[-1],), w, self.s.norm_eps)
        xf = x.float()
        xf = xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.s.norm_eps)
        return xf.to(x.dtype) * w

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:  # x [N, heads, hd]; cos/sin [N, 1, hd/2]
        x1, x2 = x.chunk(2, dim=-1)
        return self.torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def inputs(self, pt: Point) -> dict[str, Any]:
        """Random token ids, positions and the rows whose logits are computed (the last token of
        each prompt, every decode token), made once per point (static for a CUDA graph)."""
        torch = self.torch
        n = pt.p + pt.d
        pos = [torch.arange(pt.prompt, device=self.device)] * pt.prompts
        if pt.d:
            pos.append(torch.full((pt.d,), pt.context, device=self.device))
        last = [torch.arange(pt.prompts, device=self.device) * pt.prompt + pt.prompt - 1]
        if pt.d:
            last.append(torch.arange(pt.p, n, device=self.device))
        return {
            "tokens": torch.randint(0, self.s.vocab, (n,), device=self.device),
            "pos": torch.cat(pos),
            "last": torch.cat(last),
        }

    def step(self, pt: Point, inp: dict[str, Any]) -> Any:
        """One forward pass for the point's batch; returns the next token of each sequence."""
        torch, F, s = self.torch, self.F, self.s
        hd, nq, nkv = s.head_dim, s.heads, s.kv_heads
        n, npf, b, t, d, ctx = pt.p + pt.d, pt.p, pt.prompts, pt.prompt, pt.d, pt.context
        dec_el = d * nkv * (ctx + 1) * hd  # the decodes' cache elements (laid out first)
        pf_el = npf * nkv * hd
        x = F.embedding(inp["tokens"], self.embed)
        cos = self.cos[inp["pos"]].unsqueeze(1)
        sin = self.sin[inp["pos"]].unsqueeze(1)
        for li, w in enumerate(self.layers):
            h = self._rms(x, w["attn_norm"])
            qkv = F.linear(h, w["wqkv"])
            q = self._rope(qkv[:, : nq * hd].view(n, nq, hd), cos, sin)
            k = self._rope(qkv[:, nq * hd : (nq + nkv) * hd].view(n, nkv, hd), cos, sin)
            v = qkv[:, (nq + nkv) * hd :].view(n, nkv, hd)
            kbuf, vbuf = self.cache[li, 0], self.cache[li, 1]
            outs = []
            if npf:
                kc = kbuf[dec_el : dec_el + pf_el].view(b, nkv, t, hd)
                vc = vbuf[dec_el : dec_el + pf_el].view(b, nkv, t, hd)
                kc.copy_(k[:npf].view(b, t, nkv, hd).transpose(1, 2))
                vc.copy_(v[:npf].view(b, t, nkv, hd).transpose(1, 2))
                qp = q[:npf].view(b, t, nq, hd).transpose(1, 2)
                # Query head j reads KV head j // group (expand + reshape: no host sync).
                kr = kc[:, :, None].expand(b, nkv, s.group, t, hd).reshape(b, nq, t, hd)
                vr = vc[:, :, None].expand(b, nkv, s.group, t, hd).reshape(b, nq, t, hd)
                o = F.scaled_dot_product_attention(qp, kr, vr, is_causal=True)
                outs.append(o.transpose(1, 2).reshape(npf, nq * hd))
            if d:
                kc = kbuf[:dec_el].view(d, nkv, ctx + 1, hd)
                vc = vbuf[:dec_el].view(d, nkv, ctx + 1, hd)
                kc[:, :, ctx] = k[npf:]
                vc[:, :, ctx] = v[npf:]
                # Query head j uses KV head j // group: fold each group into the query axis.
                o = F.scaled_dot_product_attention(q[npf:].view(d, nkv, s.group, hd), kc, vc)
                outs.append(o.reshape(d, nq * hd))
            a = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + F.linear(a, w["wo"])
            h = self._rms(x, w["mlp_norm"])
            gu = F.linear(h, w["w_gate_up"])
            x = x + F.linear(F.silu(gu[:, : s.ffn]) * gu[:, s.ffn :], w["w_down"])
        logits = F.linear(self._rms(x[inp["last"]], self.final_norm), self.lm_head)
        return logits.argmax(-1)


# ---- timing ------------------------------------------------------------------------------------


class Timer:
    def __init__(
        self, torch: Any, cuda: bool, target_s: float, warmup: int, min_reps: int, max_reps: int
    ) -> None:
        self.torch, self.cuda = torch, cuda
        self.target_s, self.warmup, self.min_reps, self.max_reps = (
            target_s,
            warmup,
            min_reps,
            max_reps,
        )

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn: Any) -> float:
        if self.cuda:
            a = self.torch.cuda.Event(enable_timing=True)
            b = self.torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def measure(self, fn: Any) -> list[float]:
        """Warm-up, then repeats sized to ``target_s`` (within min/max reps): each step's time."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = [self.once(fn)]
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s / max(times[0], 1e-6))))
        times += [self.once(fn) for _ in range(reps - 1)]
        return times


def runner(model: Decoder, pt: Point, use_graph: bool) -> tuple[Any, str]:
    """A zero-argument callable running one step of the point, and how it runs (eager/graph).

    On a GPU every step is captured once and replayed as a CUDA graph, as serving engines run
    them: otherwise the launch overhead of ~500 kernels per step (eager PyTorch) would be measured
    with small steps. A capture that fails falls back to eager, and the record says so.
    """
    torch = model.torch
    inp = model.inputs(pt)

    def eager() -> Any:
        return model.step(pt, inp)

    if not use_graph:
        return eager, "eager"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        return graph.replay, "cuda-graph"
    except Exception as e:  # any capture failure: measure eagerly, say so
        print(
            f"  CUDA graph capture failed for {pt.label} ({type(e).__name__}: {e}); eager",
            file=sys.stderr,
        )
        torch.cuda.synchronize()
        return eager, "eager (graph capture failed)"


# ---- the fit -----------------------------------------------------------------------------------


def fit_step_model(p: np.ndarray, d: np.ndarray, c: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Non-negative least squares over (1, P, D, C) on relative error (rows weighted by 1/y), by
    active-set elimination as ``StepModel.fit`` does; a term with no spread is left at 0."""
    x = np.column_stack([np.ones_like(y), p, d, c]).astype(float)
    xw, yw = x / y[:, None], np.ones_like(y)
    active = [j for j in range(4) if j == 0 or np.ptp(x[:, j]) > 0]
    coef = np.zeros(4)
    while active:
        sol, *_ = np.linalg.lstsq(xw[:, active], yw, rcond=None)
        if np.all(sol >= 0):
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    pred = x @ coef
    rel = np.abs(pred - y) / y
    return {
        "base_s": float(coef[0]),
        "prefill_token_s": float(coef[1]),
        "decode_seq_s": float(coef[2]),
        "context_token_s": float(coef[3]),
        "pred": pred,
        "rel": rel,
    }


def err_summary(rel: np.ndarray) -> dict[str, float | int]:
    return {
        "median": float(np.median(rel)),
        "p90": float(np.percentile(rel, 90)),
        "max": float(rel.max()),
        "n": int(rel.size),
    }


# ---- environment, output -----------------------------------------------------------------------


def slug(text: str) -> str:
    t = re.sub(r"^nvidia\s+", "", text.strip().lower())
    t = re.sub(r"[^a-z0-9]+", "-", t).strip("-")
    return t or "gpu"


def nvidia_smi() -> dict[str, str] | None:
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return dict(zip(q.split(","), (v.strip() for v in first.split(",")), strict=False))


def load_presets_module() -> Any:
    """``disco.scheduler.presets``: installed, or from this checkout's ``scheduler/`` (pure:
    numpy and the standard library) under a stand-in ``disco`` package. None if neither works."""
    try:
        return importlib.import_module("disco.scheduler.presets")
    except ImportError:
        pass
    sched = REPO / "scheduler"
    if not (sched / "presets.py").is_file() or "disco" in sys.modules:
        return None
    try:
        pkg = types.ModuleType("disco")
        pkg.__path__ = []  # a namespace holding only the scheduler
        sys.modules["disco"] = pkg
        spec = importlib.util.spec_from_file_location(
            "disco.scheduler", sched / "__init__.py", submodule_search_locations=[str(sched)]
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["disco.scheduler"] = mod
        spec.loader.exec_module(mod)
        return importlib.import_module("disco.scheduler.presets")
    except Exception:  # validation is optional
        for k in [k for k in sys.modules if k == "disco" or k.startswith("disco.")]:
            del sys.modules[k]
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", required=True, help="the preset JSON to write (measurements beside it)"
    )
    ap.add_argument(
        "--config",
        choices=sorted(SHAPES),
        default="llama3-8b",
        help="model shape and measurement plan (default llama3-8b)",
    )
    ap.add_argument("--tiny", action="store_true", help="same as --config tiny: a CPU smoke test")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N, cpu")
    ap.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on the CPU",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="wall seconds for the whole run, start-up included (default 240)",
    )
    ap.add_argument(
        "--graphs",
        choices=("auto", "off"),
        default="auto",
        help="replay each step as a CUDA graph on a GPU (auto), or run it eagerly (off)",
    )
    ap.add_argument(
        "--target-s",
        type=float,
        default=None,
        help="timed seconds per point (default 0.25 on a GPU, 0.05 on the CPU)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--gpu-mem-util",
        type=float,
        default=0.9,
        help="share of GPU memory a serving engine would take (vLLM's default 0.9)",
    )
    ap.add_argument(
        "--kv-tokens",
        type=int,
        default=None,
        help="the preset's KV capacity (default: from free GPU memory after the "
        "weights; on the CPU, the measurement cache's size)",
    )
    ap.add_argument("--name", default=None, help="preset name (default torch-<config>-<device>)")
    ap.add_argument(
        "--usd-per-hour",
        type=float,
        default=0.0,
        help="price of the machine per hour (default 0: not priced)",
    )
    ap.add_argument("--input-per-mtok", type=float, default=0.18)
    ap.add_argument("--output-per-mtok", type=float, default=0.18)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # here, so that --help works without torch

    def left() -> float:
        return args.budget_s - (time.monotonic() - T0)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev_arg = args.device
    if dev_arg == "auto":
        dev_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_arg)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not cuda and args.config != "tiny":
        print(
            "error: the full Llama-3-8B shape needs a GPU; use --tiny on the CPU", file=sys.stderr
        )
        return 2
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype != "auto"
        else (torch.bfloat16 if cuda else torch.float32)
    )
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    use_graph = cuda and args.graphs != "off"
    target_s = args.target_s if args.target_s is not None else (0.25 if cuda else 0.05)
    shape = SHAPES[args.config]
    series = plan(args.config)
    kv_tok_bytes = shape.kv_bytes_per_token(dtype_bytes)

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        dev_name = props.name
        env |= {
            "gpu": props.name,
            "gpu_memory_bytes": int(props.total_memory),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_multiprocessors": int(props.multi_processor_count),
            "cuda": torch.version.cuda,
            "nvidia_smi": nvidia_smi(),
        }
        hardware = (
            f"1 x {props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
        )
    else:
        dev_name = platform.processor() or platform.machine() or "CPU"
        env["cpu"] = dev_name
        env["threads"] = torch.get_num_threads()
        hardware = f"CPU {dev_name}, {torch.get_num_threads()} torch threads"
    print(
        f"gpu_check: {shape.name} ({shape.n_params / 1e9:.2f} B params, {env['dtype']}, random "
        f"weights) on {dev_name}, torch {torch.__version__}, budget {args.budget_s:.0f} s"
    )

    # The model first, then what memory is left for the measurement cache and a serving KV cache.
    need_tokens = max(pt.cache_tokens for s in series for pt in s)
    max_pos = max(max(pt.prompt, pt.context + 1) for s in series for pt in s)
    mem: dict[str, Any] = {"kv_bytes_per_token": kv_tok_bytes}
    cache_tokens = need_tokens
    if cuda:
        torch.cuda.set_device(device)
    model = Decoder(torch, shape, device, dtype, max_pos)
    base_alloc = 0
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        # Keep room for activations (a few GiB at 8k prefill tokens) besides the measurement cache.
        reserve = min(8 * GIB, int(0.1 * total))
        cache_tokens = max(1, min(need_tokens, int((free - reserve) // kv_tok_bytes)))
        mem |= {
            "total_bytes": int(total),
            "used_after_weights_bytes": int(total - free),
            "free_after_weights_bytes": int(free),
        }
    model.alloc_cache(cache_tokens)
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    mem["measurement_cache_tokens"] = cache_tokens
    print(
        f"  model built in {time.monotonic() - T0:.1f} s; measurement KV cache {cache_tokens:,} "
        f"tokens"
    )

    timer = Timer(torch, cuda, target_s, args.warmup, args.min_reps, args.max_reps)
    reserve_s = 5.0 if cuda else 1.0  # the fit and the files
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for s in series:
        last_wall: float | None = None
        for i, pt in enumerate(s):
            if pt.cache_tokens > cache_tokens:
                skipped.append({"point": pt.label, "why": "memory"})
                continue
            est = 3.0 * last_wall if last_wall is not None else (2.0 if cuda else 0.2)
            if left() - reserve_s < est:
                skipped += [{"point": q.label, "why": "budget"} for q in s[i:]]
                break
            t = time.monotonic()
            fn, mode = runner(model, pt, use_graph)
            times = timer.measure(fn)
            del fn
            last_wall = time.monotonic() - t
            med = statistics.median(times)
            records.append(
                {
                    "series": pt.series,
                    "kind": pt.kind,
                    "prompts": pt.prompts,
                    "prompt": pt.prompt,
                    "decode": pt.decode,
                    "context": pt.context,
                    "P": pt.p,
                    "D": pt.d,
                    "C": pt.c,
                    "mode": mode,
                    "median_s": med,
                    "min_s": min(times),
                    "times_s": times,
                }
            )
            tput = (pt.p + pt.d) / med
            print(
                f"  {pt.label:<28} {med * 1e3:9.3f} ms  {tput:12,.0f} tok/s  ({mode}, "
                f"{len(times)} reps)"
            )
    elapsed_measure = time.monotonic() - T0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meas_path = out.with_name(out.stem + ".measurements.json")
    if cuda:
        torch.cuda.synchronize()
        act_peak = int(torch.cuda.max_memory_allocated(device) - base_alloc)
        kv_bytes = int(
            mem["total_bytes"] * args.gpu_mem_util - mem["used_after_weights_bytes"] - act_peak
        )
        mem |= {
            "gpu_mem_util": args.gpu_mem_util,
            "activation_peak_bytes": act_peak,
            "kv_cache_bytes": kv_bytes,
            "kv_tokens": max(16, kv_bytes // kv_tok_bytes),  # >= one block, so the preset loads
        }
        kv_note = (
            "GPU memory x gpu_mem_util - memory in use after the weights (weights, CUDA "
            "context) - peak activations of the measured steps, / KV bytes per token"
        )
    else:
        mem["kv_tokens"] = cache_tokens
        kv_note = "the CPU run's measurement cache (no GPU memory to size it from)"
    if args.kv_tokens:
        mem["kv_tokens"], kv_note = args.kv_tokens, "given with --kv-tokens"

    kinds = {r["kind"] for r in records}
    fit: dict[str, Any] | None = None
    result: dict[str, Any] = {
        "what": "bench/gpu_check.py: step times of a plain-PyTorch engine (SDPA, random weights), "
        "not vLLM",
        "model": asdict(shape) | {"head_dim": shape.head_dim, "n_params": shape.n_params},
        "env": env,
        "memory": mem | {"kv_tokens_note": kv_note},
        "timing": {
            "warmup": args.warmup,
            "target_s_per_point": target_s,
            "statistic": "median of the timed repeats; CUDA events on a GPU",
        },
        "budget_s": args.budget_s,
        "measure_elapsed_s": round(elapsed_measure, 2),
        "points": records,
        "skipped": skipped,
        "decode_curves": {
            str(ctx): [
                {"batch": r["decode"], "step_s": r["median_s"]}
                for r in records
                if r["kind"] == "decode" and r["context"] == ctx
            ]
            for ctx in sorted({r["context"] for r in records if r["kind"] == "decode"})
        },
        "prefill_curve": [
            {
                "prompts": r["prompts"],
                "prompt": r["prompt"],
                "step_s": r["median_s"],
                "tokens_per_s": r["P"] / r["median_s"],
            }
            for r in records
            if r["kind"] == "prefill"
        ],
    }
    batches = {r["D"] for r in records if r["kind"] == "decode"}
    prompts = {r["P"] for r in records if r["kind"] == "prefill"}
    if len(batches) >= 2 and len(prompts) >= 2:
        p, d, c, y = (
            np.array([r[k] for r in records], dtype=float) for k in ("P", "D", "C", "median_s")
        )
        fit = fit_step_model(p, d, c, y)
        by_kind = {
            k: err_summary(fit["rel"][[r["kind"] == k for r in records]]) for k in sorted(kinds)
        }
        for r, pr in zip(records, fit["pred"], strict=True):
            r["fit_s"] = float(pr)
        result["fit"] = {
            "model": "step_s = base_s + prefill_token_s*P + decode_seq_s*D + context_token_s*C",
            "method": "non-negative least squares on relative error (rows weighted by 1/step)",
            "coefficients": {
                k: fit[k] for k in ("base_s", "prefill_token_s", "decode_seq_s", "context_token_s")
            },
            "rel_error": err_summary(fit["rel"]),
            "rel_error_by_kind": by_kind,
        }
    meas_path.write_text(json.dumps(result, indent=2) + "\n")

    # The table.
    print(f"\n{'step':<30}{'P':>6}{'D':>5}{'C':>9}{'measured ms':>13}{'fit ms':>10}{'err':>8}")
    for r in records:
        lab = Point(r["series"], r["prompts"], r["prompt"], r["decode"], r["context"]).label
        fm = f"{r['fit_s'] * 1e3:10.3f}" if "fit_s" in r else f"{'-':>10}"
        er = f"{abs(r['fit_s'] / r['median_s'] - 1):8.1%}" if "fit_s" in r else f"{'-':>8}"
        print(f"{lab:<30}{r['P']:>6}{r['D']:>5}{r['C']:>9}{r['median_s'] * 1e3:13.3f}{fm}{er}")
    if skipped:
        print(
            f"skipped {len(skipped)} points: "
            + ", ".join(f"{s['point']} ({s['why']})" for s in skipped)
        )
    if fit is None:
        print(
            f"error: too few points to fit (kinds {sorted(kinds)}); measurements in {meas_path}",
            file=sys.stderr,
        )
        return 1

    e = result["fit"]["rel_error"]
    on = f"{dev_name}" + (f" ({mem['total_bytes'] / GIB:.0f} GiB)" if cuda else "")
    name = args.name or f"torch-{args.config}-{slug(dev_name) if cuda else 'cpu'}"
    preset = {
        "name": name,
        "step": {
            "base_s": fit["base_s"],
            "prefill_token_s": fit["prefill_token_s"],
            "decode_seq_s": fit["decode_seq_s"],
            "context_token_s": fit["context_token_s"],
            "fit_error": e["median"],
        },
        "kv_tokens": int(mem["kv_tokens"]),
        "max_batched_tokens": max(r["P"] for r in records if r["P"]),
        "max_num_seqs": max(r["D"] for r in records),
        "block_size": 16,
        "prefix_caching": True,
        "usd_per_hour": args.usd_per_hour,
        "input_per_mtok": args.input_per_mtok,
        "output_per_mtok": args.output_per_mtok,
        "model": f"{shape.name} shape ({env['dtype']}, random weights), plain-PyTorch engine",
        "hardware": hardware,
        "source": f"measured by bench/gpu_check.py: plain PyTorch (SDPA), random weights, on {on}, "
        f"torch {torch.__version__}; not vLLM (no paged attention, fused kernels or scheduler "
        f"overhead); a check of the step model's shape on real hardware. Fit: median relative "
        f"error {e['median']:.1%} (P90 {e['p90']:.1%}) over {e['n']} steps",
        "kind": "server-preset",
        # Provenance (load_preset ignores these keys).
        "engine": "plain-pytorch",
        "date": env["date"],
        "measurements": meas_path.name,
        "fit_error_p90": e["p90"],
        "fit_error_by_kind": {
            k: v["median"] for k, v in result["fit"]["rel_error_by_kind"].items()
        },
        "kv_tokens_note": kv_note,
        "usd_per_hour_note": "not priced (0): pass --usd-per-hour"
        if not args.usd_per_hour
        else "given with --usd-per-hour",
        "per_mtok_note": "assumption: priced like the llama3-8b presets (Together AI's Llama 3 8B "
        "list price) so the cost columns compare",
    }
    out.write_text(json.dumps(preset, indent=2) + "\n")

    c4 = result["fit"]["coefficients"]
    print(
        f"\nfit: base {c4['base_s'] * 1e3:.3f} ms + {c4['prefill_token_s'] * 1e6:.3f} us/prefill "
        f"token + {c4['decode_seq_s'] * 1e6:.3f} us/decode seq + {c4['context_token_s'] * 1e9:.3f}"
        f" ns/context token"
    )
    print(
        f"fit error (median relative): {e['median']:.1%} (P90 {e['p90']:.1%}, max {e['max']:.1%}); "
        + ", ".join(f"{k} {v['median']:.1%}" for k, v in result["fit"]["rel_error_by_kind"].items())
    )
    print(f"kv_tokens {preset['kv_tokens']:,} ({kv_note})")
    presets = load_presets_module()
    if presets is None:
        print("preset not validated (disco.scheduler.presets not importable)")
    else:
        try:
            presets.load_preset(str(out))
        except Exception as ex:
            print(f"error: load_preset rejects {out}: {ex}", file=sys.stderr)
            return 1
        print("preset validated with disco.scheduler.presets.load_preset")
    print(f"wrote {out} and {meas_path} in {time.monotonic() - T0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
