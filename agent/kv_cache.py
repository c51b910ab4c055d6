"""A paged KV cache for the layers of one stage.

Fixed-size blocks of `block_size` token slots; each request owns a block table (the same
block ids for every layer of the stage). K and V live per layer as head-major slot arrays
`[n_kv_heads, num_blocks * block_size, head_dim]` (gathering a batch's slots then yields
`[n_kv_heads, tokens, head_dim]`, contiguous, ready for attention), so a stage can gain or drop a layer's
storage without touching the others, and a request's cache for any
`(layer range, token range)` can be exported and imported as one contiguous tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFullError(RuntimeError):
    """Raised when a request needs more blocks than are free; the caller makes it wait."""


@dataclass(frozen=True)
class KVCacheSpec:
    """The layout of the cache, described once: allocator, exporter and cost model read it."""

    block_size: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def bytes_per_token_per_layer(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def block_bytes(self, n_layers: int) -> int:
        return self.block_size * self.bytes_per_token_per_layer * n_layers

    def blocks_for_budget(self, budget_bytes: int, n_layers: int) -> int:
        """Returns how many blocks fit in `budget_bytes` for a stage of `n_layers` layers."""
        return max(0, budget_bytes // max(1, self.block_bytes(n_layers)))

    def blocks_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, layers: range, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise the memory budget")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer in layers:
            self.add_layer(layer)
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.block_tables: dict[str, list[int]] = {}
        # Reused gather buffers: a fresh multi-MB tensor per layer per step would cost page
        # faults on every touch (glibc hands large blocks back to the OS on free).
        self._gather_k = torch.empty(0, dtype=spec.dtype, device=self.device)
        self._gather_v = torch.empty(0, dtype=spec.dtype, device=self.device)

    # ---- layers -------------------------------------------------------------------------
    def add_layer(self, layer: int) -> None:
        shape = (self.spec.n_kv_heads, self.num_blocks * self.spec.block_size, self.spec.head_dim)
        # Pages are touched only when written. Slot 0 is zeroed because padded attention
        # gathers read it (masked out, but NaN garbage would still poison the sum).
        for store in (self.k, self.v):
            store[layer] = torch.empty(shape, dtype=self.spec.dtype, device=self.device)
            store[layer][:, : self.spec.block_size].zero_()

    def drop_layer(self, layer: int) -> None:
        del self.k[layer], self.v[layer]

    # ---- blocks -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def reserve(self, request_id: str, n_tokens: int) -> None:
        """Makes sure `request_id` owns enough blocks for token positions `[0, n_tokens)`."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.spec.blocks_for_tokens(n_tokens) - len(table)
        if missing > len(self._free_blocks):
            if not table:
                del self.block_tables[request_id]
            raise CacheFullError(
                f"request {request_id} needs {missing} more KV blocks; {len(self._free_blocks)} free"
            )
        for _ in range(missing):
            table.append(self._free_blocks.pop())

    def free(self, request_id: str) -> int:
        """Returns the blocks of `request_id` to the free list; returns how many."""
        table = self.block_tables.pop(request_id, [])
        self._free_blocks.extend(reversed(table))
        return len(table)

    def slots(self, request_id: str, positions: torch.Tensor) -> torch.Tensor:
        """Returns the flat slot index of each token position of `request_id`."""
        table = torch.tensor(self.block_tables[request_id], dtype=torch.long)
        bs = self.spec.block_size
        return table[positions // bs] * bs + positions % bs

    # ---- data ---------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores K and V of tokens `[T, n_kv_heads, head_dim]` at their slots."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns K and V of `slots` as contiguous `[n_kv_heads, len(slots), head_dim]` tensors.

        They live in buffers reused by the next call: use them before gathering again.
        """
        n = self.spec.n_kv_heads * slots.numel() * self.spec.head_dim
        if self._gather_k.numel() < n:
            self._gather_k = torch.empty(n, dtype=self.spec.dtype, device=self.device)
            self._gather_v = torch.empty(n, dtype=self.spec.dtype, device=self.device)
        shape = (self.spec.n_kv_heads, slots.numel(), self.spec.head_dim)
        k = torch.index_select(self.k[layer], 1, slots, out=self._gather_k[:n].view(shape))
        v = torch.index_select(self.v[layer], 1, slots, out=self._gather_v[:n].view(shape))
        return k, v

    def export(self, request_id: str, layers: range, tokens: range) -> torch.Tensor:
        """Returns K and V of `(request, layers, tokens)` as one contiguous
        `[2, len(layers), len(tokens), n_kv_heads, head_dim]` tensor."""
        slots = self.slots(request_id, torch.arange(tokens.start, tokens.stop))
        out = torch.empty(
            (2, len(layers), len(tokens), self.spec.n_kv_heads, self.spec.head_dim),
            dtype=self.spec.dtype,
        )
        for i, layer in enumerate(layers):
            out[0, i] = self.k[layer].index_select(1, slots).transpose(0, 1)
            out[1, i] = self.v[layer].index_select(1, slots).transpose(0, 1)
        return out

    def import_(self, request_id: str, layers: range, tokens: range, kv: torch.Tensor) -> None:
        """Writes a tensor made by `export` into this cache, reserving blocks as needed."""
        expected = (2, len(layers), len(tokens), self.spec.n_kv_heads, self.spec.head_dim)
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV import shape {tuple(kv.shape)} does not match {expected}")
        self.reserve(request_id, tokens.stop)
        slots = self.slots(request_id, torch.arange(tokens.start, tokens.stop))
        for i, layer in enumerate(layers):
            self.write(layer, slots, kv[0, i].to(self.spec.dtype), kv[1, i].to(self.spec.dtype))
