"""Chat templates a run can force on the tokenizer (data.prompt.chat_template); None keeps the model's own."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from nemo_prorl.data.records import PromptRecord

# DeepSeek-R1-Distill-Qwen (ProRL's base model family): the assistant turn opens a <think> block.
R1_DISTILL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
CHAT_TEMPLATES = {"r1_distill": R1_DISTILL}


def apply_chat_template_choice(tokenizer: Any, name: Optional[str]) -> Any:
    if name is not None:
        if name not in CHAT_TEMPLATES:
            raise ValueError(f"data.prompt.chat_template={name!r}: allowed values: {', '.join(CHAT_TEMPLATES)}")
        tokenizer.chat_template = CHAT_TEMPLATES[name]
    return tokenizer


def encode_prompts(tokenizer: Any, records: Sequence[PromptRecord],
                   max_prompt_length: int) -> tuple[list[PromptRecord], list[list[int]], int]:
    """Chat-template and tokenize; prompts over `max_prompt_length` tokens are dropped and counted, never
    cut (a cut prompt would lose its question or its instruction). Returns (kept, their ids, dropped)."""
    kept, ids = [], []
    for rec in records:
        text = tokenizer.apply_chat_template(list(rec.messages), add_generation_prompt=True, tokenize=False)
        toks = tokenizer.encode(text, add_special_tokens=False)
        if len(toks) <= max_prompt_length:
            kept.append(rec)
            ids.append(toks)
    return kept, ids, len(records) - len(kept)
