"""Fit a linear step-time model for one vLLM-style GPU replica from Microsoft Vidur's profiling data.

The emulated replica runs continuous batching with chunked prefill; one engine step is modelled as

    step_s = base_s + per_prefill_token_s * P + per_decode_seq_s * D + per_context_token_s * C

P = prefill tokens in the step, D = decode sequences, C = sum of the decode sequences' current
lengths (KV tokens they attend to). A 5-term variant adds per_prefill_attn_s * A, where
A = sum over prefill chunks of chunk_len * (tokens already cached for that request + chunk_len).

Sources (github.com/microsoft/vidur, snapshot commit 7d47513363ec447a741ac5e47241580b47724fbf):
  * data/profiling/compute/{gpu}/{model}/mlp.csv        per-op GEMM/norm/act/rope/add timings
  * data/profiling/compute/{gpu}/{model}/attention.csv  attention prefill/decode/kv-save timings
    (Git-LFS objects: a plain snapshot has only pointer files; pass a checkout with the LFS data,
    or a CSV with Vidur's column names via --attention-csv, which may hold a subset of the rows)
  * vidur/execution_time_predictor/sklearn_execution_time_predictor.py  (how ops are combined)
  * vidur/entities/execution_time.py   (per-layer sum x num_layers, CPU overhead kept apart)
  * vidur/config/model_config.py, vidur/config/config.py  (model shapes, predictor defaults)

How a step time is rebuilt (the way Vidur does it, tensor parallel 1, one pipeline stage):
  per layer = attn_pre_proj + attn_post_proj + attn_rope + input_layernorm
            + post_attention_layernorm + mlp_up_proj + mlp_act + mlp_down_proj + add
              (each looked up at the step's token count rounded up to a multiple of 8)
            + attn_kv_cache_save + attn_decode + attn_prefill
  step = per layer * num_layers.
  attn_decode is looked up at (decode batch, mean context rounded up to 64); attn_prefill at
  (sum of cached tokens rounded up to 64, round(sqrt(sum chunk^2))); both get Vidur's default 10%
  batching overhead for GQA models when more than one sequence of that kind is in the step.

Assumptions (each also printed in the JSON output):
  A1 Lookups interpolate linearly in the profiled tables instead of Vidur's random-forest /
     polynomial regressors; 2-D tables are read along slices of the profiling grid (fixed kv for
     decode, fixed chunk for prefill), preferring slices whose range covers the query.
  A2 Excluded, as in Vidur's model_time: embedding, final norm, LM head, sampling, and all CPU
     overheads (schedule / prepare_inputs / sampler / process_outputs; Vidur skips them by
     default). Add them to base_s / per_decode_seq_s if the emulated server needs them.
  A3 attn_kv_cache_save: Vidur regresses it on the step's token count, pooling prefill and decode
     rows; here it is looked up per kind (prefill rows by chunk, decode rows by batch size) and
     summed, because the profiled cost differs by 10-100x between the kinds at equal token count.
     The prefill rows are large (A100 Llama-3-8B: ~0.55 us per token per layer, ~19% of a long
     prefill); --kv-save off drops the op to show its weight.
  A4 When a (gpu, model) pair has no profile of its own, --mlp-from scales another model's mlp.csv
     by the ratio of weight elements per op (time ~ N*K at a fixed token count; on A100, scaled
     Llama-2-7b vs profiled Llama-3-8B step times differ by 1.7% median, 6.5% p90) and
     --attention-from takes another GPU's attention table times fixed scale factors. The
     built-in preset for h100 + Llama-3-8B does both (see PRESETS; printed in the JSON).
  A5 Synthetic grid: chunk sizes 0..4096 with 0-6144 already-cached tokens, decode batches
     0..256 with equal context lengths 128..model max, each step limited to the replica's KV
     capacity. The fit is least squares on relative error (rows weighted by 1/step time).
  A6 KV capacity = (GPU memory * util - weight bytes - overhead) / (2 * layers * kv_heads *
     head_dim * 2 bytes), bf16 weights and KV cache, memory as nvidia-smi reports it.
  A7 Model max context from the HF configs (Llama-3-8B 8192; Vidur's config says 4096, but its
     A100 attention profile covers 16384 tokens).

Usage:
    python bench/fit_vidur_preset.py --vidur-git-dir /path/to/vidur.git --gpu a100 \\
        --model meta-llama/Meta-Llama-3-8B --attention-csv a100_llama3_8b_attention.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GIB = 1024**3
MIB = 1024**2
LFS_MAGIC = "version https://git-lfs.github.com/spec/v1"
LINEAR_OPS = (
    "attn_pre_proj",
    "attn_post_proj",
    "attn_rope",
    "input_layernorm",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
KV_GRANULARITY = 64  # Vidur kv_cache_prediction_granularity
GQA_BATCHING_OVERHEAD = 0.1  # Vidur attention_{prefill,decode}_batching_overhead_fraction


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    q_heads: int
    kv_heads: int
    hidden: int
    ffn: int
    max_ctx: int
    n_params: int  # all weights incl. embedding and LM head (for memory only)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.q_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def op_elements(self, op: str) -> float:
        """Weight elements (or activation width) an op touches per token, for shape scaling."""
        hd = self.head_dim
        return {
            "attn_pre_proj": self.hidden * (self.q_heads + 2 * self.kv_heads) * hd,
            "attn_post_proj": self.q_heads * hd * self.hidden,
            "attn_rope": (self.q_heads + self.kv_heads) * hd,
            "input_layernorm": self.hidden,
            "post_attention_layernorm": self.hidden,
            "mlp_up_proj": self.hidden * 2 * self.ffn,
            "mlp_act": self.ffn,
            "mlp_down_proj": self.ffn * self.hidden,
            "add": self.hidden,
        }[op]


# Shapes as in vidur/config/model_config.py; max_ctx and n_params from the HF model cards.
MODELS = {
    "meta-llama/Meta-Llama-3-8B": ModelSpec(32, 32, 8, 4096, 14336, 8192, 8_030_261_248),
    "meta-llama/Llama-2-7b-hf": ModelSpec(32, 32, 32, 4096, 11008, 4096, 6_738_415_616),
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    mem_bytes: int  # total as nvidia-smi reports it
    hbm_gbps: float  # datasheet memory bandwidth, only used by the h100 preset


GPUS = {
    "a100": GpuSpec("A100-SXM4-80GB", 81920 * MIB, 2039.0),
    "h100": GpuSpec("H100-SXM5-80GB", 81559 * MIB, 3350.0),
    "a40": GpuSpec("A40", 46068 * MIB, 696.0),
}

# Vidur profiles no attention for H100 + Llama-3-8B (nor any H100 attention outside Git-LFS), so
# the preset borrows A100 Llama-3-8B attention: memory-bound parts scale with HBM bandwidth, the
# compute-bound prefill kernel by ~0.6 (FlashAttention-2-class kernels: ~300-335 TFLOP/s causal,
# head dim 128 on H100 per the FlashAttention-3 paper vs ~170-190 TFLOP/s Vidur measured on A100).
PRESETS = {
    ("h100", "meta-llama/Meta-Llama-3-8B"): {
        "mlp_from": ("h100", "meta-llama/Llama-2-7b-hf"),
        "attention_from": ("a100", "meta-llama/Meta-Llama-3-8B"),
        "attn_decode_scale": GPUS["a100"].hbm_gbps / GPUS["h100"].hbm_gbps,
        "kv_save_scale": GPUS["a100"].hbm_gbps / GPUS["h100"].hbm_gbps,
        "attn_prefill_scale": 0.6,
    },
}


# ----------------------------------------------------------------------------------------------
# Reading Vidur's files


class VidurFiles:
    """Reads files from a Vidur git dir (``git show``) or a checkout directory."""

    def __init__(self, git_dir: str | None, root: str | None, rev: str = "HEAD") -> None:
        self.git_dir, self.root, self.rev = git_dir, root, rev

    def describe(self) -> str:
        if self.git_dir:
            sha = subprocess.run(
                ["git", f"--git-dir={self.git_dir}", "rev-parse", self.rev],
                capture_output=True,
                text=True,
            ).stdout.strip()
            return f"git:{self.git_dir}@{sha or self.rev}"
        return f"dir:{self.root}"

    def read(self, rel: str) -> str | None:
        if self.git_dir:
            res = subprocess.run(
                ["git", f"--git-dir={self.git_dir}", "show", f"{self.rev}:{rel}"],
                capture_output=True,
                text=True,
            )
            text = res.stdout if res.returncode == 0 else None
        elif self.root:
            p = Path(self.root) / rel
            text = p.read_text() if p.is_file() else None
        else:
            text = None
        if text is not None and text.startswith(LFS_MAGIC):
            print(
                f"note: {rel} is a Git-LFS pointer; its data is not in this source", file=sys.stderr
            )
            return None
        return text


def read_csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def fnum(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def truthy(v: str) -> bool:
    return str(v).strip().lower() in ("true", "1")


# ----------------------------------------------------------------------------------------------
# Interpolation


class Table1D:
    """Piecewise-linear y(x); outside the range, a least-squares line through the end points."""

    def __init__(self, x: list[float], y: list[float]) -> None:
        groups: dict[float, list[float]] = {}
        for xi, yi in zip(x, y, strict=True):
            if not math.isnan(yi):
                groups.setdefault(xi, []).append(yi)
        if not groups:
            raise ValueError("empty table")
        self.x = np.array(sorted(groups))
        self.y = np.array([float(np.mean(groups[k])) for k in self.x])

    def __call__(self, x0: float) -> float:
        x, y = self.x, self.y
        if len(x) == 1:
            return float(y[0])
        if x[0] <= x0 <= x[-1]:
            return float(np.interp(x0, x, y))
        k = min(len(x), 6)
        sel = slice(0, k) if x0 < x[0] else slice(len(x) - k, len(x))
        slope = np.polyfit(x[sel], y[sel], 1)[0]
        edge = 0 if x0 < x[0] else -1
        return max(0.0, float(y[edge] + slope * (x0 - x[edge])))


@dataclass
class _Slice:
    s: float
    w: np.ndarray
    y: np.ndarray

    def covers(self, w0: float, slack: float = 1.0) -> bool:
        return self.w[0] / slack <= w0 <= self.w[-1] * slack

    def at(self, w0: float) -> float:
        if len(self.w) == 1:
            return float(self.y[0])
        if self.covers(w0):
            return float(np.interp(w0, self.w, self.y))
        slope = np.polyfit(self.w, self.y, 1)[0]
        edge = 0 if w0 < self.w[0] else -1
        return max(0.0, float(self.y[edge] + slope * (w0 - self.w[edge])))


class SliceTable:
    """y(s, w) from a (possibly sparse or truncated) product grid, read along slices of fixed s.

    On each side of s0 it takes the nearest slice whose w-range, widened by a factor 1.5, covers
    w0 (else the nearest slice) and interpolates linearly in s. With slices on one side only it
    extrapolates linearly from that slice and the next one at least 10% away in s, bounded by
    proportional scaling toward s = 0 below the table and by the edge value above it.
    """

    SLACK = 1.5

    def __init__(self, s: list[float], w: list[float], y: list[float]) -> None:
        groups: dict[float, dict[float, list[float]]] = {}
        for si, wi, yi in zip(s, w, y, strict=True):
            if not math.isnan(yi):
                groups.setdefault(si, {}).setdefault(wi, []).append(yi)
        if not groups:
            raise ValueError("empty table")
        self.slices = []
        for si in sorted(groups):
            ws = sorted(groups[si])
            self.slices.append(
                _Slice(si, np.array(ws), np.array([float(np.mean(groups[si][k])) for k in ws]))
            )

    def _pick(self, order: list[_Slice], w0: float) -> _Slice | None:
        """First slice in ``order`` (nearest first) that covers w0, else the nearest one."""
        if not order:
            return None
        covering = [c for c in order if c.covers(w0, self.SLACK)]
        return covering[0] if covering else order[0]

    def __call__(self, s0: float, w0: float) -> float:
        below = [c for c in self.slices if c.s <= s0][::-1]
        above = [c for c in self.slices if c.s >= s0]
        lo, hi = self._pick(below, w0), self._pick(above, w0)
        if lo is not None and hi is not None:
            if hi.s == lo.s:
                return lo.at(w0)
            t = (s0 - lo.s) / (hi.s - lo.s)
            return (1 - t) * lo.at(w0) + t * hi.at(w0)
        near = lo if lo is not None else hi
        side = below if lo is not None else above
        rest = [c for c in side if abs(c.s - near.s) >= 0.1 * max(abs(near.s), 1.0)]
        y_near = near.at(w0)
        other = self._pick(sorted(rest, key=lambda c: abs(c.s - near.s)), w0)
        if other is None:
            return y_near
        slope = (y_near - other.at(w0)) / (near.s - other.s)
        y = y_near + slope * (s0 - near.s)
        if s0 < near.s:  # below the table: between proportional scaling and the edge value
            return float(min(max(y, y_near * s0 / near.s), y_near))
        return float(max(y, y_near))


# ----------------------------------------------------------------------------------------------
# Vidur tables for one replica


@dataclass
class Profile:
    linear: dict[str, Table1D]
    decode: SliceTable  # s = kv (context), w = decode batch size
    prefill: SliceTable  # s = chunk size, w = cached tokens before the chunk
    kv_save_prefill: Table1D | None
    kv_save_decode: Table1D | None


def load_linear_ops(text: str, src: ModelSpec, dst: ModelSpec) -> dict[str, Table1D]:
    rows = [
        r
        for r in read_csv_rows(text)
        if int(r["n_head"]) == src.q_heads
        and int(r["n_kv_head"]) == src.kv_heads
        and int(r["n_embd"]) == src.hidden
        and int(r["n_expanded_embd"]) == src.ffn
        and int(r["num_tensor_parallel_workers"]) == 1
    ]
    if not rows:
        raise SystemExit("mlp.csv has no tensor-parallel-1 rows for the source model's shape")
    tables = {}
    for op in LINEAR_OPS:
        col = f"time_stats.{op}.median"
        scale = dst.op_elements(op) / src.op_elements(op)
        xs = [float(r["num_tokens"]) for r in rows]
        ys = [fnum(r.get(col)) * scale if r.get(col) not in (None, "") else 0.0 for r in rows]
        tables[op] = Table1D(xs, ys)
    return tables


def load_attention(
    text: str, spec: ModelSpec
) -> tuple[SliceTable, SliceTable, Table1D | None, Table1D | None]:
    rows = [
        r
        for r in read_csv_rows(text)
        if int(float(r["n_embd"])) == spec.hidden
        and int(float(r["n_q_head"])) == spec.q_heads
        and int(float(r["n_kv_head"])) == spec.kv_heads
        and int(float(r["block_size"])) == 16
        and int(float(r["num_tensor_parallel_workers"])) == 1
    ]
    if not rows:
        raise SystemExit("attention csv has no tp=1, block 16 rows for this model's head shape")
    pre = [r for r in rows if truthy(r["is_prefill"])]
    dec = [r for r in rows if not truthy(r["is_prefill"])]
    save_col = "time_stats.attn_kv_cache_save.median"

    def col(rs: list[dict[str, str]], name: str) -> list[float]:
        return [fnum(r.get(name)) for r in rs]

    decode = SliceTable(
        col(dec, "kv_cache_size"), col(dec, "batch_size"), col(dec, "time_stats.attn_decode.median")
    )
    prefill = SliceTable(
        col(pre, "prefill_chunk_size"),
        col(pre, "kv_cache_size"),
        col(pre, "time_stats.attn_prefill.median"),
    )
    has_save = any(not math.isnan(v) for v in col(rows, save_col))
    save_p = Table1D(col(pre, "prefill_chunk_size"), col(pre, save_col)) if has_save else None
    save_d = Table1D(col(dec, "batch_size"), col(dec, save_col)) if has_save else None
    return decode, prefill, save_p, save_d


# ----------------------------------------------------------------------------------------------
# Step time


@dataclass(frozen=True)
class Step:
    chunks: tuple[tuple[int, int], ...]  # (chunk_len, tokens already cached for that request)
    decode_batch: int
    decode_ctx: int  # context length of every decode sequence (all equal in the grid)

    @property
    def p(self) -> int:
        return sum(c for c, _ in self.chunks)

    @property
    def c(self) -> int:
        return self.decode_batch * self.decode_ctx

    @property
    def a(self) -> int:
        return sum(c * (kv + c) for c, kv in self.chunks)


def ceil_to(x: float, g: int) -> int:
    return int(math.ceil(x / g) * g)


@dataclass
class StepModel:
    profile: Profile
    spec: ModelSpec
    decode_scale: float = 1.0
    prefill_scale: float = 1.0
    kv_save_scale: float = 1.0
    kv_save: bool = True

    def layer_ms(self, st: Step) -> dict[str, float]:
        n = st.p + st.decode_batch
        n8 = ceil_to(n, 8)
        gqa = self.spec.q_heads > self.spec.kv_heads
        out = {op: tab(n8) for op, tab in self.profile.linear.items()}
        dec = pre = save = 0.0
        if st.decode_batch:
            kv = ceil_to(st.decode_ctx, KV_GRANULARITY)
            over = 1 + GQA_BATCHING_OVERHEAD * (gqa and st.decode_batch > 1)
            dec = self.profile.decode(kv, st.decode_batch) * over * self.decode_scale
            if self.kv_save and self.profile.kv_save_decode is not None:
                save += self.profile.kv_save_decode(st.decode_batch)
        if st.chunks:
            kv = sum(ceil_to(k, KV_GRANULARITY) for _, k in st.chunks)
            chunk = round(math.sqrt(sum(c * c for c, _ in st.chunks)))
            over = 1 + GQA_BATCHING_OVERHEAD * (gqa and len(st.chunks) > 1)
            pre = self.profile.prefill(chunk, kv) * over * self.prefill_scale
            if self.kv_save and self.profile.kv_save_prefill is not None:
                save += sum(self.profile.kv_save_prefill(c) for c, _ in st.chunks)
        out.update(attn_decode=dec, attn_prefill=pre, attn_kv_cache_save=save * self.kv_save_scale)
        return out

    def step_s(self, st: Step) -> float:
        return sum(self.layer_ms(st).values()) * self.spec.layers / 1e3


# ----------------------------------------------------------------------------------------------
# Grid, fit, capacity

CHUNKS = (0, 32, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
CHUNK_PREFIX = (0, 2048, 6144)
DECODE_BATCHES = (0, 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
DECODE_CTX = (128, 256, 512, 1024, 2048, 4096, 8192)


def grid(spec: ModelSpec, kv_capacity: int) -> list[Step]:
    steps = set()
    ctxs = [ctx for ctx in DECODE_CTX if ctx <= spec.max_ctx]
    for c in CHUNKS:
        prefixes = [k for k in CHUNK_PREFIX if c and k + c <= spec.max_ctx] if c else [0]
        for k in prefixes:
            for b in DECODE_BATCHES:
                for ctx in ctxs if b else ctxs[:1]:
                    if c == 0 and b == 0:
                        continue
                    if b * ctx + (k + c if c else 0) > kv_capacity:
                        continue
                    steps.add(Step(((c, k),) if c else (), b, ctx if b else 0))
    return sorted(steps, key=lambda s: (s.p, s.decode_batch, s.decode_ctx, s.chunks))


def fit(steps: list[Step], y: np.ndarray, with_attn: bool) -> dict:
    cols = [
        np.ones(len(steps)),
        [s.p for s in steps],
        [s.decode_batch for s in steps],
        [s.c for s in steps],
    ]
    names = ["base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"]
    if with_attn:
        cols.append([s.a for s in steps])
        names.append("per_prefill_attn_s")
    x = np.column_stack([np.asarray(c, dtype=float) for c in cols])
    w = 1.0 / y  # least squares on relative error
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    pred = x @ coef
    rel = np.abs(pred - y) / y
    dec_only = np.array([not s.chunks for s in steps])
    return {
        "coefficients": {k: float(v) for k, v in zip(names, coef, strict=True)},
        "abs_rel_err": {
            "median": float(np.median(rel)),
            "p90": float(np.percentile(rel, 90)),
            "max": float(rel.max()),
            "decode_only_median": float(np.median(rel[dec_only])),
            "with_prefill_median": float(np.median(rel[~dec_only])),
        },
        "_pred": pred,
    }


def kv_capacity(gpu: GpuSpec, spec: ModelSpec, util: float, overhead_gib: float) -> dict:
    weights = spec.n_params * 2
    free = gpu.mem_bytes * util - weights - overhead_gib * GIB
    tokens = int(free // spec.kv_bytes_per_token)
    return {
        "gpu_mem_bytes": gpu.mem_bytes,
        "gpu_mem_util": util,
        "weight_bytes": weights,
        "overhead_bytes": int(overhead_gib * GIB),
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "tokens": tokens,
        "blocks_of_16": tokens // 16,
    }


# ----------------------------------------------------------------------------------------------
# CLI


def parse_pair(v: str | None) -> tuple[str, str] | None:
    if not v:
        return None
    gpu, _, model = v.partition(":")
    if not model:
        raise argparse.ArgumentTypeError("expected GPU:MODEL, e.g. a100:meta-llama/Llama-2-7b-hf")
    return gpu, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--vidur-git-dir", help="Vidur git dir (read with git show)")
    src.add_argument("--vidur-dir", help="Vidur checkout (data/profiling/... under it)")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--gpu", required=True, choices=sorted(GPUS))
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--mlp-from", type=parse_pair, help="GPU:MODEL whose mlp.csv to shape-scale")
    ap.add_argument("--attention-from", type=parse_pair, help="GPU:MODEL whose attention to use")
    ap.add_argument("--mlp-csv", help="explicit mlp.csv (Vidur columns)")
    ap.add_argument("--attention-csv", help="explicit attention.csv (Vidur columns, any subset)")
    ap.add_argument("--attn-decode-scale", type=float)
    ap.add_argument("--attn-prefill-scale", type=float)
    ap.add_argument("--kv-save-scale", type=float)
    ap.add_argument("--kv-save", choices=("split", "off"), default="split")
    ap.add_argument("--no-preset", action="store_true", help="ignore the built-in preset")
    ap.add_argument("--gpu-mem-util", type=float, default=0.9)
    ap.add_argument("--overhead-gib", type=float, default=3.0)
    ap.add_argument("--json-out", help="also write the JSON result here")
    args = ap.parse_args(argv)

    preset = {} if args.no_preset else dict(PRESETS.get((args.gpu, args.model), {}))
    mlp_gpu, mlp_model = args.mlp_from or preset.get("mlp_from") or (args.gpu, args.model)
    att_gpu, att_model = (
        args.attention_from or preset.get("attention_from") or (args.gpu, args.model)
    )
    scales = {
        k: (getattr(args, k) if getattr(args, k) is not None else preset.get(k, 1.0))
        for k in ("attn_decode_scale", "attn_prefill_scale", "kv_save_scale")
    }
    spec, gpu = MODELS[args.model], GPUS[args.gpu]
    files = VidurFiles(args.vidur_git_dir, args.vidur_dir, args.rev)

    def get(path_opt: str | None, gpu_name: str, model: str, name: str) -> tuple[str, str]:
        if path_opt:
            return Path(path_opt).read_text(), path_opt
        rel = f"data/profiling/compute/{gpu_name}/{model}/{name}"
        text = files.read(rel)
        if text is None:
            raise SystemExit(f"cannot read {rel} from {files.describe()}; pass --{name[:-4]}-csv")
        return text, f"{files.describe()}:{rel}"

    mlp_text, mlp_src = get(args.mlp_csv, mlp_gpu, mlp_model, "mlp.csv")
    att_text, att_src = get(args.attention_csv, att_gpu, att_model, "attention.csv")
    decode, prefill, save_p, save_d = load_attention(att_text, MODELS[att_model])
    profile = Profile(
        load_linear_ops(mlp_text, MODELS[mlp_model], spec), decode, prefill, save_p, save_d
    )
    model = StepModel(
        profile,
        spec,
        scales["attn_decode_scale"],
        scales["attn_prefill_scale"],
        scales["kv_save_scale"],
        kv_save=args.kv_save == "split",
    )

    cap = kv_capacity(gpu, spec, args.gpu_mem_util, args.overhead_gib)
    cap_range = {
        f"{g:g}GiB": kv_capacity(gpu, spec, args.gpu_mem_util, g)["tokens"] for g in (2.0, 4.0)
    }
    steps = grid(spec, cap["tokens"])
    y = np.array([model.step_s(s) for s in steps])
    lin = fit(steps, y, with_attn=False)
    quad = fit(steps, y, with_attn=True)

    probes = {
        "decode_b1_ctx1024": Step((), 1, 1024),
        "decode_b64_ctx1024": Step((), 64, 1024),
        "decode_b256_ctx1024": Step((), 256, 1024),
        "prefill_512": Step(((512, 0),), 0, 0),
        "prefill_2048": Step(((2048, 0),), 0, 0),
        "prefill_4096": Step(((4096, 0),), 0, 0),
        "mixed_chunk512_b64_ctx1024": Step(((512, 0),), 64, 1024),
    }
    probe_out = {}
    for name, st in probes.items():
        ms = {k: v * spec.layers for k, v in model.layer_ms(st).items()}
        coef = lin["coefficients"]
        fit_s = (
            coef["base_s"]
            + coef["per_prefill_token_s"] * st.p
            + coef["per_decode_seq_s"] * st.decode_batch
            + coef["per_context_token_s"] * st.c
        )
        probe_out[name] = {
            "vidur_ms": round(sum(ms.values()), 3),
            "linear_fit_ms": round(1e3 * fit_s, 3),
            "attention_ms": round(ms["attn_decode"] + ms["attn_prefill"], 3),
            "kv_save_ms": round(ms["attn_kv_cache_save"], 3),
        }

    result = {
        "gpu": args.gpu,
        "gpu_name": gpu.name,
        "model": args.model,
        "tensor_parallel": 1,
        "sources": {
            "mlp": mlp_src,
            "mlp_model": mlp_model if mlp_model != args.model else None,
            "attention": att_src,
            "attention_gpu_model": f"{att_gpu}:{att_model}",
            "scales": scales,
        },
        "step_model": "step_s = base_s + per_prefill_token_s*P + per_decode_seq_s*D"
        " + per_context_token_s*C",
        "coefficients": lin["coefficients"],
        "fit_error": lin["abs_rel_err"],
        "variant_with_prefill_attn": {
            "A": "sum_chunks chunk_len * (cached_tokens + chunk_len)",
            "coefficients": quad["coefficients"],
            "fit_error": quad["abs_rel_err"],
        },
        "grid_points": len(steps),
        "kv_capacity": cap | {"tokens_overhead_range": cap_range},
        "probes": probe_out,
        "assumptions": [
            "linear interpolation in Vidur's profiled tables (not its RF/poly regressors)",
            "excludes embedding, LM head, sampling and CPU overheads (as Vidur model_time)",
            f"kv_cache_save mode: {args.kv_save} (per-kind lookup, not Vidur's pooled one)",
            "GQA batching overhead 10% when >1 sequence of a kind (Vidur default)",
            "tensor parallel 1, bf16 weights and KV cache",
        ],
    }
    if mlp_model != args.model:
        result["assumptions"].append(
            f"linear ops from {mlp_gpu}:{mlp_model} scaled by weight elements per op"
        )
    if (att_gpu, att_model) != (args.gpu, args.model):
        result["assumptions"].append(f"attention from {att_gpu}:{att_model} times scales {scales}")

    c = lin["coefficients"]
    e = lin["abs_rel_err"]
    print(f"{gpu.name} + {args.model} (TP=1), {len(steps)} grid steps")
    print(
        f"  base_s={c['base_s']:.4e} per_prefill_token_s={c['per_prefill_token_s']:.4e} "
        f"per_decode_seq_s={c['per_decode_seq_s']:.4e} "
        f"per_context_token_s={c['per_context_token_s']:.4e}"
    )
    print(f"  abs rel err: median {e['median']:.1%}  p90 {e['p90']:.1%}  max {e['max']:.1%}")
    q = quad["coefficients"]
    qe = quad["abs_rel_err"]
    print(
        f"  +attn term: per_prefill_attn_s={q['per_prefill_attn_s']:.4e}, "
        f"median {qe['median']:.1%} p90 {qe['p90']:.1%}"
    )
    print(f"  KV capacity: {cap['tokens']:,} tokens ({cap_range})")
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
