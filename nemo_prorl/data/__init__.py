"""Prompt sources behind one registry (`data.source`), each yielding typed `PromptRecord`s."""

from nemo_prorl.data.records import DATA_SOURCES, PromptRecord, PromptSource
from nemo_prorl.data import synthetic as _synthetic  # noqa: F401  (registers "synthetic")
from nemo_prorl.data import blend as _blend  # noqa: F401  (registers "blend")

__all__ = ["DATA_SOURCES", "PromptRecord", "PromptSource"]
