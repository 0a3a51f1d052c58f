"""The embedded default: a tiny Qwen2 and tokenizer made locally, warm-started on the demo task."""
