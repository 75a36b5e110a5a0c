"""Named self-hosted server presets (continuous-batching replicas), their JSON form, and the
load-free server profile a policy starts from.

Every number carries its source or says it is our assumption. ``disco profile --fit-batching``
writes the same JSON from a live OpenAI-compatible server, so a GPU owner calibrates the emulation
from their own vLLM; ``disco sim --list-server-presets`` lists what is registered.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .batching import ServerPreset, StepModel
from .profiles import LogNormalComponent, Prices, ServerProfile, read_json_object
from .registry import Registry

SERVER_PRESETS: Registry[ServerPreset] = Registry("server preset")


def preset_to_dict(p: ServerPreset) -> dict[str, Any]:
    d = asdict(p)
    d["kind"] = "server-preset"
    return d


def preset_from_dict(d: dict[str, Any]) -> ServerPreset:
    d = dict(d)
    if d.pop("kind", "server-preset") != "server-preset":
        raise ValueError("not a server preset (expected \"kind\": \"server-preset\")")
    known = {f.name for f in fields(ServerPreset)}
    extra = sorted(set(d) - known)
    for k in extra:  # provenance (date, machine, samples...) stays in the file
        d.pop(k)
    try:
        d["step"] = StepModel(**d["step"])
        return ServerPreset(**d)
    except (TypeError, KeyError) as e:
        raise ValueError(f"malformed server preset: {e}") from None


def save_preset(p: ServerPreset, path: str | Path, **provenance: Any) -> None:
    d = preset_to_dict(p)
    d.update(provenance)
    Path(path).write_text(json.dumps(d, indent=2) + "\n")


def load_preset(name_or_path: str | ServerPreset) -> ServerPreset:
    """A registered preset name or a JSON file written by ``disco profile --fit-batching``."""
    if isinstance(name_or_path, ServerPreset):
        return name_or_path
    if name_or_path in SERVER_PRESETS:
        return SERVER_PRESETS.get(name_or_path)
    data = read_json_object(name_or_path, "server preset")
    if data is not None:
        return preset_from_dict(data)
    return SERVER_PRESETS.get(name_or_path)  # raises UnknownNameError listing the known names


def is_preset(name_or_path: str) -> bool:
    """Whether a name or file is a server preset (rather than an API-service profile)."""
    if name_or_path in SERVER_PRESETS:
        return True
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".json":
        try:
            return json.loads(path.read_text()).get("kind") == "server-preset"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def preset_profile(p: ServerPreset, typical_context: float = 1024.0) -> ServerProfile:
    """The load-free ServerProfile of a preset: what a policy assumes before it has observed any
    server TTFT (an idle replica: prefill only), and the per-token prices its cost arithmetic uses.
    The live and simulated policies then learn the loaded TTFT distribution online."""
    base = p.unloaded_ttft(1)
    return ServerProfile(
        name=f"preset:{p.name}",
        prices=Prices(p.input_per_mtok, p.output_per_mtok),
        tbt_s=p.unloaded_tbt(typical_context),
        tbt_cv=0.05,
        ttft_mixture=(LogNormalComponent(1.0, max(base, 1e-4), 0.05),),
        ttft_per_prompt_token_s=p.step.prefill_token_s,
        source=f"load-free view of server preset {p.name}",
    )


# --- Named presets ----------------------------------------------------------------------------
# llama.cpp on this project's 2-core CI-class machine, from the committed measurement of the real
# llama.cpp replica's engine (scheduler/data/profile-llamacpp-gemma3-270m.json: TTFT 3.7 ms +
# l / 571 tok/s, decode 64 tok/s, 2 threads). Our llama.cpp engine serves one stream at a time
# (max_num_seqs 1), prefills in llama.cpp's default n_batch of 512 tokens, in the demo's n_ctx of
# 2048. decode_seq_s = 1/64 - base.
SERVER_PRESETS.add(
    "llamacpp-gemma3-270m-cpu2",
    ServerPreset(
        name="llamacpp-gemma3-270m-cpu2",
        step=StepModel(base_s=0.0037, prefill_token_s=1 / 571.5, decode_seq_s=1 / 64.1 - 0.0037),
        kv_tokens=2048,
        max_batched_tokens=512,
        max_num_seqs=1,
        block_size=1,
        prefix_caching=False,  # a fresh llama.cpp context per stream in our engine
        usd_per_hour=0.0,  # [assumption] a CPU box already owned
        input_per_mtok=0.15,  # [assumption] priced like gpt-4o-mini so cost columns compare
        output_per_mtok=0.60,
        model="gemma-3-270m Q4_K_M (GGUF)",
        hardware="2 CPU cores (x86-64, AVX-512), llama.cpp 2 threads",
        source="fitted from scheduler/data/profile-llamacpp-gemma3-270m.json (measured here)",
    ),
)

# The same engine as the demo's llama.cpp server replica runs it: 1 thread (n_threads 1, beside the
# real device agent's llama.cpp on the other core). Measured here by `disco profile --endpoint
# llamacpp --model gemma3-270m --threads 1` (scheduler/data/profile-llamacpp-gemma3-270m-1thread
# .json): prefill 311 tok/s, decode 50 tok/s, no measurable fixed TTFT term.
SERVER_PRESETS.add(
    "llamacpp-gemma3-270m-cpu1",
    ServerPreset(
        name="llamacpp-gemma3-270m-cpu1",
        step=StepModel(base_s=0.0, prefill_token_s=1 / 311.1, decode_seq_s=1 / 49.94),
        kv_tokens=2048,
        max_batched_tokens=512,
        max_num_seqs=1,
        block_size=1,
        prefix_caching=False,
        usd_per_hour=0.0,  # [assumption] a CPU box already owned
        input_per_mtok=0.15,  # [assumption] priced like gpt-4o-mini so cost columns compare
        output_per_mtok=0.60,
        model="gemma-3-270m Q4_K_M (GGUF)",
        hardware="1 thread of a 2-core x86-64 box, llama.cpp (the demo's server replica)",
        source="fitted from scheduler/data/profile-llamacpp-gemma3-270m-1thread.json (measured here)",
    ),
)

# Llama-3-8B (bf16) under vLLM on one NVIDIA A10G (24 GB, 600 GB/s; AWS g5.xlarge). The demo's
# default: a GPU class whose queue matters at the rates this 2-core machine can stream through
# Ray Serve. Our first-principles numbers (assumptions, to be replaced by a fit from a real
# replica with `disco profile --fit-batching`):
# - base_s: a decode step reads all 16.06 GB of weights: 16.06 / 600 GB/s = 26.8 ms at peak
#   bandwidth; ~30 ms at the ~90 % that memory-bound kernels reach.
# - context_token_s: each context token's KV (2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB)
#   read once per step: 131072 / 600e9 = 0.22 us.
# - decode_seq_s: 0.2 ms per sequence for sampling, logits and scheduling (assumption).
# - prefill_token_s: 2 x 8.0e9 FLOPs per token at ~45 % of the A10G's ~70 dense bf16 TFLOPS
#   -> 0.5 ms/token... measured vLLM prefill on A10G is ~2.5-3k tokens/s: 0.35 ms (assumption).
# - kv_tokens: 24 GB x 0.9 (gpu_memory_utilization) - 16.06 GB weights - ~1.5 GB activations
#   = ~4.0 GB / 128 KiB = ~30k tokens.
# - max_batched_tokens 2048, max_num_seqs 256: vLLM V1's defaults for the OpenAI server on GPUs
#   of this size (vllm/engine/arg_utils.py).
# - usd_per_hour: AWS g5.xlarge on-demand list price (us-east-1), $1.006/h.
# - per-token prices: Together AI's list price for Llama 3 8B Instruct Turbo, $0.18 / 1M tokens in
#   and out, as the "API equivalent" the policies' migration arithmetic uses.
SERVER_PRESETS.add(
    "llama3-8b-a10g",
    ServerPreset(
        name="llama3-8b-a10g",
        step=StepModel(base_s=0.030, prefill_token_s=3.5e-4, decode_seq_s=2.0e-4,
                       context_token_s=2.2e-7),  # fmt: skip
        kv_tokens=30_000,
        max_batched_tokens=2048,
        max_num_seqs=256,
        block_size=16,
        prefix_caching=True,
        usd_per_hour=1.006,
        input_per_mtok=0.18,
        output_per_mtok=0.18,
        model="Llama-3-8B bf16 under vLLM",
        hardware="1 x NVIDIA A10G 24 GB (AWS g5.xlarge)",
        source="first-principles estimate from the A10G's bandwidth and FLOPs (assumptions "
        "stated in scheduler/presets.py); price: AWS on-demand list",
    ),
)


# Fitted by bench/fit_vidur_preset.py from Microsoft Vidur's GPU profiling data (microsoft/vidur @
# 7d47513, data/profiling/compute/<gpu>/<model>/{mlp,attention}.csv, TP 1): per-operator times
# summed over 32 layers for 1,975 synthetic steps (chunked prefill 0-4096 tokens, decode batches
# 0-256, contexts up to the model's maximum), then the linear step model fitted on them (fit error:
# median relative error; P90 in the comments). Excluded, as Vidur excludes them: LM head,
# sampling and CPU overheads (~1-1.5 ms a step). Cross-check (LambdaLabsML/vllm-benchmark,
# Llama-3-8B-Instruct, 10 concurrent 1,369-token prompts): measured TTFT 126.7 ms / TPOT 12.0 ms
# on A100, 62.2 / 7.56 ms on H100; these models predict a 139 / 57.5 ms prefill and a 10.5 / 6.3 ms
# decode step at batch 1. KV: (GPU memory x 0.9 - weights - 3 GiB) / KV bytes per token.
# Prices: on-demand cloud list prices per GPU-hour (assumption: typical 2024-25 offers).
SERVER_PRESETS.add(
    "llama3-8b-a100",
    ServerPreset(
        name="llama3-8b-a100",
        step=StepModel(base_s=9.47e-3, prefill_token_s=9.47e-5, decode_seq_s=4.11e-5,
                       context_token_s=9.17e-8, fit_error=0.053),  # fmt: skip  P90 13.3 %
        kv_tokens=442_715,
        max_batched_tokens=8192,
        max_num_seqs=256,
        usd_per_hour=1.79,
        input_per_mtok=0.18,
        output_per_mtok=0.18,
        model="Llama-3-8B bf16 under vLLM",
        hardware="1 x NVIDIA A100-SXM 80 GB",
        source="fitted from Vidur's A100 Llama-3-8B profiles (bench/fit_vidur_preset.py)",
    ),
)
SERVER_PRESETS.add(
    "llama3-8b-h100",
    ServerPreset(
        name="llama3-8b-h100",
        step=StepModel(base_s=6.04e-3, prefill_token_s=3.76e-5, decode_seq_s=1.39e-5,
                       context_token_s=5.63e-8, fit_error=0.062),  # fmt: skip  P90 17.6 %
        kv_tokens=440_116,
        max_batched_tokens=8192,
        max_num_seqs=256,
        usd_per_hour=2.99,
        input_per_mtok=0.18,
        output_per_mtok=0.18,
        model="Llama-3-8B bf16 under vLLM",
        hardware="1 x NVIDIA H100-SXM 80 GB",
        source="estimate: Vidur's H100 Llama-2-7B GEMM profiles scaled to Llama-3-8B's weights, "
        "A100 attention scaled by bandwidth (x0.609) and FlashAttention throughput (x0.6)",
    ),
)
SERVER_PRESETS.add(
    "llama2-7b-a40",
    ServerPreset(
        name="llama2-7b-a40",
        step=StepModel(base_s=2.28e-2, prefill_token_s=1.47e-4, decode_seq_s=5.20e-5,
                       context_token_s=8.32e-7, fit_error=0.066),  # fmt: skip  P90 13.8 %
        kv_tokens=51_073,
        max_batched_tokens=4096,
        max_num_seqs=256,
        usd_per_hour=0.79,
        input_per_mtok=0.18,
        output_per_mtok=0.18,
        model="Llama-2-7B fp16 under vLLM (Vidur's older FlashAttention profiles, 4k context)",
        hardware="1 x NVIDIA A40 48 GB",
        source="fitted from Vidur's A40 Llama-2-7B profiles (bench/fit_vidur_preset.py)",
    ),
)
