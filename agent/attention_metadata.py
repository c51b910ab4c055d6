"""Per-micro-batch bookkeeping that every layer of a stage reuses: positions, KV slots, masks.

A micro-batch is a flat run of tokens: request r contributes `num_new[r]` tokens at positions
`[start_pos[r], start_pos[r] + num_new[r])`. Requests adding one token (decode) are attended
together over a padded gather; requests adding several (prefill) one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agent.kv_cache import PagedKVCache


@dataclass
class PrefillSpan:
    rows: slice  # the request's rows in the flat token run
    context_slots: torch.Tensor | None  # slots of positions [0, end) when there is a past; else None
    mask: torch.Tensor | None  # [n_new, end] bool, True where attending is allowed


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T]
    last_rows: torch.Tensor  # [R] row of each request's last token
    decode_rows: torch.Tensor  # [D] rows of the one-token requests
    decode_slots: torch.Tensor | None  # [D, max_context] gather indices (0 where padded)
    decode_bias: torch.Tensor | None  # [1, D, 1, max_context] float32: 0, or -inf where padded
    prefills: list[PrefillSpan] = field(default_factory=list)


def build_attention_metadata(
    kv: PagedKVCache, request_ids: list[str], start_pos: list[int], num_new: list[int]
) -> AttentionMetadata:
    """Returns the metadata of one micro-batch; the cache must already hold blocks for it."""
    positions, write_slots, last_rows = [], [], []
    decode_rows: list[int] = []
    decode_slot_rows: list[torch.Tensor] = []
    prefills: list[PrefillSpan] = []
    row = 0
    for rid, start, n in zip(request_ids, start_pos, num_new, strict=True):
        end = start + n
        kv.reserve(rid, end)
        context_slots = kv.slots(rid, torch.arange(0, end))
        positions.append(torch.arange(start, end))
        write_slots.append(context_slots[start:end])
        last_rows.append(row + n - 1)
        if n == 1:
            decode_rows.append(row)
            decode_slot_rows.append(context_slots)
        elif start == 0:
            prefills.append(PrefillSpan(slice(row, row + n), None, None))
        else:
            q_pos = torch.arange(start, end).unsqueeze(1)
            mask = torch.arange(0, end).unsqueeze(0) <= q_pos
            prefills.append(PrefillSpan(slice(row, row + n), context_slots, mask))
        row += n

    decode_slots = decode_bias = None
    if decode_rows:
        width = max(len(s) for s in decode_slot_rows)
        decode_slots = torch.zeros((len(decode_rows), width), dtype=torch.long)
        decode_bias = torch.full((1, len(decode_rows), 1, width), float("-inf"))
        for i, slots in enumerate(decode_slot_rows):
            decode_slots[i, : len(slots)] = slots
            decode_bias[0, i, 0, : len(slots)] = 0.0
    return AttentionMetadata(
        positions=torch.cat(positions),
        write_slots=torch.cat(write_slots),
        last_rows=torch.tensor(last_rows, dtype=torch.long),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long),
        decode_slots=decode_slots,
        decode_bias=decode_bias,
        prefills=prefills,
    )
