"""An embedding table kept in GGUF's Q8_0 blocks, dequantised row by row on lookup.

A first stage only looks rows up, so it need not hold the float32 table (113 MiB for
SmolLM2; 28 MiB as Q8_0). Rows come out bit-identical to dequantising the whole table.
Q8_0 block: a float16 scale then 32 int8 values (34 bytes per 32 weights).
"""

from __future__ import annotations

import torch
from torch import nn

Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 2 + Q8_0_BLOCK


class Q8Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        if hidden_size % Q8_0_BLOCK:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of the Q8_0 block ({Q8_0_BLOCK})")
        self.hidden_size = hidden_size
        row_bytes = hidden_size // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
        self.register_buffer("q8_0", torch.empty((vocab_size, row_bytes), dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.q8_0.index_select(0, ids.flatten()).view(-1, Q8_0_BLOCK_BYTES)
        scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n_blocks, 1]
        values = blocks[:, 2:].contiguous().view(torch.int8).float()  # [n_blocks, 32]
        return (scale * values).view(*ids.shape, self.hidden_size)
