"""A weight projection `y = x @ W.T (+ b)`, stored in the layout the CPU runs fastest.

Loaded as an [in, out] view of W; `settle()` then lays it out once. On CPUs with oneDNN it
reorders W into oneDNN's blocked layout, so no GEMM re-packs it per call (~1.3x at batch 8:
decode at small batch is bound by reading weights). Otherwise it keeps `W.T` contiguous:
`x @ w` avoids the transposed-operand GEMM path, ~1.2x faster than `F.linear` at batch 8.
"""

from __future__ import annotations

import torch
from torch import nn

# The batch the oneDNN layout is tuned for: good from batch 4 to 16, ~10% slower at batch 1.
ONEDNN_BATCH_HINT = 4


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Projection(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        # A bias [out] (Qwen2's Q/K/V, Llama's with attention_bias), or None.
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._packed: torch.Tensor | None = None
        self.packed_bytes = 0  # bytes held in oneDNN's layout (not a parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)  # x: [T, in], the stage's flat tokens

    def dense_weight(self) -> torch.Tensor:
        """Returns W as a plain [out, in] tensor, whatever layout it is stored in."""
        if self._packed is not None:
            return self._packed.to_dense()
        return self.weight_t.detach().t()

    def settle(self, onednn: bool) -> None:
        """Lays the weight out once: oneDNN-packed (CPU, float32), else [in, out] contiguous."""
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().contiguous(), requires_grad=False)
        if not onednn or self.weight_t.dtype != torch.float32:
            self.weight_t = nn.Parameter(self.weight_t.detach().contiguous(), requires_grad=False)
            return
        weight = self.weight_t.detach().t().contiguous()  # [out, in]: what oneDNN expects; no copy
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_BATCH_HINT)
        self.packed_bytes = weight.numel() * weight.element_size()
        self.weight_t = nn.Parameter(torch.empty(0), requires_grad=False)
