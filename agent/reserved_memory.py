"""Tensors over address space reserved up front, whose tail can be handed back to the OS.

A KV pool that shrinks and grows live (a stage gains layers and makes room for them) must
neither copy itself nor keep the memory it gave up. On the CPU we map anonymous memory for
the largest size the pool may ever reach: a page costs memory only once written, and
`release_from` returns the pages past a point to the OS (`madvise(MADV_DONTNEED)`; they
read as zero if touched again). Growing is then free, and shrinking moves nothing.

Other devices (CUDA) allocate exactly what is asked and reallocate on resize: the CPU trick
has no GPU counterpart in plain PyTorch.
"""

from __future__ import annotations

import mmap

import torch

PAGE_BYTES = mmap.PAGESIZE


class SlotTensor:
    """A `[rows, max_slots, width]` tensor of which `[:, :slots]` is in use.

    `view()` is the part in use; `resize(slots)` moves the boundary. Row-major: each row's
    slots are contiguous, so the tail of every row is one address range.
    """

    def __init__(
        self, rows: int, max_slots: int, width: int, dtype: torch.dtype, device: torch.device
    ):
        self.rows, self.max_slots, self.width = rows, max_slots, width
        self.dtype, self.device = dtype, device
        self.slots = 0
        self._map: mmap.mmap | None = None
        if device.type == "cpu":
            nbytes = max(1, rows * max_slots * width * torch.finfo(dtype).bits // 8)
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            flat = torch.frombuffer(self._map, dtype=dtype, count=rows * max_slots * width)
            self.full = flat.view(rows, max_slots, width)
        else:
            self.full = torch.empty((rows, 0, width), dtype=dtype, device=device)

    def view(self) -> torch.Tensor:
        return self.full[:, : self.slots]

    def resize(self, slots: int) -> None:
        """Makes `[:, :slots]` the part in use; memory past it goes back to the OS."""
        if not 0 <= slots <= self.max_slots:
            raise ValueError(f"{slots} slots is outside [0, {self.max_slots}]")
        if self._map is None:
            self._reallocate(slots)
        elif slots < self.slots:
            self._release_from(slots)
        self.slots = slots

    def _release_from(self, slot: int) -> None:
        element = torch.finfo(self.dtype).bits // 8
        row_bytes = self.max_slots * self.width * element
        for row in range(self.rows):
            start = row * row_bytes + slot * self.width * element
            end = (row + 1) * row_bytes
            start = -(-start // PAGE_BYTES) * PAGE_BYTES  # whole pages only
            if end - start >= PAGE_BYTES:
                self._map.madvise(mmap.MADV_DONTNEED, start, (end - start) // PAGE_BYTES * PAGE_BYTES)

    def _reallocate(self, slots: int) -> None:
        fresh = torch.empty((self.rows, slots, self.width), dtype=self.dtype, device=self.device)
        keep = min(slots, self.full.shape[1])
        fresh[:, :keep] = self.full[:, :keep]
        self.full = fresh
