"""Per-micro-batch bookkeeping that every layer of a stage reuses: positions, KV slots, masks.

A micro-batch is a flat run of tokens: request r contributes `num_new[r]` tokens at positions
`[start_pos[r], start_pos[r] + num_new[r])`. Requests adding one token (decode) are attended
together over a padded gather; requests adding several (prefill) one by one.

A model with sliding-window attention (ModelArch.sliding_window) gets a second set of
slots and masks, for its sliding layers: a query at position i attends the keys at positions
j with i - window < j <= i. They are built only when a window is given and only where it
binds (some query reaches back past it); elsewhere sliding layers use the full-attention ones,
which are then equal. KV is kept for the whole context either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from agent.kv_cache import PagedKVCache


@dataclass
class PrefillSpan:
    rows: slice  # the request's rows in the flat token run
    context_slots: torch.Tensor | None  # slots of positions [0, end) when there is a past; else None
    mask: torch.Tensor | None  # [n_new, end] bool, True where attending is allowed
    # For sliding layers, when the window binds in this span (else None: use the two above).
    # window_slots: slots of the positions the window reaches, [lo, end); None with no past
    # (the fresh keys are attended). window_mask: [n_new, end - lo] bool.
    window_slots: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None

    def attended(self, sliding: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The (context slots, mask) a layer attends through: None slots mean the fresh keys,
        a None mask with them causal attention."""
        if sliding and self.window_mask is not None:
            return self.window_slots, self.window_mask
        return self.context_slots, self.mask


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T]
    last_rows: torch.Tensor  # [R] row of each request's last token
    decode_rows: torch.Tensor  # [D] rows of the one-token requests
    decode_slots: torch.Tensor | None  # [D, max_context] gather indices (0 where padded)
    decode_bias: torch.Tensor | None  # [1, D, 1, max_context] float32: 0, or -inf where padded
    prefills: list[PrefillSpan] = field(default_factory=list)
    # The sliding window these masks were built for (None: none, sliding layers refuse them).
    window: int | None = None
    # For sliding layers, when the window binds for some decode request (else None: use the
    # two above): the last `window` slots of each request, [D, min(window, longest)], and
    # their bias.
    window_decode_slots: torch.Tensor | None = None
    window_decode_bias: torch.Tensor | None = None

    def to(self, device: torch.device) -> AttentionMetadata:
        """Returns this metadata with every tensor on `device` (a GPU stage's): it is built
        on the CPU, from the cache's block tables."""
        def move(record):
            return dataclasses.replace(record, **{
                f.name: value.to(device, non_blocking=True)
                for f in dataclasses.fields(record)
                if isinstance(value := getattr(record, f.name), torch.Tensor)
            })

        return dataclasses.replace(move(self), prefills=[move(span) for span in self.prefills])

    def decode_inputs(self, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (slots, bias) a layer's decode attention reads."""
        if sliding and self.window_decode_slots is not None:
            return self.window_decode_slots, self.window_decode_bias
        return self.decode_slots, self.decode_bias


def build_attention_metadata(
    kv: PagedKVCache, request_ids: list[str], start_pos: list[int], num_new: list[int],
    window: int | None = None,
) -> AttentionMetadata:
    """Returns the metadata of one micro-batch; the cache must already hold blocks for it.

    `window`: the sliding window of the layers this metadata serves (ModelArch.window_of),
    or None when none of them slides.
    """
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
        if n > 1 and window is not None and end > window:
            add_window(prefills[-1], context_slots, start, end, window)
        row += n

    decode_slots = decode_bias = None
    if decode_rows:
        decode_slots, decode_bias = padded_slots(decode_slot_rows)
    window_decode_slots = window_decode_bias = None
    if window is not None and any(len(s) > window for s in decode_slot_rows):
        window_decode_slots, window_decode_bias = padded_slots([s[-window:] for s in decode_slot_rows])
    meta = AttentionMetadata(
        positions=torch.cat(positions),
        write_slots=torch.cat(write_slots),
        last_rows=torch.tensor(last_rows, dtype=torch.long),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long),
        decode_slots=decode_slots,
        decode_bias=decode_bias,
        prefills=prefills,
        window=window,
        window_decode_slots=window_decode_slots,
        window_decode_bias=window_decode_bias,
    )
    return meta if kv.device.type == "cpu" else meta.to(kv.device)


def add_window(span: PrefillSpan, context_slots: torch.Tensor, start: int, end: int, window: int) -> None:
    """Gives a prefill span of positions [start, end) its sliding-window slots and mask: the
    keys from the first one its first query reaches (start - window + 1) on, so that sliding
    layers gather no more than they attend."""
    lo = max(0, start - window + 1)
    q_pos = torch.arange(start, end).unsqueeze(1)
    k_pos = torch.arange(lo, end).unsqueeze(0)
    span.window_mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
    span.window_slots = None if start == 0 else context_slots[lo:end]


def padded_slots(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns gather indices [D, longest] (0 where padded) of each decode request's slots and
    the bias [1, D, 1, longest] float32 that keeps the padding out (-inf there, else 0)."""
    width = max(len(s) for s in rows)
    slots = torch.zeros((len(rows), width), dtype=torch.long)
    bias = torch.full((1, len(rows), 1, width), float("-inf"))
    for i, row_slots in enumerate(rows):
        slots[i, : len(row_slots)] = row_slots
        bias[0, i, 0, : len(row_slots)] = 0.0
    return slots, bias
