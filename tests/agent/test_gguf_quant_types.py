"""GGUF files as users download them: tensors in each of llama.cpp's quantization types, and
mixed within one file as llama.cpp's Q4_K_M and Q3_K_M presets mix them. A tiny Llama (hidden
256, FFN 512: rows of whole 256-element super-blocks, so the K-quants apply) is written with
every matrix in one type (norms F32, as llama.cpp keeps them); types gguf-py cannot quantize in
numpy (the K- and IQ-quants) get random valid blocks with finite float16 scales. Our stages'
logits (1 and 2 stages) must be transformers' own GGUF loading of the same file, which reads
it with gguf's reader, dequantizes each tensor and undoes the Q/K row permutation itself.
A tensor of a type the gguf package cannot dequantize is refused by name when the model is
resolved, before any worker starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agent.loaders import resolve_model
from tests.agent.gguf_writing import finish, permute_for_gguf
from tests.agent.stage_runner import InProcessPipeline

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

T = gguf.GGMLQuantizationType
HIDDEN, FFN, N_LAYERS, HEADS, KV_HEADS, VOCAB, CONTEXT = 256, 512, 2, 4, 2, 256, 128
TOLERANCE = 1e-4  # as the other GGUF parity tests
N_TOKENS = 12
SPLITS = {"1-stage": [(0, 2)], "2-stage": [(0, 1), (1, 2)]}

# Byte offsets of each block's float16 scales (d, and dmin where the type has one) in the types
# written as random blocks (gguf.quants' block layouts).
FP16_FIELDS = {
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def shapes(ffn: int = FFN) -> dict[str, tuple[int, int]]:
    """Each matrix's (rows, row length), numpy order."""
    head_dim = HIDDEN // HEADS
    per_layer = {
        "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (ffn, HIDDEN), "ffn_up": (ffn, HIDDEN), "ffn_down": (HIDDEN, ffn),
    }
    out = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN)}
    for i in range(N_LAYERS):
        out |= {f"blk.{i}.{t}.weight": shape for t, shape in per_layer.items()}
    return out


def random_blocks(rng: np.random.Generator, qtype, shape: tuple[int, int], std: float) -> np.ndarray:
    """(rows, row bytes) of random `qtype` blocks whose scales are finite float16, rescaled so the
    dequantized tensor has about standard deviation `std`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (len(blocks), len(FP16_FIELDS[qtype]))).astype(np.float32)

    def set_scales(factor: float) -> None:
        for j, at in enumerate(FP16_FIELDS[qtype]):
            blocks[:, at : at + 2] = (scales[:, j : j + 1] * factor).astype(np.float16).view(np.uint8)

    set_scales(1.0)
    spread = float(gguf.quants.dequantize(blocks, qtype).std())
    set_scales(std / spread)  # every value is linear in the scales
    return blocks.reshape(rows, -1)


def stored(rng: np.random.Generator, qtype, shape: tuple[int, int], std: float) -> np.ndarray:
    """The bytes of a random tensor of `shape` as `qtype` stores it, shaped (rows, row bytes)."""
    if qtype in FP16_FIELDS:
        return random_blocks(rng, qtype, shape, std)
    return quantized((rng.standard_normal(shape) * std).astype(np.float32), qtype)


def quantized(values: np.ndarray, qtype) -> np.ndarray:
    """`values` as gguf-py quantizes them to `qtype`, as bytes shaped (rows, row bytes)."""
    return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(len(values), -1)


def write_tiny_llama(
    path: Path, types: dict[str, object], tied: bool = False, ffn: int = FFN, seed: int = 0,
    raw: dict[str, np.ndarray] | None = None,
) -> str:
    """Writes a tiny random llama GGUF whose matrices are stored in `types[name]` (by full tensor
    name, else by the name's kind: "token_embd", "output", "attn_q", ...; "*" for the rest),
    norms in F32; Q/K rows permuted as llama.cpp's converter does (on the float weights, or for
    random blocks simply stored: the reference undoes the permutation as we do). `raw` holds
    tensors written as I8 bytes instead."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-quant")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(VOCAB)
    for name, shape in shapes(ffn).items():
        if tied and name == "output.weight":
            continue
        kind = name.split(".")[-2]
        qtype = types.get(name, types.get(kind, types["*"]))
        std = 1.0 / np.sqrt(shape[1])  # logits of a few units, tied head included
        if name in (raw or {}):
            writer.add_tensor(name, raw[name], raw_dtype=T.I8)
            continue
        if qtype not in FP16_FIELDS and kind in ("attn_q", "attn_k"):
            values = (rng.standard_normal(shape) * std).astype(np.float32)
            values = permute_for_gguf(values, HEADS if kind == "attn_q" else KV_HEADS)
            data = quantized(values, qtype)
        else:
            data = stored(rng, qtype, shape, std)
        writer.add_tensor(name, data, raw_dtype=qtype)  # shape from the byte shape
    norms = [f"blk.{i}.{n}.weight" for i in range(N_LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name in ["output_norm.weight", *norms]:
        writer.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))
    return finish(writer, path)


def single(qtype) -> dict[str, object]:
    return {"*": qtype}


# llama.cpp's presets (llama_tensor_get_type): Q4_K_M holds Q4_K, with Q6_K for output.weight
# and for attn_v and ffn_down in some layers; Q3_K_M holds Q3_K with Q4_K/Q5_K attn_v, Q6_K
# output, and falls back to IQ4_NL for rows that are not whole 256-element super-blocks (its
# ffn_down here, of 384-element rows).
Q4_K_M = {"*": T.Q4_K, "token_embd": T.Q4_K, "output": T.Q6_K,
          "blk.0.attn_v.weight": T.Q6_K, "blk.0.ffn_down.weight": T.Q6_K}
