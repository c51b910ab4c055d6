"""SmolLM2's tokenizer saved beside a tiny random Llama, the way transformers saves models."""

from __future__ import annotations

from agent.tokenizer import Tokenizer


def save_tokenizer(directory, gguf_path, template: str | None) -> None:
    """SmolLM2's tokenizer (and `template` as its chat template), saved by transformers' own
    save_pretrained."""
    import transformers

    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_gguf(gguf_path).backend, bos_token="<|im_start|>",
        eos_token="<|im_end|>", chat_template=template,
    ).save_pretrained(str(directory))
