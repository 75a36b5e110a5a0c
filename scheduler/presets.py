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
from .profiles import LogNormalComponent, Prices, ServerProfile
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
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"server preset file not found: {name_or_path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read server preset {name_or_path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"server preset {name_or_path}: expected a JSON object")
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
