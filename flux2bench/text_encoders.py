"""The text encoders and tokenizers of the FLUX.2 family, for synthetic weights (no network, no vocab download).

- FLUX.2-dev: ``Mistral3ForConditionalGeneration`` (Mistral Small 3.1 24B) with the Tekken tokenizer that ships
  inside mistral-common, converted to a fast tokenizer with Mistral's chat template.
- FLUX.2 [klein]: ``Qwen3ForCausalLM`` (Qwen3-4B, Qwen3-8B) with a byte-level tokenizer built here: Qwen's
  byte-level pre-tokenizer with the 256 byte tokens at Qwen's ids 0..255 and no merges, Qwen3's 26 added tokens
  at their real ids (151643..151668), pad ``<|endoftext|>``, eos ``<|im_end|>``, and a chat template that renders
  the pipeline's one user turn exactly as Qwen3's own does. Both pipelines pad every prompt to 512 tokens, so the
  text encoder and the transformer see the shapes of the real tokenizer; only the token ids differ (about one per
  byte instead of one per word), which synthetic weights make meaningless anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Qwen3's added tokens in id order from 151643 (Qwen3's tokenizer_config.json added_tokens_decoder): (text, special)
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_FIRST_ADDED_ID = 151643
# What Qwen3's chat template renders for text turns without tools: one block per message, then the assistant's
# header and, with enable_thinking=False, an empty think block (what Flux2KleinPipeline asks for).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def mistral3_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(Mistral3Config.from_dict(config))


def tekken_tokenizer() -> Any:
    import mistral_common
    from transformers.integrations.mistral import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"))


def qwen3_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config.from_dict(config))


def qwen3_byte_tokenizer() -> Any:
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab |= {text: QWEN3_FIRST_ADDED_ID + i for i, (text, _) in enumerate(QWEN3_ADDED_TOKENS)}
    special = [text for text, is_special in QWEN3_ADDED_TOKENS
               if is_special and text not in ("<|endoftext|>", "<|im_end|>")]
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=special,
                                   model_max_length=131072, errors="replace", split_special_tokens=False,
                                   clean_up_tokenization_spaces=False, add_prefix_space=False)
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False)
                          for text, is_special in QWEN3_ADDED_TOKENS if not is_special])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# By the text encoder config's model_type: (text encoder builder, tokenizer builder)
FAMILIES = {"mistral3": (mistral3_text_encoder, tekken_tokenizer), "qwen3": (qwen3_text_encoder, qwen3_byte_tokenizer)}
