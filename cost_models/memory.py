"""Memory a stage needs: weights, KV cache and workspace, in bytes.

Contract (the planner imports these names):
    dtype_bytes_of(name)                                   -> float bytes per parameter
    layer_weight_bytes(arch, dtype_bytes=2)                -> int, one decoder block
    embedding_bytes(arch, dtype_bytes=2)                   -> int
    head_bytes(arch, dtype_bytes=2, has_embedding=False)   -> int, final norm + output projection
    kv_bytes_per_token_per_layer(arch, dtype_bytes=2)      -> int
    workspace_bytes(arch, n_tokens, dtype_bytes=2, is_last=False, n_logit_rows=0) -> int
    stage_memory(arch, start, end, batch, context, ...)    -> StageMemory (breakdown)
    stage_memory_bytes(arch, start, end, batch, context, ...) -> int (its total)
    stage_fits(arch, device, start, end, batch, context, ...) -> StageFit

A stage is the layer range [start, end) of `arch`; the first stage (start == 0) also holds
the embedding, the last (end == arch.n_layers) the final norm and the output projection.
With tied embeddings a last stage that is not also the first keeps its own copy of the
embedding matrix as its output projection, so tying only saves memory on a 1-stage pipeline.

`dtype_bytes` is bytes per weight parameter: 4 fp32, 2 bf16/fp16, 1 int8, 0.5625 q4
(4 bits plus a 16-bit scale per 32 weights = 4.5 bits). The KV cache and activations of a
quantised model stay in 16 bits (`kv_dtype_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models.device_catalog import DeviceKind
from cost_models.model_catalog import ModelArch

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "float32": 4.0,
    "bf16": 2.0,
    "bfloat16": 2.0,
    "fp16": 2.0,
    "float16": 2.0,
    "int8": 1.0,
    "q8": 1.0625,  # 8 bits + a 16-bit scale per 32 weights (GGUF Q8_0)
    "q4": 4.5 / 8,  # 4 bits + a 16-bit scale per 32 weights (GGUF Q4_0)
}

# vLLM's gpu_memory_utilization default: the rest covers the driver/CUDA context, the
# allocator's fragmentation, and the gap between a datasheet "80 GB" and what the driver reports.
DEFAULT_MEMORY_UTILIZATION = 0.90
# Logits are kept in fp32 for sampling.
LOGIT_BYTES = 4


def dtype_bytes_of(name: str) -> float:
    """Returns bytes per parameter for a dtype or quantisation name (fp32, bf16, int8, q4, ...)."""
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}") from None


def kv_dtype_bytes_for(dtype_bytes: float) -> float:
    """Returns the KV/activation element size that goes with weights of `dtype_bytes`.

    fp32 models keep fp32 KV; bf16 and every quantised format keep 16-bit KV.
    """
    return 4.0 if dtype_bytes >= 4 else 2.0


def layer_weight_bytes(arch: ModelArch, dtype_bytes: float = 2) -> int:
    """Returns the bytes of one decoder block's weights: params_per_layer * dtype_bytes."""
    return math.ceil(arch.params_per_layer * dtype_bytes)


def embedding_bytes(arch: ModelArch, dtype_bytes: float = 2) -> int:
    """Returns the bytes of the token embedding: vocab * hidden * dtype_bytes."""
    return math.ceil(arch.embedding_params * dtype_bytes)


def head_bytes(arch: ModelArch, dtype_bytes: float = 2, has_embedding: bool = False) -> int:
    """Returns the bytes of the final norm plus output projection (vocab * hidden).

    A tied head costs nothing extra only where the embedding lives on the same stage.
    """
    projection = 0 if (arch.tie_embeddings and has_embedding) else arch.embedding_params
    return math.ceil((arch.hidden_size + projection) * dtype_bytes)


def kv_bytes_per_token_per_layer(arch: ModelArch, dtype_bytes: float = 2) -> int:
    """Returns K and V bytes of one token in one layer: 2 * n_kv_heads * head_dim * dtype_bytes."""
    return math.ceil(2 * arch.kv_size * dtype_bytes)


