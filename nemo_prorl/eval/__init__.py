"""Evaluation: pass@k of checkpoints on benchmark files (`prorl eval`) and the trainer's validation."""
