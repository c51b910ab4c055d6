"""A tiny random Llama's config, and SmolLM2's tokenizer saved beside it, the way transformers
saves models."""

from __future__ import annotations

from typing import Any

from agent.tokenizer import Tokenizer

# 2 layers of hidden 64 with grouped KV heads, SmolLM2's vocabulary, its own head; weights
# drawn wide (initializer_range 0.2) for peaked logits, so greedy choices have no near-ties
TINY_LLAMA = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
    tie_word_embeddings=False, initializer_range=0.2,
)


# 3 layers, a small vocabulary: the random decoders (Llama, Mistral, Qwen2) whose logits tests
# split over 1, 2 and 3 stages (THREE_LAYER_SPLITS)
THREE_LAYERS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
)
THREE_LAYER_SPLITS = {
    "1-stage": [(0, 3)],
    "2-stage": [(0, 1), (1, 3)],
    "3-stage": [(0, 1), (1, 2), (2, 3)],
}


def tiny_llama_config(**overrides: Any) -> Any:
    """Returns transformers' LlamaConfig of TINY_LLAMA with `overrides`."""
    import transformers

    return transformers.LlamaConfig(**(TINY_LLAMA | overrides))


def randomize_biases(model, std: float = 0.5) -> None:
    """Draws every bias of a transformers model from N(0, std): transformers starts them at zero,
    where a lost bias would not show."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, std)


def save_tokenizer(directory, gguf_path, template: str | None) -> None:
    """SmolLM2's tokenizer (and `template` as its chat template), saved by transformers' own
    save_pretrained."""
    import transformers

    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_gguf(gguf_path).backend, bos_token="<|im_start|>",
        eos_token="<|im_end|>", chat_template=template,
    ).save_pretrained(str(directory))
