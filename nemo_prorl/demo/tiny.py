"""Build a small Qwen2 (or Qwen3, Qwen3-MoE: model.tiny.architecture) model and a byte-level BPE tokenizer
locally (no hub access needed).

The tokenizer splits digits one per token, as Qwen2's does, and carries a ChatML template with
<|im_end|> as the end of an assistant turn."""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from nemo_prorl.config.schema import TinyModelConfig

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so no text is lost
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, additional_special_tokens=[IM_START]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_qwen2(spec: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    import torch

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,  # DeepSeek-R1-Distill-Qwen-1.5B has untied embeddings too
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def build_tiny_model(spec: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> Any:
    """The tiny model of `model.tiny.architecture`: qwen2 (the default, built exactly as before), qwen3
    (QK-norm, explicit head_dim) or qwen3_moe (every layer an MoE layer, top-k renormalised as in
    Qwen3-30B-A3B). Same tokenizer, same seeding."""
    if spec.architecture == "qwen2":
        return build_tiny_qwen2(spec, tokenizer, seed)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if spec.architecture not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"model.tiny.architecture={spec.architecture!r}: qwen2, qwen3 or qwen3_moe")
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        head_dim=spec.head_dim or spec.hidden_size // spec.num_attention_heads, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    if spec.architecture == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common))
    config = Qwen3MoeConfig(**common, num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                            moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(config)
