"""How much work one decoder layer does: FLOPs and bytes moved, for prefill and decode.

Contract (latency and calibration read these; all pure functions of the architecture):
    matmul_params_per_layer(arch)                                         -> int
    layer_prefill_flops(arch, n_tokens, batch=1, context_before=0)        -> float
    layer_prefill_dense_bytes / layer_prefill_kv_bytes / layer_prefill_bytes(arch, n_tokens, ...)
    layer_decode_flops(arch, batch, context)                              -> float
    layer_decode_dense_bytes / layer_decode_kv_bytes / layer_decode_bytes(arch, batch, ...)
    hidden_bytes(arch, n_tokens, dtype_bytes=2)                           -> int

    flops = 2 * matmul_params * tokens + 4 * q_size * (query-key pairs)    (QK^T and AV)
    dense bytes = weights + hidden states in and out;  KV bytes = KV read + KV written
Decode attends each of `batch` new tokens to `context` cached ones plus itself; prefill of
n tokens attends causally (n(n+1)/2 pairs per sequence) on top of `context_before`.
`dtype_bytes` is bytes per weight; KV and activations are 4 bytes for fp32 models, else 2.
"""

from __future__ import annotations

from cost_models.memory import kv_bytes_per_token_per_layer, kv_dtype_bytes_for, layer_weight_bytes
from cost_models.model_catalog import ModelArch


def matmul_params_per_layer(arch: ModelArch) -> int:
    """Returns the parameters of one block that take part in matmuls (all but the two norms
    and the biases)."""
    return arch.params_per_layer - 2 * arch.hidden_size - arch.bias_params_per_layer


def layer_prefill_flops(
    arch: ModelArch, n_tokens: int, batch: int = 1, context_before: int = 0
) -> float:
    """Returns FLOPs of one layer prefilling `batch` sequences of n_tokens each.

    batch * (2 * matmul_params * n + 4 * q_size * (n * context_before + n(n+1)/2))
    """
    pairs = n_tokens * context_before + n_tokens * (n_tokens + 1) / 2
    return batch * (2 * matmul_params_per_layer(arch) * n_tokens + 4 * arch.q_size * pairs)


def layer_prefill_dense_bytes(
    arch: ModelArch, n_tokens: int, dtype_bytes: float = 2, batch: int = 1
) -> float:
    """Returns weight and hidden-state bytes of one layer's prefill: weights + 2 * batch * n * hidden."""
    hidden = 2 * batch * n_tokens * arch.hidden_size * kv_dtype_bytes_for(dtype_bytes)
    return layer_weight_bytes(arch, dtype_bytes) + hidden


def layer_prefill_kv_bytes(
    arch: ModelArch, n_tokens: int, dtype_bytes: float = 2, batch: int = 1, context_before: int = 0
) -> float:
    """Returns KV bytes of one layer's prefill: batch * (context_before + 2n) * kv per token.

    The cached context is read once, the new keys and values written once and read once.
    """
    kv_token = kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(dtype_bytes))
    return batch * (context_before + 2 * n_tokens) * kv_token


def layer_prefill_bytes(
    arch: ModelArch, n_tokens: int, dtype_bytes: float = 2, batch: int = 1, context_before: int = 0
) -> float:
    """Returns all bytes one layer moves prefilling: dense + KV."""
    return layer_prefill_dense_bytes(arch, n_tokens, dtype_bytes, batch) + layer_prefill_kv_bytes(
        arch, n_tokens, dtype_bytes, batch, context_before
    )


def layer_decode_flops(arch: ModelArch, batch: int, context: int) -> float:
    """Returns FLOPs of one decode step of one layer: batch * (2 * matmul_params + 4 * q_size * (context + 1))."""
    return batch * (2 * matmul_params_per_layer(arch) + 4 * arch.q_size * (context + 1))


def layer_decode_dense_bytes(arch: ModelArch, batch: int, dtype_bytes: float = 2) -> float:
    """Returns weight and hidden-state bytes of one decode step: weights + 2 * batch * hidden."""
    hidden = 2 * batch * arch.hidden_size * kv_dtype_bytes_for(dtype_bytes)
    return layer_weight_bytes(arch, dtype_bytes) + hidden


def layer_decode_kv_bytes(
    arch: ModelArch, batch: int, context: int, dtype_bytes: float = 2
) -> float:
    """Returns KV bytes of one decode step: batch * (context + 1) * kv per token (read + the new write)."""
    return (
        batch * (context + 1) * kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(dtype_bytes))
    )


def layer_decode_bytes(arch: ModelArch, batch: int, context: int, dtype_bytes: float = 2) -> float:
    """Returns all bytes one decode step of one layer moves: dense + KV."""
    return layer_decode_dense_bytes(arch, batch, dtype_bytes) + layer_decode_kv_bytes(
        arch, batch, context, dtype_bytes
    )


def hidden_bytes(arch: ModelArch, n_tokens: int, dtype_bytes: float = 2) -> int:
    """Returns bytes of the hidden states of n_tokens passed between stages: n * hidden * act."""
    return int(n_tokens * arch.hidden_size * kv_dtype_bytes_for(dtype_bytes))