def workspace_bytes(
    arch: ModelArch,
    n_tokens: int,
    dtype_bytes: float = 2,
    is_last: bool = False,
    n_logit_rows: int = 0,
) -> int:
    """Returns the peak activation bytes of one layer over `n_tokens` tokens in flight.

    Layers run one after another, so only one layer's intermediates are live:
    residual + normed input + q/k/v + attention output (2*hidden + q + 2*kv) and the MLP's
    gate, up and their product (3*ffn), all in the activation dtype. Attention scores are
    not materialised (flash/SDPA kernels tile them). The last stage adds fp32 logits for
    `n_logit_rows` rows (the batch in decode, one per sequence in prefill).
    """
    act = kv_dtype_bytes_for(dtype_bytes)
    per_token = 2 * arch.hidden_size + arch.q_size + 2 * arch.kv_size + 3 * arch.ffn_size
    logits = n_logit_rows * arch.vocab_size * LOGIT_BYTES if is_last else 0
    return math.ceil(n_tokens * per_token * act) + logits


@dataclass(frozen=True)
class StageMemory:
    """Bytes a stage needs, by part."""

    weights_bytes: int  # decoder blocks only
    embedding_bytes: int
    head_bytes: int
    kv_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.embedding_bytes
            + self.head_bytes
            + self.kv_bytes
            + self.workspace_bytes
        )


@dataclass(frozen=True)
class StageFit:
    """Whether a stage fits a device, with the numbers that decide it."""

    memory: StageMemory
    capacity_bytes: int  # device memory * utilisation
    fits: bool

    @property
    def free_bytes(self) -> int:
        """Capacity left after the stage (negative when it does not fit)."""
        return self.capacity_bytes - self.memory.total_bytes


def _check_range(arch: ModelArch, start: int, end: int) -> None:
    if not 0 <= start < end <= arch.n_layers:
        raise ValueError(
            f"stage [{start}, {end}) is not a non-empty range of {arch.name}'s "
            f"{arch.n_layers} layers"
        )


def stage_memory(
    arch: ModelArch,
    start: int,
    end: int,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    kv_dtype_bytes: float | None = None,
    prefill_chunk_tokens: int = 0,
) -> StageMemory:
    """Returns the memory breakdown of stage [start, end) serving `batch` sequences of `context`.

    kv = batch * context * (end - start) * kv_bytes_per_token_per_layer
    workspace = peak of one layer over max(batch, prefill_chunk_tokens) tokens in flight
    (prefill_chunk_tokens: the largest prefill the stage runs at once; 0 means decode only).
    """
    _check_range(arch, start, end)
    kv_elem = kv_dtype_bytes_for(dtype_bytes) if kv_dtype_bytes is None else kv_dtype_bytes
    is_first, is_last = start == 0, end == arch.n_layers
    n_layers = end - start
    return StageMemory(
        weights_bytes=n_layers * layer_weight_bytes(arch, dtype_bytes),
        embedding_bytes=embedding_bytes(arch, dtype_bytes) if is_first else 0,
        head_bytes=head_bytes(arch, dtype_bytes, has_embedding=is_first) if is_last else 0,
        kv_bytes=batch * context * n_layers * kv_bytes_per_token_per_layer(arch, kv_elem),
        workspace_bytes=workspace_bytes(
            arch,
            max(batch, prefill_chunk_tokens),
            dtype_bytes,
            is_last=is_last,
            n_logit_rows=batch,
        ),
    )


def stage_memory_bytes(
    arch: ModelArch,
    start: int,
    end: int,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    kv_dtype_bytes: float | None = None,
    prefill_chunk_tokens: int = 0,
) -> int:
    """Returns the total bytes of stage [start, end): see `stage_memory` for the parts."""
    return stage_memory(
        arch, start, end, batch, context, dtype_bytes, kv_dtype_bytes, prefill_chunk_tokens
    ).total_bytes


def stage_fits(
    arch: ModelArch,
    device: DeviceKind,
    start: int,
    end: int,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    kv_dtype_bytes: float | None = None,
    prefill_chunk_tokens: int = 0,
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
    memory_bytes: int | None = None,
) -> StageFit:
    """Returns whether stage [start, end) fits `device`: total <= memory * utilisation.

    memory_bytes overrides the catalog size (e.g. what discovery measured).
    """
    capacity = int(
        (device.memory_bytes if memory_bytes is None else memory_bytes) * memory_utilization
    )
    memory = stage_memory(
        arch, start, end, batch, context, dtype_bytes, kv_dtype_bytes, prefill_chunk_tokens
    )
    return StageFit(memory=memory, capacity_bytes=capacity, fits=memory.total_bytes <= capacity)
