"""Latency and cost profiles of servers and devices.

A *server* profile: a TTFT distribution (empirical samples or a log-normal mixture; weakly
dependent on prompt length), a time between tokens, and list prices per token.
A *device* profile: TTFT = a + c * prompt_len (llama.cpp-style prefill), a decode speed, and energy
per token, linear in FLOPs (2 x params per token), converted to money by ``lambda_usd_per_j``.

Named profiles for the paper's services and devices ship below; every number carries a comment
saying where it comes from or that it is our assumption. Profiles also load from JSON (the
``disco profile`` command writes that format) and can be fitted from measured samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .registry import Registry
from .types import DeviceQueue

# Money per joule of device energy (paper-notes.md: "converted to money by an exchange rate lambda").
# [R] our assumption: 1e-6 USD/J makes ~0.3 J/token (a 1B model on a phone) cost ~$0.3 per 1M
# tokens, the same order as small-model API prices, so the trade-off is not degenerate.
DEFAULT_LAMBDA_USD_PER_J = 1e-6
# [R] ours (issue 14): lambda is part of the regime. The device-constrained regime only makes sense
# where device work is the scarce, dear resource: at 5e-5 USD/J (a 15 Wh phone battery valued at
# ~$2.7 a charge) device decoding costs $4.5 (Xiaomi 14, Qwen-0.5B) to $13.2 (Pixel 7 Pro,
# BLOOM-1.1B) per million tokens, above every shipped server's output price ($0.28-2.00), so that
# moving decoding to the server pays. The server-constrained regime keeps 1e-6 USD/J, where device
# decoding ($0.09-0.26 per million tokens) is the cheaper endpoint. `disco sim --lambda` overrides.
DEVICE_REGIME_LAMBDA_USD_PER_J = 5e-5


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per one million tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: float, output_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class LogNormalComponent:
    weight: float
    median_s: float
    sigma: float


@dataclass(frozen=True)
class ServerProfile:
    """Server TTFT = network + queueing + prefill; long-tailed and weakly length-dependent."""

    name: str
    prices: Prices
    tbt_s: float  # mean time between tokens once streaming
    tbt_cv: float = 0.2  # coefficient of variation of the inter-token gap
    ttft_samples: tuple[float, ...] = ()  # empirical TTFTs (seconds); used if non-empty
    ttft_mixture: tuple[LogNormalComponent, ...] = ()  # else this parametric form
    ttft_per_prompt_token_s: float = 0.0  # weak prompt-length dependence
    source: str = ""
    kind: str = field(default="server", init=False)

    def __post_init__(self) -> None:
        if not self.ttft_samples and not self.ttft_mixture:
            raise ValueError(f"server profile {self.name!r} needs ttft_samples or ttft_mixture")
        if self.tbt_s <= 0:
            raise ValueError(f"server profile {self.name!r}: tbt_s must be > 0")
        if self.ttft_mixture:
            w = sum(c.weight for c in self.ttft_mixture)
            if not math.isclose(w, 1.0, rel_tol=1e-6):
                raise ValueError(f"server profile {self.name!r}: mixture weights sum to {w}, not 1")

    def sample_ttft(self, rng: np.random.Generator, prompt_tokens: np.ndarray | int) -> np.ndarray:
        """One TTFT per prompt length, in seconds."""
        lens = np.atleast_1d(np.asarray(prompt_tokens, dtype=float))
        n = lens.shape[0]
        if self.ttft_samples:
            base = rng.choice(np.asarray(self.ttft_samples), size=n, replace=True)
        else:
            weights = np.array([c.weight for c in self.ttft_mixture])
            comp = rng.choice(len(self.ttft_mixture), size=n, p=weights)
            med = np.array([c.median_s for c in self.ttft_mixture])[comp]
            sig = np.array([c.sigma for c in self.ttft_mixture])[comp]
            base = med * np.exp(sig * rng.standard_normal(n))
        return base + self.ttft_per_prompt_token_s * lens

    def sample_tbt(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _gamma_gaps(rng, self.tbt_s, self.tbt_cv, n)


@dataclass(frozen=True)
class DeviceProfile:
    """On-device engine: TTFT = ttft_base_s + prompt_len / prefill_tps; decode at decode_tps."""

    name: str
    ttft_base_s: float
    prefill_tps: float
    decode_tps: float
    params_b: float  # model parameters, billions (for FLOPs-linear energy)
    j_per_gflop: float  # device energy efficiency
    decode_cv: float = 0.1
    lambda_usd_per_j: float = DEFAULT_LAMBDA_USD_PER_J
    source: str = ""
    kind: str = field(default="device", init=False)

    def __post_init__(self) -> None:
        for k in ("prefill_tps", "decode_tps", "params_b", "j_per_gflop"):
            if getattr(self, k) <= 0:
                raise ValueError(f"device profile {self.name!r}: {k} must be > 0")
        if self.ttft_base_s < 0:
            raise ValueError(f"device profile {self.name!r}: ttft_base_s must be >= 0")

    def ttft(self, prompt_tokens: np.ndarray | float) -> np.ndarray | float:
        return self.ttft_base_s + np.asarray(prompt_tokens, dtype=float) / self.prefill_tps

    def queue_delay(self, queue: DeviceQueue | None) -> float:
        """Seconds until a new request starts on a device with this ``queue`` (0 if a slot is
        free). [R] ours: the work ahead (each waiting stream's start-up and prefill, every
        stream's expected remaining decode) at this profile's speeds, shared over the slots."""
        if queue is None or not queue.busy:
            return 0.0
        work = (
            queue.waiting * self.ttft_base_s
            + queue.prefill_tokens / self.prefill_tps
            + queue.decode_tokens / self.decode_tps
        )
        return work / queue.slots

    @property
    def tbt_s(self) -> float:
        return 1.0 / self.decode_tps

    @property
    def energy_per_token_j(self) -> float:
        # ~2 FLOPs per parameter per token (prefill and decode alike, paper-notes.md).
        return 2.0 * self.params_b * self.j_per_gflop

    def energy_j(self, tokens: float) -> float:
        return tokens * self.energy_per_token_j

    def cost_usd(self, tokens: float) -> float:
        return self.energy_j(tokens) * self.lambda_usd_per_j

    def sample_tbt(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _gamma_gaps(rng, self.tbt_s, self.decode_cv, n)


def _gamma_gaps(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    if cv <= 0:
        return np.full(n, mean)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, mean / shape, size=n)


Profile = ServerProfile | DeviceProfile


def regime_lambda(regime: str) -> float:
    """The default device-energy price (USD/J) of a regime ("device" or "server" constrained)."""
    key = getattr(regime, "value", regime)
    if key not in ("device", "server"):
        raise ValueError(f"regime must be 'device' or 'server', got {regime!r}")
    return DEVICE_REGIME_LAMBDA_USD_PER_J if key == "device" else DEFAULT_LAMBDA_USD_PER_J


def with_lambda(device: DeviceProfile, lambda_usd_per_j: float) -> DeviceProfile:
    """``device`` with its energy priced at ``lambda_usd_per_j`` (the migration planner compares
    decode costs through ``DeviceProfile.cost_usd``, so the price reaches it this way)."""
    if not lambda_usd_per_j >= 0.0:
        raise ValueError(f"lambda must be >= 0 USD/J, got {lambda_usd_per_j}")
    if device.lambda_usd_per_j == lambda_usd_per_j:
        return device
    return replace(device, lambda_usd_per_j=float(lambda_usd_per_j))

SERVER_PROFILES: Registry[ServerProfile] = Registry("server profile")
DEVICE_PROFILES: Registry[DeviceProfile] = Registry("device profile")

# --- Named server profiles -------------------------------------------------------------------
# Prices: the providers' public list prices (USD / 1M tokens) at the time of the paper (2024-25).
# TTFT shapes: [N] paper-notes.md says GPT-4o-mini TTFT ranges from 0.3 s to several seconds under
# load and is weakly correlated with prompt length. The log-normal mixtures (a body plus a slow
# "congested" component) are OUR ASSUMPTION chosen to match that description; replace them with
# measured samples (`disco profile` or fit_server_profile) when you have them.
SERVER_PROFILES.add(
    "gpt-4o-mini",
    ServerProfile(
        name="gpt-4o-mini",
        prices=Prices(0.15, 0.60),  # OpenAI list price
        tbt_s=1 / 80,  # ~80 tok/s streaming: assumption from public latency dashboards
        ttft_mixture=(LogNormalComponent(0.88, 0.45, 0.35), LogNormalComponent(0.12, 1.6, 0.6)),
        ttft_per_prompt_token_s=2e-5,
        source="prices: OpenAI list; TTFT mixture: assumption after paper-notes [N]",
    ),
)
SERVER_PROFILES.add(
    "deepseek-v2.5",
    ServerProfile(
        name="deepseek-v2.5",
        prices=Prices(0.14, 0.28),  # DeepSeek list price (cache miss)
        tbt_s=1 / 40,  # assumption
        ttft_mixture=(LogNormalComponent(0.85, 0.9, 0.4), LogNormalComponent(0.15, 3.0, 0.5)),
        ttft_per_prompt_token_s=5e-5,
        source="prices: DeepSeek list; TTFT mixture: assumption",
    ),
)
SERVER_PROFILES.add(
    "command",
    ServerProfile(
        name="command",
        prices=Prices(1.0, 2.0),  # Cohere Command list price
        tbt_s=1 / 50,  # assumption
        ttft_mixture=(LogNormalComponent(0.8, 0.5, 0.45), LogNormalComponent(0.2, 2.2, 0.7)),
        ttft_per_prompt_token_s=3e-5,
        source="prices: Cohere list; TTFT mixture: assumption (paper shows Command has the heaviest tail)",
    ),
)
SERVER_PROFILES.add(
    "llama-3-70b",
    ServerProfile(
        name="llama-3-70b",
        prices=Prices(0.88, 0.88),  # Together AI list price for Llama-3-70B
        tbt_s=1 / 60,  # assumption
        ttft_mixture=(LogNormalComponent(0.9, 0.6, 0.3), LogNormalComponent(0.1, 1.8, 0.5)),
        ttft_per_prompt_token_s=4e-5,
        source="prices: Together AI list; TTFT mixture: assumption",
    ),
)

# --- Named device profiles -------------------------------------------------------------------
# [N] devices from the paper; the speeds below are OUR ASSUMPTIONS from public llama.cpp/MLC
# phone benchmarks of similar model sizes (int4): replace with `disco profile` measurements.
# Energy: ~0.15-0.3 J/token for a ~1B model on a phone SoC (assumption), i.e. j_per_gflop ~0.1.
DEVICE_PROFILES.add(
    "pixel7pro-bloom1.1b",
    DeviceProfile(
        name="pixel7pro-bloom1.1b",
        ttft_base_s=0.08,
        prefill_tps=180.0,
        decode_tps=12.0,
        params_b=1.1,
        j_per_gflop=0.12,
        source="assumption after public phone benchmarks (Tensor G2, int4, ~1B)",
    ),
)
DEVICE_PROFILES.add(
    "xiaomi14-qwen0.5b",
    DeviceProfile(
        name="xiaomi14-qwen0.5b",
        ttft_base_s=0.05,
        prefill_tps=420.0,
        decode_tps=28.0,
        params_b=0.5,
        j_per_gflop=0.09,
        source="assumption after public phone benchmarks (Snapdragon 8 Gen 3, int4, 0.5B)",
    ),
)


# --- JSON and fitting --------------------------------------------------------------------------
def profile_to_dict(p: Profile) -> dict[str, Any]:
    d = asdict(p)
    d["kind"] = p.kind
    return d


def profile_from_dict(d: dict[str, Any]) -> Profile:
    d = dict(d)
    kind = d.pop("kind", None)
    meta_keys = {"measured", "machine", "date", "engine", "model", "samples"}
    extra = {k: d.pop(k) for k in list(d) if k in meta_keys}
    del extra  # provenance fields are kept in the file, not in the profile object
    try:
        if kind == "server":
            d["prices"] = Prices(**d["prices"])
            d["ttft_samples"] = tuple(float(x) for x in d.get("ttft_samples", ()))
            d["ttft_mixture"] = tuple(LogNormalComponent(**c) for c in d.get("ttft_mixture", ()))
            return ServerProfile(**d)
        if kind == "device":
            return DeviceProfile(**d)
    except (TypeError, KeyError) as e:
        raise ValueError(f"malformed {kind} profile: {e}") from None
    raise ValueError(f"profile 'kind' must be 'server' or 'device', got {kind!r}")


def read_json_object(name_or_path: str, what: str) -> dict[str, Any] | None:
    """The JSON object in a file named like one (``.json``, or an existing path); None when the
    name is not a file name (a registered name, then). Clear ValueErrors for bad files."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" or path.exists()):
        return None
    if not path.is_file():
        raise ValueError(f"{what} file not found: {name_or_path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {name_or_path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {name_or_path}: expected a JSON object")
    return data


