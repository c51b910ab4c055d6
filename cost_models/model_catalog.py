"""Model architectures: one catalog entry feeds the runtime, the cost model and the planner.

The catalog lives in `data/models.yaml`; each entry carries the numbers of the model's
published config and the address it came from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cost_models.paths import DATA_DIR

MODELS_FILE = DATA_DIR / "models.yaml"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("llama3" rope type)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArch:
    """The shape of a Llama-family decoder (Llama, Mistral, Qwen2: RMSNorm, rotary attention,
    a SwiGLU MLP), with or without biases on its attention projections."""

    name: str
    n_layers: int
    hidden_size: int
    ffn_size: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_context: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int = 0  # 0 means hidden_size // n_heads
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors of the RoPE inverse frequencies [head_dim / 2], as a GGUF's
    # `rope_freqs.weight` stores Llama 3.1's scaling (llama.cpp's "freq factors").
    rope_freq_factors: tuple[float, ...] | None = None
    # Biases on the attention projections: Q, K and V (Qwen2; Llama with attention_bias), and
    # the output projection (Llama with attention_bias).
    qkv_bias: bool = False
    o_bias: bool = False
    # Sliding-window attention (Mistral; Qwen2 with use_sliding_window): in the layers of
    # `sliding_layers`, a query at position i attends the keys at positions j with
    # i - sliding_window < j <= i, as transformers' sliding mask. None (and no layers) when the
    # model has no window, or one that never binds within max_context.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    family: str = "llama"
    source: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if (self.sliding_window is None) != (not self.sliding_layers):
            raise ValueError(
                f"{self.name}: sliding_window {self.sliding_window} and sliding_layers "
                f"{list(self.sliding_layers)} must be given together"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.name}: sliding_window {self.sliding_window} is not a positive window")

    def window_of(self, layers: range) -> int | None:
        """The sliding window if any of `layers` uses it, else None: what a stage running
        `layers` builds its windowed attention masks for."""
        if self.sliding_window is None or not any(i in layers for i in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def bias_params_per_layer(self) -> int:
        """Biases of one decoder block (those of its attention projections, if it has any)."""
        return self.qkv_bias * (self.q_size + 2 * self.kv_size) + self.o_bias * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder block (attention with its biases, MLP, two norms)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.ffn_size
        return attn + self.bias_params_per_layer + mlp + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm plus the output projection (zero extra when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.n_layers * self.params_per_layer + self.head_params

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int) -> int:
        return 2 * self.kv_size * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["rope_scaling"] = None if self.rope_scaling is None else vars(self.rope_scaling)
        out["aliases"] = list(self.aliases)
        out["sliding_layers"] = list(self.sliding_layers)
        if self.rope_freq_factors is not None:
            out["rope_freq_factors"] = list(self.rope_freq_factors)
        return out


def arch_from_dict(entry: dict[str, Any]) -> ModelArch:
    entry = dict(entry)
    scaling = entry.pop("rope_scaling", None)
    aliases = tuple(entry.pop("aliases", ()) or ())
    factors = entry.pop("rope_freq_factors", None)
    sliding_layers = tuple(int(i) for i in entry.pop("sliding_layers", ()) or ())
    return ModelArch(
        **entry,
        sliding_layers=sliding_layers,
        rope_scaling=RopeScaling(**scaling) if scaling else None,
        rope_freq_factors=tuple(float(f) for f in factors) if factors else None,
        aliases=aliases,
    )


@functools.lru_cache(maxsize=1)
def load_model_catalog(path: Path = MODELS_FILE) -> dict[str, ModelArch]:
    """Returns every catalog model, keyed by its lower-cased name and aliases."""
    raw = yaml.safe_load(path.read_text())
    catalog: dict[str, ModelArch] = {}
    for entry in raw["models"]:
        arch = arch_from_dict(entry)
        for key in (arch.name, *arch.aliases):
            catalog[key.lower()] = arch
    return catalog


def get_model_arch(name: str) -> ModelArch:
    """Returns the catalog entry for `name` (case-insensitive), or raises KeyError with the choices."""
    catalog = load_model_catalog()
    try:
        return catalog[name.lower()]
    except KeyError:
        names = sorted({a.name for a in catalog.values()})
        raise KeyError(f"unknown model {name!r}; the catalog has: {', '.join(names)}") from None
