"""nemo_prorl: prolonged reinforcement learning (ProRL) for reasoning language models."""

__version__ = "0.1.0"