Q3_K_M = {"*": T.Q3_K, "output": T.Q6_K, "attn_v": T.Q5_K, "blk.1.attn_v.weight": T.Q4_K,
          "ffn_down": T.IQ4_NL}
FILES = {
    **{t.name: (single(t), False, FFN) for t in (
        T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ3_S, T.IQ2_XXS,
    )},
    "Q4_K_M": (Q4_K_M, False, FFN),
    "Q4_K_M-tied-Q6_K-table": (Q4_K_M | {"token_embd": T.Q6_K}, True, FFN),
    "Q3_K_M-IQ4_NL-fallback": (Q3_K_M, False, 384),
    "Q8_0-tied": (single(T.Q8_0), True, FFN),
    "BF16-tied": (single(T.BF16), True, FFN),
}


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_TOKENS,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module", params=list(FILES))
def written(request, tmp_path_factory):
    """(the file's path, transformers' logits over token_ids() from the file)."""
    types, tied, ffn = FILES[request.param]
    directory = tmp_path_factory.mktemp("gguf-types")
    path = write_tiny_llama(directory / "model.gguf", types, tied=tied, ffn=ffn)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file="model.gguf", dtype=torch.float32, local_files_only=True
    ).eval()
    assert model.config.tie_word_embeddings == tied
    with torch.no_grad():
        reference = model(token_ids().unsqueeze(0)).logits[0].float()
    return path, reference


def our_logits(path: str, splits) -> torch.Tensor:
    pipe = InProcessPipeline(resolve_model(path), splits, block_size=4)
    return pipe.step(["r"], [0], [N_TOKENS], token_ids(), all_rows=True)


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_logits_match_transformers_gguf_loading(written, splits):
    path, reference = written
    logits = our_logits(path, splits)
    assert logits.shape == reference.shape
    assert reference.abs().max().item() > 1.0  # logits of some size, not a degenerate model
    assert (logits - reference).abs().max().item() <= TOLERANCE


def test_the_files_hold_the_types_they_are_named_for(tmp_path):
    """Guards the parity above: the writer stores each tensor in the type asked for."""
    reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf", Q3_K_M, ffn=384))
    types = {t.name: T(t.tensor_type) for t in reader.tensors}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q3_K
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == (T.Q5_K, T.Q4_K)
    assert types["blk.1.ffn_down.weight"] == T.IQ4_NL and types["output_norm.weight"] == T.F32


# -- refusals --------------------------------------------------------------------------------

def write_with_type_id(path: Path, name: str, type_id: int, row_bytes: int) -> str:
    """A plain F32 tiny llama whose tensor `name` holds `row_bytes` zero bytes per row and GGML
    type id `type_id` (one the gguf package may not know or cannot dequantize): written as I8
    bytes, then its tensor info's row length and type id rewritten in place."""
    rows, cols = shapes()[name]
    write_tiny_llama(path, single(T.F32), raw={name: np.zeros((rows, row_bytes), dtype=np.uint8)})
    data = bytearray(path.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 2  # dimensions
    assert int.from_bytes(data[at + 4 : at + 12], "little") == row_bytes  # as I8: a byte each
    data[at + 4 : at + 12] = cols.to_bytes(8, "little")
    assert int.from_bytes(data[at + 20 : at + 24], "little") == int(T.I8)
    data[at + 20 : at + 24] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize(
    "type_id,row_bytes,named",
    [
        (int(T.Q8_K), HIDDEN // 256 * 292, "type Q8_K"),
        (int(T.F64), HIDDEN * 8, "type F64"),
        (250, HIDDEN, "type 250, which the gguf package does not know: upgrade the gguf package"),
    ],
    ids=["Q8_K", "F64", "unknown-type"],
)
def test_a_tensor_of_a_type_the_gguf_package_cannot_dequantize_is_refused_by_name(
    tmp_path, type_id, row_bytes, named
):
    path = write_with_type_id(tmp_path / "model.gguf", "blk.1.ffn_up.weight", type_id, row_bytes)
    with pytest.raises(ValueError) as refusal:
        resolve_model(path)
    message = str(refusal.value)
    assert "tensor blk.1.ffn_up.weight cannot be read: it is stored as " in message and named in message
    if type_id != 250:
        assert "convert the model with llama.cpp's llama-quantize to a supported type" in message


def test_a_truncated_file_is_refused_naming_the_tensor_cut_short(tmp_path):
    path = Path(write_tiny_llama(tmp_path / "model.gguf", single(T.Q4_K)))
    path.write_bytes(path.read_bytes()[:-1000])  # an incomplete download
    with pytest.raises(ValueError) as refusal:
        resolve_model(str(path))
    message = str(refusal.value)
    assert "blk.1.ffn_norm.weight cannot be read: its data runs past the end of the file" in message
    assert "download the file again" in message


def test_rows_that_are_not_whole_blocks_of_their_type_are_refused_by_name(tmp_path):
    name = "blk.1.ffn_up.weight"
    cols = shapes()[name][1]
    path = Path(write_with_type_id(tmp_path / "model.gguf", name, int(T.Q8_0), cols // 32 * 34))
    data = bytearray(path.read_bytes())  # then the row length says 16 values fewer: not 32s
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    data[at + 4 : at + 12] = (cols - 16).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as refusal:
        resolve_model(str(path))
    assert f"tensor {name} cannot be read: its rows of {cols - 16} values are not whole Q8_0 blocks of 32" in str(
        refusal.value)
