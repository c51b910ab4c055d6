"""A paged KV cache for the layers one worker holds.

Fixed-size blocks of `block_size` token slots; each request owns a block table (the same
block ids for every layer of the worker). K and V live per layer as head-major slot arrays
`[n_kv_heads, num_blocks * block_size, head_dim]` (gathering a batch's slots then yields
`[n_kv_heads, tokens, head_dim]`, contiguous, ready for attention), so a worker can gain or
drop a layer's storage without touching the others, and a request's cache for any
`(layer range, token range)` can be exported and imported as one contiguous tensor.

The pool resizes live (`resize`): a worker that gains layers shrinks it to make room, one
that loses layers grows it. Shrinking moves only the in-use blocks that lie past the new end
into free blocks below it; the memory past the end goes back to the OS (see
`agent/reserved_memory.py`). Every in-flight block survives.

A request forked from another (`fork`: the members of an `n` > 1 request) shares its full
blocks, counted by reference, and gets a copy of the last partial one: positions are never
written twice, so a shared block is never written after the fork and needs no copy-on-write.

Block bookkeeping is guarded by a lock: the stage loops and the migration threads of a
worker (KV import, export) reserve and free concurrently.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from agent.reserved_memory import SlotTensor


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
    def __init__(
        self,
        spec: KVCacheSpec,
        layers: range,
        num_blocks: int,
        device: torch.device | str = "cpu",
        max_blocks: int | None = None,
    ):
        """`max_blocks` is the most the pool may ever grow to (default `num_blocks`)."""
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise the memory budget")
        self.spec = spec
        self.num_blocks = num_blocks
        self.max_blocks = max(num_blocks, max_blocks or num_blocks)
        self.device = torch.device(device)
        self._storage: dict[int, tuple[SlotTensor, SlotTensor]] = {}
        self.k: dict[int, torch.Tensor] = {}  # views of the slots in use, per layer
        self.v: dict[int, torch.Tensor] = {}
        self._lock = threading.RLock()
        for layer in layers:
            self.add_layer(layer)
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.block_tables: dict[str, list[int]] = {}
        self._holders: dict[int, int] = {}  # block -> how many tables hold it, where above 1
        # Reused gather buffers: a fresh multi-MB tensor per layer per step would cost page
        # faults on every touch (glibc hands large blocks back to the OS on free).
        self._gather_k = torch.empty(0, dtype=spec.dtype, device=self.device)
        self._gather_v = torch.empty(0, dtype=spec.dtype, device=self.device)

    # ---- layers -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.k)

    def add_layer(self, layer: int) -> None:
        """Gives `layer` storage for every block of the pool."""
        bs = self.spec.block_size
        pair = tuple(
            SlotTensor(self.spec.n_kv_heads, self.max_blocks * bs, self.spec.head_dim,
                       self.spec.dtype, self.device)
            for _ in range(2)
        )
        for store in pair:
            store.resize(self.num_blocks * bs)
            # Slot 0 is read (masked) by padded decode gathers: NaN garbage would poison the sum.
            store.view()[:, :bs].zero_()
        with self._lock:
            self._storage[layer] = pair
            self.k[layer], self.v[layer] = pair[0].view(), pair[1].view()

    def drop_layer(self, layer: int) -> None:
        with self._lock:
            del self.k[layer], self.v[layer], self._storage[layer]

    # ---- blocks -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    @property
    def pool_bytes(self) -> int:
        """Bytes the pool may fill: every block of every layer."""
        return self.num_blocks * self.spec.block_bytes(len(self.k))

    def reserve(self, request_id: str, n_tokens: int) -> None:
        """Makes sure `request_id` owns enough blocks for token positions `[0, n_tokens)`."""
        with self._lock:
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
        """Returns the blocks of `request_id` that no other request shares to the free list;
        returns how many."""
        with self._lock:
            table = self.block_tables.pop(request_id, [])
            freed = []
            for block in reversed(table):
                holders = self._holders.get(block, 1)
                if holders > 2:
                    self._holders[block] = holders - 1
                elif holders == 2:
                    del self._holders[block]
                else:
                    freed.append(block)
            self._free_blocks.extend(freed)
            return len(freed)

    def fork(self, parent_id: str, child_id: str, n_tokens: int) -> None:
        """Gives `child_id` the KV of `parent_id`'s positions `[0, n_tokens)`: the full blocks
        shared, the last partial block copied. Raises CacheFullError without a free block."""
        bs = self.spec.block_size
        with self._lock:
            if child_id in self.block_tables:
                raise ValueError(f"request {child_id} already holds KV blocks; it cannot be forked")
            parent = self.block_tables[parent_id]
            full = n_tokens // bs
            table = list(parent[:full])
            if n_tokens % bs:
                if not self._free_blocks:
                    raise CacheFullError(f"forking {parent_id} into {child_id} needs 1 KV block; none is free")
                copy = self._free_blocks.pop()
                src = torch.arange(parent[full] * bs, (parent[full] + 1) * bs, device=self.device)
                dst = torch.arange(copy * bs, (copy + 1) * bs, device=self.device)
                for k, v in self._storage.values():
                    for store in (k.full, v.full):
                        store.index_copy_(1, dst, store.index_select(1, src))
                table.append(copy)
            for block in table[:full]:
                self._holders[block] = self._holders.get(block, 1) + 1
            self.block_tables[child_id] = table

    def shared_blocks(self) -> int:
        """Returns how many blocks more than one request holds."""
        with self._lock:
            return len(self._holders)

    def slots(self, request_id: str, positions: torch.Tensor) -> torch.Tensor:
        """Returns the flat slot index of each token position of `request_id`."""
        with self._lock:
            table = torch.tensor(self.block_tables[request_id], dtype=torch.long)
        bs = self.spec.block_size
        return table[positions // bs] * bs + positions % bs

    def resize(self, num_blocks: int) -> int:
        """Makes the pool `num_blocks` blocks, keeping every block in use; returns how many
        in-use blocks moved. The caller makes sure no step reads the cache meanwhile."""
        with self._lock:
            if num_blocks < max(1, self.num_used_blocks):
                raise CacheFullError(
                    f"cannot shrink the KV pool to {num_blocks} blocks: {self.num_used_blocks} are in use"
                )
            if num_blocks > self.max_blocks:
                raise ValueError(f"the pool can grow to {self.max_blocks} blocks, not {num_blocks}")
            moved = self._compact_below(num_blocks) if num_blocks < self.num_blocks else 0
            bs = self.spec.block_size
            for layer, (k, v) in self._storage.items():
                k.resize(num_blocks * bs)
                v.resize(num_blocks * bs)
                self.k[layer], self.v[layer] = k.view(), v.view()
            if num_blocks > self.num_blocks:
                self._free_blocks[:0] = range(num_blocks - 1, self.num_blocks - 1, -1)
            else:
                self._free_blocks = [b for b in self._free_blocks if b < num_blocks]
            self.num_blocks = num_blocks
            return moved

    def _compact_below(self, limit: int) -> int:
        """Moves in-use blocks at or past `limit` into free blocks below it; returns how many."""
        spare = sorted(b for b in self._free_blocks if b < limit)
        moves: dict[int, int] = {}
        for table in self.block_tables.values():
            for i, block in enumerate(table):
                if block >= limit:
                    if block not in moves:  # a shared block moves once, for every holder
                        moves[block] = spare.pop(0)
                    table[i] = moves[block]
        for block in [b for b in self._holders if b in moves]:
            self._holders[moves[block]] = self._holders.pop(block)
        if moves:
            bs = self.spec.block_size
            src = torch.tensor(list(moves), dtype=torch.long)
            dst = torch.tensor(list(moves.values()), dtype=torch.long)
            offsets = torch.arange(bs)
            src_slots = (src.unsqueeze(1) * bs + offsets).flatten().to(self.device)
            dst_slots = (dst.unsqueeze(1) * bs + offsets).flatten().to(self.device)
            for k, v in self._storage.values():
                for store in (k.full, v.full):
                    store.index_copy_(1, dst_slots, store.index_select(1, src_slots))
            taken = set(moves.values())
            self._free_blocks = [b for b in self._free_blocks if b not in taken]
            self._free_blocks.extend(moves)
        return len(moves)

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
        k_store, v_store = self._contiguous(layer)
        k = torch.index_select(k_store, 1, slots, out=self._gather_k[:n].view(shape))
        v = torch.index_select(v_store, 1, slots, out=self._gather_v[:n].view(shape))
        return k, v

    def _contiguous(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the layer's whole K and V storage, `[n_kv_heads, max slots, head_dim]`.

        Reads select from it, not from the `[:, :slots]` view in use: that view is strided
        (each head's row spans the reserved maximum), and index_select copies a strided
        source whole before selecting - the used pool, every layer, every step.
        """
        k, v = self._storage[layer]
        return k.full, v.full

    def export(self, request_id: str, layers: range, tokens: range) -> torch.Tensor:
        """Returns K and V of `(request, layers, tokens)` as one contiguous
        `[2, len(layers), len(tokens), n_kv_heads, head_dim]` tensor."""
        slots = self.slots(request_id, torch.arange(tokens.start, tokens.stop))
        out = torch.empty(
            (2, len(layers), len(tokens), self.spec.n_kv_heads, self.spec.head_dim),
            dtype=self.spec.dtype,
        )
        for i, layer in enumerate(layers):
            k_store, v_store = self._contiguous(layer)
            out[0, i] = k_store.index_select(1, slots).transpose(0, 1)
            out[1, i] = v_store.index_select(1, slots).transpose(0, 1)
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
