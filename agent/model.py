"""A Llama-family decoder that builds only the layers `[start, end)` of its stage.

Llama-family: RMSNorm, rotary attention and a SwiGLU MLP, as Llama, Mistral and Qwen2 are;
the attention projections may have biases (Qwen2's Q/K/V, Llama's four with attention_bias),
and some layers may attend a sliding window (Mistral's, Qwen2's; ModelArch.sliding_window).

The layer list is full-length with empty placeholders elsewhere, so parameter names stay
global (`layers.17.attn.q_proj.weight` is layer 17 on every stage) and a stage can gain or
lose a layer by filling or emptying a placeholder. The first stage embeds; the last one
normalises and projects to the vocabulary (sampling lives in `agent/sampler.py`).

Loaders name tensors as checkpoints do (`layers.{i}.attn.q_proj.weight`, [out, in], and
`layers.{i}.attn.q_proj.bias`, [out]); `pack_layer_weights` fuses and transposes them into the
layout the forward pass runs on.

Shapes: T = tokens in the micro-batch (flat, all requests), H = hidden size,
Nh / Nkv = query / KV heads, D = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from agent.attention_metadata import AttentionMetadata
from agent.kv_cache import PagedKVCache
from agent.projection import Projection, onednn_available
from agent.quantized_embedding import Q8Embedding
from cost_models.model_catalog import ModelArch


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op instead of five
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Returns RoPE inverse frequencies [D/2], with Llama-3.1 scaling when the model has it:
    from its parameters (a HF config's llama3 rope_scaling), or as a GGUF stores it, one
    factor per frequency that the frequency is divided by (`rope_freqs.weight`, as llama.cpp)."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if arch.rope_freq_factors is not None:  # their count is checked where the GGUF is read
        inv_freq = inv_freq / torch.tensor(arch.rope_freq_factors, dtype=torch.float32)
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
        # A sliding layer attends through the metadata's window slots and masks.
        self.window = arch.sliding_window if layer in arch.sliding_layers else None
        # Q, K, V fused (and their biases, if any)
        self.qkv = Projection(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.qkv_bias)
        self.o = Projection(arch.q_size, arch.hidden_size, bias=arch.o_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        meta: AttentionMetadata, kv: PagedKVCache,
    ) -> torch.Tensor:
        t = x.shape[0]
        heads = self.qkv(x).view(t, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        n_qk = self.n_heads + self.n_kv_heads
        qk = heads[:, :n_qk]
        qk = qk * cos + rotate_half(qk) * sin  # Q and K rotated together; cos/sin: [T, 1, D]
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = heads[:, n_qk:]
        kv.write(self.layer, meta.write_slots, k, v)

        sliding = self.window is not None
        if sliding and meta.window != self.window:  # full attention here would be silently wrong
            raise RuntimeError(
                f"layer {self.layer} attends a sliding window of {self.window} positions but its "
                f"attention metadata was built for window {meta.window}"
            )
        out = torch.empty((t, self.n_heads, self.head_dim), dtype=q.dtype, device=q.device)
        for span in meta.prefills:
            q_r = q[span.rows].transpose(0, 1).unsqueeze(0)  # [1, Nh, n, D]
            slots, mask = span.attended(sliding)
            if slots is None:  # no past: attend to the fresh keys, causally (or as the window masks)
                k_r = k[span.rows].transpose(0, 1).unsqueeze(0)
                v_r = v[span.rows].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    q_r, k_r, v_r, attn_mask=mask, is_causal=mask is None, enable_gqa=True
                )
            else:
                k_r, v_r = kv.gather(self.layer, slots)  # [Nkv, C, D]
                o = F.scaled_dot_product_attention(
                    q_r, k_r.unsqueeze(0), v_r.unsqueeze(0), attn_mask=mask, enable_gqa=True
                )
            out[span.rows] = o[0].transpose(0, 1)
        if meta.decode_slots is not None:
            slots, bias = meta.decode_inputs(sliding)
            out[meta.decode_rows] = self._decode_attention(q[meta.decode_rows], slots, bias, kv)
        return self.o(out.reshape(t, self.n_heads * self.head_dim))


    def _decode_attention(
        self, q: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor, kv: PagedKVCache
    ) -> torch.Tensor:
        """Returns attention [B, Nh, D] of one new token per request over the cached keys of
        `slots` [B, C] (bias [1, B, 1, C]: -inf where padded).

        Query heads are grouped under their KV head ([Nkv, B, G, D]) and K/V are gathered
        head-major ([Nkv, B, C, D], contiguous), so two batched matmuls do the work without
        expanding KV heads: the cost stays linear in the KV bytes read.
        """
        b, c = slots.shape
        k, v = kv.gather(self.layer, slots.flatten())
        k = k.view(self.n_kv_heads, b, c, self.head_dim)
        v = v.view(self.n_kv_heads, b, c, self.head_dim)
        group = self.n_heads // self.n_kv_heads
        q = q.view(b, self.n_kv_heads, group, self.head_dim).transpose(0, 1)  # [Nkv, B, G, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # [Nkv, B, G, C]
        probs = torch.softmax(scores + bias.to(scores.dtype), dim=-1)
        return torch.matmul(probs, v).transpose(0, 1).reshape(b, self.n_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.gate_up = Projection(arch.hidden_size, 2 * arch.ffn_size)
        self.down = Projection(arch.ffn_size, arch.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def pack_layer_weights(weights: dict[str, torch.Tensor], layers: range) -> dict[str, torch.Tensor]:
    """Returns the module's tensors from loader tensors: per layer, Q/K/V (weights and biases)
    and gate/up fused, and every projection as an [in, out] view of its [out, in] weight
    (`Projection.settle` then lays it out once). Consumes `weights` as it goes to bound memory.
    Biases are taken where the loader gave them; `load_state_dict(strict=True)` then checks
    that they are exactly those the architecture has."""
    packed = dict(weights)
    for i in layers:
        p = f"layers.{i}."
        qkv = [packed.pop(f"{p}attn.{n}_proj.weight") for n in "qkv"]
        packed[f"{p}attn.qkv.weight_t"] = torch.cat(qkv).t()
        if f"{p}attn.q_proj.bias" in packed:
            packed[f"{p}attn.qkv.bias"] = torch.cat([packed.pop(f"{p}attn.{n}_proj.bias") for n in "qkv"])
        packed[f"{p}attn.o.weight_t"] = packed.pop(f"{p}attn.o_proj.weight").t()
        if f"{p}attn.o_proj.bias" in packed:
            packed[f"{p}attn.o.bias"] = packed.pop(f"{p}attn.o_proj.bias")
        gate_up = [packed.pop(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up")]
        packed[f"{p}mlp.gate_up.weight_t"] = torch.cat(gate_up).t()
        packed[f"{p}mlp.down.weight_t"] = packed.pop(f"{p}mlp.down_proj.weight").t()
        del qkv, gate_up
    weights.clear()
    return packed


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.attn = Attention(arch, layer)
        self.mlp_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, h, cos, sin, meta, kv):
        h = h + self.attn(self.attn_norm(h), cos, sin, meta, kv)
        return h + self.mlp(self.mlp_norm(h))


class LlamaStage(nn.Module):
    """Layers `[start, end)` of a Llama-family model (Qwen2 included); embeds if first, owns
    the head if last."""

    def __init__(self, arch: ModelArch, start: int, end: int, quantized_embedding: bool = False):
        super().__init__()
        if not 0 <= start <= end <= arch.n_layers:
            raise ValueError(f"stage [{start}, {end}) is not inside the model's {arch.n_layers} layers")
        self.arch, self.start, self.end = arch, start, end
        # An empty stage (start == end) is a spare device's: no layers yet, no embedding, no head.
        self.is_first, self.is_last = start == 0 < end, start < end == arch.n_layers
        self.embed: nn.Module | None = None
        if self.is_first:
            embedding = Q8Embedding if quantized_embedding else nn.Embedding
            self.embed = embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i) if start <= i < end else nn.Identity() for i in range(arch.n_layers)
        )
        self.norm: nn.Module | None = None
        self.head: nn.Module | None = None
        if self.is_last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
            self.head = Projection(arch.hidden_size, arch.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    @classmethod
    def from_weights(
        cls, arch: ModelArch, start: int, end: int, weights: dict[str, torch.Tensor],
        device: torch.device | str = "cpu", prepack: bool = True,
    ) -> LlamaStage:
        """Builds the stage without allocating placeholder weights, then adopts `weights`.

        The head's weight is `lm_head.weight`, or with tied embeddings the embedding table;
        a stage that both looks rows up in a dense table and projects with it shares one copy.
        """
        quantized = "embed.q8_0" in weights
        with torch.device("meta"):
            stage = cls(arch, start, end, quantized_embedding=quantized)
        tensors = pack_layer_weights(weights, range(start, end))
        share_table = stage.is_first and stage.is_last and arch.tie_embeddings and not quantized
        if stage.is_last:
            table = tensors["embed.weight"] if share_table else tensors.pop(
                "embed.weight" if arch.tie_embeddings else "lm_head.weight")
            tensors["head.weight_t"] = table.t()  # a view: [in, out] without a copy
        stage.load_state_dict(tensors, strict=True, assign=True)
        stage.inv_freq = rope_inv_freq(arch)
        stage = stage.to(device).eval()
        stage.settle_weights(prepack, keep_head_shared=share_table)
        return stage

    def settle_weights(self, prepack: bool = True, keep_head_shared: bool = False) -> None:
        """Lays every projection out for the forward pass (oneDNN-packed on CPU when `prepack`).

        A head that shares the embedding table (`keep_head_shared`) stays a view of it.
        """
        device = next(self.buffers()).device
        use_onednn = prepack and device.type == "cpu" and onednn_available()
        for module in self.modules():
            if isinstance(module, Projection) and not (keep_head_shared and module is getattr(self, "head", None)):
                module.settle(use_onednn)

    def part_bytes(self) -> dict[str, int | None]:
        """Returns bytes held for one decoder layer, the embedding and the norm/head (None
        for a part this stage does not hold): what moving each part costs."""

        def held(module: nn.Module | None) -> int | None:
            if module is None or isinstance(module, nn.Identity):
                return None
            tensors = {t.untyped_storage().data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
            dense = sum(t.numel() * t.element_size() for t in tensors.values())
            return dense + sum(m.packed_bytes for m in module.modules() if isinstance(m, Projection))

        layers = self.held_layers
        head = held(self.head) if self.has_head else None
        return {
            "layer": held(self.layers[layers[0]]) if layers else None,
            "embed": held(self.embed),
            "head": None if head is None else head + held(self.norm),
        }

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this stage holds (prepacked projections included)."""
        dense = sum(p.numel() * p.element_size() for p in {p.untyped_storage().data_ptr(): p for p in self.parameters()}.values())
        packed = sum(m.packed_bytes for m in self.modules() if isinstance(m, Projection))
        quantized = self.embed.q8_0.numel() if isinstance(self.embed, Q8Embedding) else 0
        return dense + packed + quantized

    @property
    def layer_range(self) -> range:
        return range(self.start, self.end)

    # ---- gaining and losing parts in place ----------------------------------------------
    @property
    def held_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.layers) if isinstance(m, DecoderLayer)]

    @property
    def has_embedding(self) -> bool:
        return self.embed is not None

    @property
    def has_head(self) -> bool:
        return getattr(self, "head", None) is not None

    def install(
        self, tensors: dict[str, torch.Tensor], layers: range, embed: bool = False,
        head: bool = False, prepack: bool = True,
    ) -> None:
        """Adopts `layers` (and the embedding, the norm/head when asked) from loader-named
        tensors (see agent/loaders), laid out as `from_weights` would; consumes `tensors`."""
        device = self.inv_freq.device
        onednn = prepack and device.type == "cpu" and onednn_available()
        packed = pack_layer_weights(tensors, layers)
        for i in layers:
            prefix = f"layers.{i}."
            with torch.device("meta"):
                layer = DecoderLayer(self.arch, i)
            state = {k[len(prefix):]: packed.pop(k) for k in [k for k in packed if k.startswith(prefix)]}
            layer.load_state_dict(state, strict=True, assign=True)
            layer = layer.to(device).eval()
            for module in layer.modules():
                if isinstance(module, Projection):
                    module.settle(onednn)
            self.layers[i] = layer
        if embed:
            if "embed.q8_0" in packed:
                with torch.device("meta"):
                    table = Q8Embedding(self.arch.vocab_size, self.arch.hidden_size)
                table.load_state_dict({"q8_0": packed.pop("embed.q8_0")}, assign=True)
            else:
                with torch.device("meta"):
                    table = nn.Embedding(self.arch.vocab_size, self.arch.hidden_size)
                weight = packed["embed.weight"] if head and self.arch.tie_embeddings else packed.pop("embed.weight")
                table.load_state_dict({"weight": weight}, assign=True)
            self.embed = table.to(device).eval()
        if head:
            norm = RMSNorm(self.arch.hidden_size, self.arch.rms_norm_eps)
            norm.load_state_dict({"weight": packed.pop("norm.weight")}, assign=True)
            with torch.device("meta"):
                projection = Projection(self.arch.hidden_size, self.arch.vocab_size)
            table = packed.pop("embed.weight" if self.arch.tie_embeddings else "lm_head.weight")
            projection.load_state_dict({"weight_t": table.t()}, assign=True)
            projection.settle(onednn)
            self.norm, self.head = norm.to(device).eval(), projection.to(device)
        packed.clear()

    def remove(self, layers: range | list[int], embed: bool = False, head: bool = False) -> None:
        """Empties the placeholders of `layers` (and drops the embedding, the norm/head)."""
        for i in layers:
            self.layers[i] = nn.Identity()
        if embed:
            self.embed = None
        if head:
            self.norm = self.head = None

    def export(self, layers: range, embed: bool = False, head: bool = False) -> dict[str, torch.Tensor]:
        """Returns loader-named tensors of `layers` (and the embedding, the norm/head), as
        `install` takes them: what a peer sends to a device that gains these parts."""
        out: dict[str, torch.Tensor] = {}
        for i in layers:
            layer = self.layers[i]
            if not isinstance(layer, DecoderLayer):
                raise KeyError(f"this stage does not hold layer {i}")
            p = f"layers.{i}."
            out[f"{p}attn_norm.weight"] = layer.attn_norm.weight.detach()
            out[f"{p}mlp_norm.weight"] = layer.mlp_norm.weight.detach()
            qkv = layer.attn.qkv.dense_weight()
            q, k, v = qkv.split([self.arch.q_size, self.arch.kv_size, self.arch.kv_size])
            out[f"{p}attn.q_proj.weight"], out[f"{p}attn.k_proj.weight"] = q, k
            out[f"{p}attn.v_proj.weight"] = v
            out[f"{p}attn.o_proj.weight"] = layer.attn.o.dense_weight()
            if layer.attn.qkv.bias is not None:
                bias = layer.attn.qkv.bias.detach()
                q, k, v = bias.split([self.arch.q_size, self.arch.kv_size, self.arch.kv_size])
                out[f"{p}attn.q_proj.bias"], out[f"{p}attn.k_proj.bias"], out[f"{p}attn.v_proj.bias"] = q, k, v
            if layer.attn.o.bias is not None:
                out[f"{p}attn.o_proj.bias"] = layer.attn.o.bias.detach()
            gate, up = layer.mlp.gate_up.dense_weight().chunk(2)
            out[f"{p}mlp.gate_proj.weight"], out[f"{p}mlp.up_proj.weight"] = gate, up
            out[f"{p}mlp.down_proj.weight"] = layer.mlp.down.dense_weight()
        if embed:
            if isinstance(self.embed, Q8Embedding):
                out["embed.q8_0"] = self.embed.q8_0
            else:
                out["embed.weight"] = self.embed.weight.detach()
        if head:
            out["norm.weight"] = self.norm.weight.detach()
            out["embed.weight" if self.arch.tie_embeddings else "lm_head.weight"] = self.head.dense_weight()
        return out

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, D]
        return emb.cos(), emb.sin()

    @torch.inference_mode()
    def forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv: PagedKVCache,
        layers: range | None = None,
    ) -> torch.Tensor:
        """Returns the hidden states [T, H] after `layers` (default: the stage's range).

        `inputs` is token ids [T] when `layers` starts at 0, hidden states [T, H] elsewhere.
        """
        layers = self.layer_range if layers is None else layers
        h = self.embed(inputs) if layers.start == 0 else inputs
        cos, sin = self.rope(meta.positions)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for i in layers:
            h = self.layers[i](h, cos, sin, meta, kv)
        return h

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns vocabulary logits [N, V] (float32) for the given rows of final hidden states."""
        return self.head(self.norm(hidden)).float()