def load_profile(name_or_path: str, kind: str) -> Profile:
    """A named profile, or a JSON file (as written by ``disco profile``). For servers,
    ``preset:NAME`` is the load-free view of a self-hosted server preset (``presets.py``)."""
    if kind == "server" and name_or_path.startswith("preset:"):
        from .presets import load_preset, preset_profile  # presets builds on this module

        return preset_profile(load_preset(name_or_path.removeprefix("preset:")))
    reg = SERVER_PROFILES if kind == "server" else DEVICE_PROFILES
    if name_or_path in reg:
        return reg.get(name_or_path)
    data = read_json_object(name_or_path, f"{kind} profile")
    if data is not None:
        prof = profile_from_dict(data)
        if prof.kind != kind:
            raise ValueError(f"{name_or_path} is a {prof.kind} profile, expected {kind}")
        return prof
    return reg.get(name_or_path)  # raises UnknownNameError listing the known names


def save_profile(p: Profile, path: str | Path, **provenance: Any) -> None:
    d = profile_to_dict(p)
    d.update(provenance)
    Path(path).write_text(json.dumps(d, indent=2) + "\n")


def fit_device_profile(
    name: str,
    prompt_tokens: list[float] | np.ndarray,
    ttfts_s: list[float] | np.ndarray,
    decode_tps: float,
    params_b: float,
    j_per_gflop: float = 0.1,
    source: str = "fitted",
) -> DeviceProfile:
    """Least-squares fit of TTFT = a + l / prefill_tps from measured (prompt length, TTFT) pairs."""
    x = np.asarray(prompt_tokens, dtype=float)
    y = np.asarray(ttfts_s, dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("fitting a device profile needs TTFTs at >= 2 distinct prompt lengths")
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(float(slope), 1e-6)
    return DeviceProfile(
        name=name,
        ttft_base_s=max(float(intercept), 0.0),
        prefill_tps=1.0 / slope,
        decode_tps=decode_tps,
        params_b=params_b,
        j_per_gflop=j_per_gflop,
        source=source,
    )


def fit_server_profile(
    name: str,
    ttfts_s: list[float] | np.ndarray,
    tbts_s: list[float] | np.ndarray,
    prices: Prices,
    source: str = "fitted",
) -> ServerProfile:
    """An empirical server profile from measured TTFTs and inter-token gaps."""
    t = np.asarray(ttfts_s, dtype=float)
    g = np.asarray(tbts_s, dtype=float)
    if t.size == 0 or g.size == 0:
        raise ValueError("fitting a server profile needs TTFT and TBT samples")
    mean = float(g.mean())
    cv = float(g.std() / mean) if mean > 0 else 0.0
    return ServerProfile(
        name=name,
        prices=prices,
        tbt_s=mean,
        tbt_cv=cv,
        ttft_samples=tuple(float(v) for v in t),
        source=source,
    )
